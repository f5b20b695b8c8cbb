r"""Inference statistics: torch's running averages against exact passes over the training set.

Ioffe & Szegedy (2015), Sec. 3.1 and Algorithm 2: once the network is trained, normalise at
inference with *population* statistics, estimated over the whole training set with the weights
fixed (step 10: :math:`\mathrm{E}[x] = \mathrm{E}_B[\mu_B]`,
:math:`\mathrm{Var}[x] = \frac{m}{m-1}\mathrm{E}_B[\sigma_B^2]`). What torch keeps instead, and
what most people use, is the exponential running average of the batch statistics seen during
training (``running = (1 - momentum) * running + momentum * batch``), whose terms were taken
while the weights were still moving. The claim under test: *population statistics computed
exactly after training are at least as good for inference as the running averages.*

How this reproduction measures
------------------------------
- One batch-normalised MLP per seed (``depth`` hidden layers of ``hidden`` units, BN between
  each affine map and its activation, :class:`batchnorm.BatchNorm1d` with torch's
  ``momentum``) is trained with plain SGD on seeded mini-batches, exactly as in
  :mod:`~batchnorm.lab.experiments.figure1`.
- At step 0, every ``eval_every`` steps and at the end, on a *deep copy* of the model in eval
  mode (the training model is never touched, so measuring cannot change training):

  1. test accuracy and loss with the running averages as they are (**EMA**);
  2. :func:`batchnorm.tools.population.recompute_statistics` over the whole training set in
     batches of ``stats_batch_size``, ``method="pooled"`` (the exact mean and unbiased
     variance of every value each layer saw), then test accuracy and loss (**pooled**);
  3. the same with ``method="paper"``, Algorithm 2 as written: the mean of the batch means
     and the mean of the batches' :math:`\frac{m}{m-1}\sigma_B^2` (**paper**);
  4. the same with ``method="sequential"``: one pass per BN layer in the order they run, each
     recomputing one layer as pooled does while every other BN layer is in eval mode, the
     earlier ones on their new statistics (**sequential**);
  5. for each BN layer, the gap of the EMA's, pooled's and paper's statistics to the
     sequential ones (:func:`statistics_gap`; the reference is :data:`REFERENCE`).

  The exact passes use one seeded permutation of the training set per seed, the same at every
  measurement, so the statistics of different steps differ only because the weights do.
- The claims are judged on means over seeds at the final step; the report also counts the
  seeds in which each held. Nothing is chosen per seed.

Why the gaps are measured to sequential. During the pooled and paper passes every BN layer
normalises each batch with that batch's own statistics (the training network, as Algorithm 2
prescribes), so the input of the second and later layers depends on how the training set is cut
into batches: the pooled statistics of the first layer do not depend on ``stats_batch_size``,
those of deeper layers do, slightly. The two estimators see the same values: for equal batch
sizes their means agree exactly, and their variances differ by the spread between batch means,
which pooled counts and paper does not. Past the first layer that spread is *smaller* than
independent sampling would give, because every earlier BN layer has already removed its
batch's own mean and scale, so pooled's variance comes out below paper's by about :math:`1/m`.
At inference no batch couples the examples: every earlier layer normalises with fixed
statistics, and a deeper layer's input spreads more than in either pass. Sequential computes
exactly the statistics of that inference-time input, so it is what the other sources should be
measured against; in the first layer it is pooled's pass itself, so pooled's gap there is 0 and
any gap past it is the coupling of the training-mode pass.

Measured with ``method="sequential"`` as the reference (quick preset, 5 seeds, final step 3,000;
the report of one ``batchnorm lab run population`` run). Layer 1: pooled's statistics equal
sequential's bit for bit, at every step of every seed. Layers 2 and 3: pooled's variances are
1.05 % and 2.10 % below sequential's (geometric mean over channels, mean over seeds; per seed
0.96-1.13 % and 1.89-2.44 %), paper's 0.56 % above and 0.51 % below (at most 0.86 % off in a
seed), and the EMA's at most 0.61 % off on average but several per cent off channel by channel
(mean |log variance ratio| 0.033-0.037 in every layer, against 0.011 and 0.021 for pooled and
0.007 and 0.011 for paper). The mean final test losses order accordingly: sequential 1.1257,
paper 1.1266, EMA 1.1283, pooled 1.1395. Sequential is below pooled in all 5 seeds (difference
-0.0137 ± 0.0021) and pooled above the EMA in all 5 (+0.0111 ± 0.0042), but sequential is below
the EMA in only 3 (-0.0026 ± 0.0061) and paper in 4 (-0.0017 ± 0.0037). The test accuracies
agree within 0.002 (EMA 0.697, the three passes 0.696, ± 0.01 over seeds), so the accuracy
claims are decided by one or two of the 1,000 test examples, inside the noise. The EMA's lag is
clear: its mean shift to sequential falls from 0.041 (steps 50-300) to 0.023 (final) in every
seed. The run took 79 s on 2 shared cores; by the time of one call (about 0.1 s against 0.05 s
for pooled), sequential's passes are about 30 s of that.

Hyper-parameters: ReLU, the activation of the paper's Inception experiments and of the
batch-normalised networks people deploy; a ReLU passes a shifted or rescaled input on unchanged
in form (a sigmoid would squash it), so an error in the first layer's inference statistics
reaches the later layers. torch's default initialisation (BN makes the forward pass independent
of the hidden weights' scale). ``lr=0.5`` was picked once, as the best of {0.05, 0.1, 0.2,
0.5, 1.0} on MNIST-1D, seed 0, after 3,000 steps, judged by the test accuracy with the *EMA*
statistics, the incumbent, so that the choice cannot favour the exact pass.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...tools.population import recompute_statistics
from .. import data as lab_data
from .._training import (
    batch_indices,
    check_config,
    denormals_flushed,
    end_of_step,
    mean_std,
    threads,
)
from ..models import ACTIVATIONS, make_mlp

__all__ = [
    "CLAIM",
    "COMPARED",
    "EARLY_FRACTION",
    "EXACT",
    "GAPS",
    "METHODS",
    "PRESETS",
    "REFERENCE",
    "TITLE",
    "PopulationConfig",
    "PopulationResult",
    "measure_statistics",
    "metric_rows",
    "plot",
    "prepare",
    "run_seed",
    "statistics_batches",
    "statistics_gap",
    "steps_per_seed",
    "summarize",
]

TITLE = "Inference statistics: running averages vs exact passes over the training set"
CLAIM = (
    "Population statistics computed exactly over the training set after training "
    "(Algorithm 2) are at least as good for inference as torch's running averages"
)
# The four sources of inference statistics, in the order the report lists them.
METHODS = ("ema", "pooled", "paper", "sequential")
# The exact passes over the training set: the candidates the claims compare with the EMA.
EXACT = ("pooled", "paper", "sequential")
# The reference of every gap: the statistics each BN layer's input has in the inference network,
# which is what the layer will actually see at test time (see the module docstring).
REFERENCE = "sequential"
# The statistics whose gap to the reference is measured (the reference's gap to itself is 0).
COMPARED = ("ema", "pooled", "paper")
# "Early in training" for the lag claim: measured steps after 0 and up to this share of training
# (at least the first measured step after 0). Step 0 is left out because the EMA then still
# holds its initial values (mean 0, variance 1), which says nothing about lag.
EARLY_FRACTION = 0.1
# The two numbers statistics_gap returns, per layer.
GAPS = ("mean_shift", "log_var_ratio")


@dataclass(frozen=True)
class PopulationConfig:
    """Settings of the population-statistics experiment.

    Args:
        dataset: ``"mnist1d"``, ``"digits"`` or ``"mnist"`` (see :mod:`batchnorm.lab.data`).
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        steps: SGD steps per seed.
        batch_size: Examples per training mini-batch (the paper: 60).
        lr: Learning rate of plain SGD (no momentum, no weight decay).
        momentum: torch's BN momentum, the weight of the newest batch in the running averages
            (``running = (1 - momentum) * running + momentum * batch``; the opposite of
            flax's decay); ``None`` is torch's cumulative average over all batches.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"`` after each BN layer.
        hidden: Units per hidden layer.
        depth: Hidden layers, each with one BN layer.
        eval_every: Steps between measurements.
        checkpoint_every: Steps between checkpoints; a multiple of ``eval_every``.
        stats_batch_size: Examples per batch of the exact passes; ``None`` means ``batch_size``,
            so that the paper's estimator uses the paper's :math:`m`.
        threads: torch's and Numba's threads while training and measuring (both restored
            afterwards); ``None`` leaves them alone. 1 by default, for figure1's measured
            reason: these small matrix products gain nothing from a second thread, and
            spinning OpenMP threads collapse when another process holds a core.
        flush_denormals: Flush float32 denormals to zero while running (figure1's guard
            against the CPU's slow denormal path); restored to torch's default afterwards.

    Raises:
        ValueError: If a field is outside its range or ``checkpoint_every`` is not a multiple
            of ``eval_every``.
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    seeds: int = 5
    steps: int = 3_000
    batch_size: int = 60
    lr: float = 0.5
    momentum: float | None = 0.1
    activation: str = "relu"
    hidden: int = 100
    depth: int = 3
    eval_every: int = 50
    checkpoint_every: int = 1_000
    stats_batch_size: int | None = None
    threads: int | None = 1
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        momentum_ok = self.momentum is None or 0 < self.momentum <= 1
        stats_ok = self.stats_batch_size is None or self.stats_batch_size >= 2
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("seeds", self.seeds >= 1, "an int >= 1"),
            ("steps", self.steps >= 1, "an int >= 1"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("lr", self.lr > 0, "a float > 0"),
            ("momentum", momentum_ok, "a float in (0, 1] or None"),
            ("activation", self.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
            ("hidden", self.hidden >= 1, "an int >= 1"),
            ("depth", self.depth >= 1, "an int >= 1"),
            ("eval_every", self.eval_every >= 1, "an int >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "an int >= 1"),
            ("stats_batch_size", stats_ok, "an int >= 2 or None"),
            ("threads", self.threads is None or self.threads >= 1, "an int >= 1 or None"),
        ]
        check_config("PopulationConfig", checks, self)

    @property
    def pass_batch_size(self) -> int:
        """Examples per batch of the exact passes: ``stats_batch_size`` or ``batch_size``."""
        return self.batch_size if self.stats_batch_size is None else self.stats_batch_size


PRESETS: dict[str, PopulationConfig] = {
    # Seconds: for tests and smoke runs. Not meant to show anything.
    "tiny": PopulationConfig(
        dataset="digits", seeds=2, steps=40, eval_every=10, checkpoint_every=20
    ),
    # The defaults; 79 s on 2 shared cores, measured (see the module docstring).
    "quick": PopulationConfig(),
    # Ten times longer, measured as often: the end of training is then a settled network.
    "long": PopulationConfig(steps=30_000, eval_every=500, checkpoint_every=5_000),
}


def prepare(config: PopulationConfig) -> lab_data.Dataset:
    """Load the configured dataset (once per run; every seed shares it).

    Raises:
        ValueError: If a mini-batch or a batch of the exact passes is larger than the training
            set.
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    n_train = len(dataset.y_train)
    for name, value in (
        ("batch_size", config.batch_size),
        ("stats_batch_size", config.pass_batch_size),
    ):
        if value > n_train:
            raise ValueError(
                f"PopulationConfig(): expected {name} <= {n_train} (the {config.dataset} "
                f"training set), got {value}."
            )
    return dataset


def steps_per_seed(config: PopulationConfig) -> int:
    """SGD steps per seed, for the progress bar."""
    return config.steps


# --- the measurement --------------------------------------------------------------------------


def statistics_gap(
    mean: np.ndarray,
    var: np.ndarray,
    ref_mean: np.ndarray,
    ref_var: np.ndarray,
    eps: float = 0.0,
) -> dict[str, float]:
    r"""How far one layer's inference statistics are from reference ones, in two numbers.

    For :math:`C` channels with statistics :math:`(\mu_c, v_c)` and reference statistics
    :math:`(\mu^*_c, v^*_c)`:

    .. math::
        \text{mean\_shift} = \frac{1}{C}\sum_c \frac{|\mu_c - \mu^*_c|}{\sqrt{v^*_c + \epsilon}},
        \qquad
        \text{log\_var\_ratio} = \frac{1}{C}\sum_c
            \left|\log\frac{v_c + \epsilon}{v^*_c + \epsilon}\right| .

    With :math:`\epsilon` the layer's own ``eps``, both are what the layer's output sees:
    normalising with :math:`(\mu_c, v_c)` instead of the reference shifts :math:`\hat{x}` by
    ``mean_shift`` reference standard deviations (on average over channels) and scales it by
    :math:`e^{\pm\text{log\_var\_ratio}/2}`. ``eps`` also keeps both finite for a channel whose
    variance is 0.

    Args:
        mean: Means, shape ``(C,)``.
        var: Variances, shape ``(C,)``.
        ref_mean: Reference means, shape ``(C,)``.
        ref_var: Reference variances, shape ``(C,)``.
        eps: Added to every variance; computed in float64.

    Returns:
        ``{"mean_shift": float, "log_var_ratio": float}``.

    Raises:
        ValueError: If the four arrays do not share one shape ``(C,)`` with ``C >= 1``, or a
            variance plus ``eps`` is not positive.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (mean, var, ref_mean, ref_var)]
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] < 1:
        raise ValueError(
            f"statistics_gap(): expected mean, var, ref_mean, ref_var of one shape (C,), got "
            f"{', '.join(map(str, shapes))}."
        )
    mean, var, ref_mean, ref_var = arrays
    var, ref_var = var + eps, ref_var + eps
    if not (var > 0).all() or not (ref_var > 0).all():
        low = float(min(var.min(), ref_var.min()))
        raise ValueError(
            f"statistics_gap(): expected every variance + eps to be > 0, got a minimum of {low!r}."
        )
    return {
        "mean_shift": float(np.mean(np.abs(mean - ref_mean) / np.sqrt(ref_var))),
        "log_var_ratio": float(np.mean(np.abs(np.log(var) - np.log(ref_var)))),
    }


def statistics_batches(x: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """The training set cut into the batches of the exact passes, in one seeded order.

    Every example is used once. The last batch is smaller when ``batch_size`` does not divide
    the set; if it would hold a single example, that example joins the batch before it
    instead, because BatchNorm cannot normalise one value per channel.

    Args:
        x: The training inputs, ``(N, D)``.
        batch_size: Examples per batch, ``>= 2``.
        seed: Seeds the order (a generator of its own; global RNGs are untouched).

    Returns:
        The batches, views of a permuted copy of ``x``.

    Raises:
        ValueError: If ``batch_size < 2`` or ``x`` has fewer than 2 examples.
    """
    n = len(x)
    if batch_size < 2 or n < 2:
        raise ValueError(
            f"statistics_batches(): expected batch_size >= 2 and at least 2 examples, got "
            f"batch_size={batch_size!r} and {n} examples."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = x[order]
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [shuffled[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return accuracy, loss


def measure_statistics(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> dict[str, Any]:
    """Test a model with its running averages and with three exact statistics; compare them.

    Works on a deep copy in eval mode: ``model`` itself (parameters, buffers, modes) is left
    exactly as it was. The copy is tested with its running averages (``"ema"``), then its BN
    statistics are recomputed over ``batches`` with
    :func:`~batchnorm.tools.population.recompute_statistics` (``method="pooled"``) and it is
    tested again, then likewise with ``method="paper"`` and ``method="sequential"`` (one pass
    over ``batches`` per BN layer).

    Args:
        model: A model with BN layers that track running statistics.
        batches: The batches of the exact passes (e.g. :func:`statistics_batches`); a sequence,
            since ``method="sequential"`` iterates it once per BN layer.
        x_test: Test inputs, one batch.
        y_test: Test labels.

    Returns:
        A dict with ``test_accuracy`` and ``test_loss`` (each of :data:`METHODS` -> float),
        ``layers`` (the BN layers' names, in module order), ``eps`` (layer -> its ``eps``),
        ``statistics`` (layer -> method -> ``(mean, var)``, float64 arrays ``(C,)``; ``var``
        is the unbiased variance, the one torch's ``running_var`` holds) and ``gap``
        (each of :data:`COMPARED` -> gap name -> layer -> float: :func:`statistics_gap` to the
        :data:`REFERENCE` (sequential) statistics with the layer's ``eps``).

    Raises:
        ValueError: If ``model`` has no BN layer with running statistics.
    """
    probe = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in _bn_layers(probe) if m.running_mean is not None]
    if not layers:
        raise ValueError(
            f"measure_statistics(): expected a model with BatchNorm layers that track running "
            f"statistics, got none in {type(model).__name__}."
        )
    names = [n for n, _ in layers]
    # Three calls, sequential's one pass per layer: a generator would be spent after the first.
    batches = list(batches)
    statistics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {
        n: {
            "ema": (
                m.running_mean.detach().double().numpy().copy(),
                m.running_var.detach().double().numpy().copy(),
            )
        }
        for n, m in layers
    }
    accuracy, loss = {}, {}
    accuracy["ema"], loss["ema"] = _test_metrics(probe, x_test, y_test)
    for method in EXACT:
        # Each call overwrites the copy's buffers, and none reads what the one before wrote:
        # pooled and paper normalise with batch statistics only, and sequential's first pass
        # does too, after which the layers in eval mode use the values sequential itself wrote.
        found = recompute_statistics(probe, batches, method=method, progress=False)
        for name in names:
            statistics[name][method] = (found[name].mean, found[name].var_unbiased)
        accuracy[method], loss[method] = _test_metrics(probe, x_test, y_test)
    eps = {n: float(m.eps) for n, m in layers}
    gap = {method: {g: {} for g in GAPS} for method in COMPARED}
    for name in names:
        ref_mean, ref_var = statistics[name][REFERENCE]
        for method in COMPARED:
            values = statistics_gap(*statistics[name][method], ref_mean, ref_var, eps[name])
            for g in GAPS:
                gap[method][g][name] = values[g]
    return {
        "test_accuracy": accuracy,
        "test_loss": loss,
        "layers": names,
        "eps": eps,
        "statistics": statistics,
        "gap": gap,
    }


# --- training ---------------------------------------------------------------------------------


def _make_model(config: PopulationConfig, data: lab_data.Dataset, seed: int) -> nn.Module:
    # torch's default initialisation draws from the global generator: fork it (CPU only) and
    # seed the fork, so the weights are a function of the seed and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation=config.activation,
            norm="batchnorm",
        )
    for _, layer in _bn_layers(model):
        layer.momentum = config.momentum
    return model


def _empty_history(layers: Sequence[str]) -> dict[str, Any]:
    return {
        "steps": [],
        "train_loss": [],
        "test_accuracy": {m: [] for m in METHODS},
        "test_loss": {m: [] for m in METHODS},
        "gap": {m: {g: {n: [] for n in layers} for g in GAPS} for m in COMPARED},
    }


def _layer_names(config: PopulationConfig) -> list[str]:
    return [f"bn{i}" for i in range(1, config.depth + 1)]


def run_seed(
    config: PopulationConfig,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train one BN network for a seed, measuring its inference statistics along the way.

    Args:
        config: The settings.
        data: The dataset from :func:`prepare`.
        seed: Seeds the initial weights, the batch order and the order of the exact passes.
        checkpoint: A dict previously passed to ``save_checkpoint`` by a run with the same
            config and seed, to continue from; the result is then the same as without the
            interruption.
        save_checkpoint: Called with a dict of tensors and plain values every
            ``config.checkpoint_every`` steps (not after the last step).
        advance: Called as ``advance(n)`` when ``n`` more steps are done.

    Returns:
        A JSON-serialisable dict: ``seed``; ``seconds`` (earlier interrupted parts included);
        ``layers`` (the BN layers' names); ``steps`` and ``train_loss`` (the mean mini-batch
        loss since the previous measurement, ``None`` at step 0); ``test_accuracy`` and
        ``test_loss`` (each of :data:`METHODS` -> list over steps); ``reference``
        (:data:`REFERENCE`, the statistics the gaps are measured to); ``gap`` (each of
        :data:`COMPARED` -> ``"mean_shift"``/``"log_var_ratio"`` -> layer -> list over steps,
        the gap to the sequential statistics); ``final_statistics`` (layer -> ``eps`` and
        method -> ``mean``, ``var`` lists over channels, at the last step).

    Raises:
        ValueError: If ``checkpoint`` was saved by an earlier version of this experiment that
            did not measure every one of :data:`METHODS`.
    """
    start = time.perf_counter()
    n_train = len(data.y_train)
    model = _make_model(config, data, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    batches = statistics_batches(data.x_train, config.pass_batch_size, seed)
    layers = _layer_names(config)
    history = _empty_history(layers)
    final_statistics: dict[str, Any] = {}
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint["seconds"])
        history = copy.deepcopy(dict(checkpoint["history"]))
        missing = [m for m in METHODS if m not in history["test_accuracy"]]
        if missing or set(history["gap"]) != set(COMPARED):
            # Continuing would mix two definitions of the gap in one history.
            raise ValueError(
                f"population.run_seed(): expected a checkpoint measuring {list(METHODS)} with "
                f"gaps of {list(COMPARED)} to {REFERENCE!r}, got one measuring "
                f"{list(history['test_accuracy'])} with gaps of {list(history['gap'])}. It was "
                "saved by an earlier version of this experiment; start a new run."
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    loss_sum, loss_count = 0.0, 0

    def measure() -> None:
        nonlocal loss_sum, loss_count
        found = measure_statistics(model, batches, data.x_test, data.y_test)
        history["steps"].append(step)
        history["train_loss"].append(loss_sum / loss_count if loss_count else None)
        loss_sum, loss_count = 0.0, 0
        for method in METHODS:
            history["test_accuracy"][method].append(found["test_accuracy"][method])
            history["test_loss"][method].append(found["test_loss"][method])
        for method in COMPARED:
            for g in GAPS:
                for name in layers:
                    history["gap"][method][g][name].append(found["gap"][method][g][name])
        if step == config.steps:
            final_statistics.update(
                {
                    name: {
                        "eps": found["eps"][name],
                        **{
                            method: {
                                "mean": found["statistics"][name][method][0].tolist(),
                                "var": found["statistics"][name][method][1].tolist(),
                            }
                            for method in METHODS
                        },
                    }
                    for name in layers
                }
            )

    def state() -> dict:
        # Copies, not the live tensors a state_dict holds: a checkpoint kept in memory must not
        # follow the training that continues after it.
        return copy.deepcopy(
            {
                "step": step,
                "seconds": elapsed_before + time.perf_counter() - start,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
            }
        )

    order: dict = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        if step == 0:
            measure()
        while step < config.steps:
            idx = batch_indices(seed, step, n_train, config.batch_size, order)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            loss_count += 1
            step += 1
            end_of_step(step, config, measure, save_checkpoint, state, advance)

    return {
        "seed": seed,
        "seconds": elapsed_before + time.perf_counter() - start,
        "layers": layers,
        "reference": REFERENCE,
        **history,
        "final_statistics": final_statistics,
    }


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows, one per source of statistics and measured step.

    Each row: ``seed``, ``statistics`` (one of :data:`METHODS`), ``step``, ``test_accuracy``,
    ``test_loss``, ``train_loss``, and per layer ``mean_shift_vs_sequential_<layer>`` and
    ``log_var_ratio_vs_sequential_<layer>``, the gap of these statistics to the sequential ones
    (0 for sequential). The reference is in the column name so that these columns cannot be
    mistaken for those of earlier runs, which measured the gap to the pooled statistics.
    """
    rows = []
    for method in METHODS:
        for t, step in enumerate(result["steps"]):
            row = {
                "seed": result["seed"],
                "statistics": method,
                "step": step,
                "test_accuracy": result["test_accuracy"][method][t],
                "test_loss": result["test_loss"][method][t],
                "train_loss": result["train_loss"][t],
            }
            for g in GAPS:
                for name in result["layers"]:
                    value = 0.0 if method == REFERENCE else result["gap"][method][g][name][t]
                    row[f"{g}_vs_{REFERENCE}_{name}"] = value
            rows.append(row)
    return rows


# --- results, summary, report -----------------------------------------------------------------


@dataclass(frozen=True)
class PopulationResult:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        layers: The BN layers' names, in module order.
        steps: int64 array ``(T,)`` of measured steps (the same for every seed).
        test_accuracy: Method (each of :data:`METHODS`) -> float64 ``(S, T)``.
        test_loss: Method -> float64 ``(S, T)``.
        gap: Each of :data:`COMPARED` (``"ema"``, ``"pooled"``, ``"paper"``) ->
            ``"mean_shift"``/``"log_var_ratio"`` -> float64 ``(S, L, T)``, the gap to the
            :data:`REFERENCE` (sequential) statistics.
        final_statistics: Per seed, layer -> method -> ``{"mean", "var"}`` float64 ``(C,)``,
            and ``"eps"`` -> the layer's ``eps`` (a float) where the seed recorded it.
        summary: The dict :func:`summarize` returns (claims, numbers).
    """

    config: PopulationConfig
    seeds: tuple[int, ...]
    layers: tuple[str, ...]
    steps: np.ndarray
    test_accuracy: dict[str, np.ndarray]
    test_loss: dict[str, np.ndarray]
    gap: dict[str, dict[str, np.ndarray]]
    final_statistics: list[dict[str, dict[str, dict[str, np.ndarray]]]]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls, config: PopulationConfig, results: Mapping[int, dict], summary: dict | None = None
    ) -> PopulationResult:
        """Build from a dict seed -> :func:`run_seed` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty, the seeds were measured at different steps or
                on different layers, or a seed comes from an earlier version of this
                experiment (without the sequential statistics, gaps measured to pooled).
        """
        where = "PopulationResult.from_seed_results()"
        if not results:
            raise ValueError(f"{where}: expected results, got none.")
        seeds = tuple(sorted(results))
        rows = [results[s] for s in seeds]
        steps = np.asarray(rows[0]["steps"], dtype=np.int64)
        layers = tuple(rows[0]["layers"])
        for r in rows:
            if r.get("reference") != REFERENCE or any(m not in r["test_accuracy"] for m in METHODS):
                # Results without a "reference" predate it: they measured gaps to pooled.
                raise ValueError(
                    f"{where}: expected results measuring {list(METHODS)} with gaps to "
                    f"{REFERENCE!r}, got seed {r['seed']} measuring {list(r['test_accuracy'])} "
                    f"with gaps to {r.get('reference', 'pooled')!r}, from an earlier version of "
                    "this experiment; re-run it."
                )
            if list(r["steps"]) != steps.tolist() or tuple(r["layers"]) != layers:
                raise ValueError(
                    f"{where}: expected every seed to be measured at the same steps and layers, "
                    f"got steps {list(r['steps'])[:5]}... and layers {list(r['layers'])} for "
                    f"seed {r['seed']}, against {steps.tolist()[:5]}... and {list(layers)}."
                )

        def stack(key: str) -> dict[str, np.ndarray]:
            return {m: np.array([r[key][m] for r in rows], dtype=np.float64) for m in METHODS}

        gap = {
            m: {
                g: np.array(
                    [[r["gap"][m][g][name] for name in layers] for r in rows], dtype=np.float64
                )
                for g in GAPS
            }
            for m in COMPARED
        }
        final = []
        for r in rows:
            per_layer = {}
            for name in layers:
                recorded = r.get("final_statistics", {}).get(name, {})
                per_layer[name] = {
                    m: {k: np.asarray(v, dtype=np.float64) for k, v in by_method.items()}
                    for m, by_method in recorded.items()
                    if m in METHODS
                }
                if "eps" in recorded:
                    per_layer[name]["eps"] = float(recorded["eps"])
            final.append(per_layer)
        return cls(
            config,
            seeds,
            layers,
            steps,
            stack("test_accuracy"),
            stack("test_loss"),
            gap,
            final,
            dict(summary or {}),
        )

    def variance_ratios(self, method: str, layer: str) -> np.ndarray:
        r"""Per seed and channel, ``method``'s final variance over the sequential one.

        .. math::
            r_c = \frac{v_c + \epsilon}{v^*_c + \epsilon}

        with :math:`v^*` the :data:`REFERENCE` variances and :math:`\epsilon` the layer's
        ``eps`` (0 if not recorded), as in :func:`statistics_gap`, whose ``log_var_ratio`` is
        the mean of :math:`|\log r_c|`; the sign, which that gap drops, says whether
        ``method`` under- or over-estimates the spread the layer sees at inference.

        Args:
            method: One of :data:`METHODS`.
            layer: One of :attr:`layers`.

        Returns:
            float64 ``(S', C)``: one row per seed that recorded final statistics of both
            ``method`` and the reference for ``layer`` (``S' = 0`` if none did).

        Raises:
            ValueError: If ``method`` or ``layer`` is unknown.
        """
        if method not in METHODS or layer not in self.layers:
            raise ValueError(
                f"PopulationResult.variance_ratios(): expected method in {list(METHODS)!r} and "
                f"layer in {list(self.layers)!r}, got {method!r} and {layer!r}."
            )
        rows = []
        for per_layer in self.final_statistics:
            recorded = per_layer.get(layer, {})
            if method in recorded and REFERENCE in recorded:
                eps = recorded.get("eps", 0.0)
                rows.append((recorded[method]["var"] + eps) / (recorded[REFERENCE]["var"] + eps))
        width = len(rows[0]) if rows else 0
        return np.array(rows, dtype=np.float64).reshape(len(rows), width)

    def early_mask(self) -> np.ndarray:
        """Boolean ``(T,)``: the measured steps that count as early for the lag claim.

        Steps ``s`` with ``0 < s <= max(ceil(EARLY_FRACTION * steps), first measured s > 0)``.
        """
        positive = self.steps[self.steps > 0]
        if not len(positive):
            return np.zeros(len(self.steps), dtype=bool)
        until = max(math.ceil(EARLY_FRACTION * self.config.steps), int(positive[0]))
        return (self.steps > 0) & (self.steps <= until)


# How the claims name each source of statistics: as the subject of "give(s)", and as the owner
# of the value it is compared with.
_SUBJECTS = {
    "pooled": "Exact (pooled) population statistics give",
    "paper": "Algorithm 2 as written (paper) gives",
    "sequential": "The inference network's own (sequential) statistics give",
}
_OWNERS = {"ema": "the EMA's", "pooled": "pooled's"}
# The comparison claims, (metric, candidate, baseline), in the order the report lists them:
# every exact pass against the incumbent on both metrics, then the finding of the module
# docstring, that the inference network's statistics beat the training-mode pass.
_COMPARISONS = (
    *(("test accuracy", m, "ema") for m in EXACT),
    *(("test loss", m, "ema") for m in EXACT),
    ("test loss", "sequential", "pooled"),
)


def summarize(config: PopulationConfig, results: Mapping[int, dict]) -> dict:
    """Judge the claim on a run's results; numbers and a printable report.

    The claims, each judged on the mean over seeds at the final step (a tie holds, since the
    claim is "at least as good"):

    1-3. the pooled, the paper's (Algorithm 2 as written) and the sequential statistics each
         give at least the EMA's test accuracy;
    4-6. each gives at most the EMA's test loss (a finer measure than accuracy, which moves in
         steps of one test example);
    7.   the sequential statistics give at most pooled's test loss: normalising like the
         inference network beats normalising like the training network;
    8.   the EMA lags: its gap to the sequential statistics (``mean_shift``, mean over layers)
         is larger early in training (:meth:`PopulationResult.early_mask`) than at the end.

    Each comparison claim also carries ``difference`` (candidate minus baseline:
    ``per_seed``, ``mean``, ``std``), so a verdict can be read against the spread over seeds.

    Returns:
        A JSON-serialisable dict: ``reference`` (:data:`REFERENCE`); ``final_accuracy`` and
        ``final_loss`` (each of :data:`METHODS` -> ``per_seed``, ``mean``, ``std``);
        ``accuracy_difference`` and ``loss_difference`` (each of :data:`EXACT` minus
        ``"ema"``, likewise); ``final_gap`` (each of :data:`COMPARED` -> gap name -> layer ->
        likewise, the gap to the sequential statistics); ``early_gap`` (the EMA's, over the
        early steps); ``early_steps``; ``variance_bias`` (each of :data:`COMPARED` -> layer ->
        likewise: per seed, the geometric mean over channels of
        :meth:`PopulationResult.variance_ratios`, minus 1, so ``-0.02`` is 2 % below the
        sequential variances; only layers with final statistics); ``loss_wins`` (each of
        :data:`EXACT` -> per seed, the share of measured steps after 0 at which its test loss
        was below the EMA's); ``claims`` (each with ``held``); ``seconds``; ``report`` (lines
        of text).

    Raises:
        ValueError: If ``results`` is empty, its seeds disagree on steps or layers, come from
            an earlier version of this experiment, or no step after 0 was measured.
    """
    result = PopulationResult.from_seed_results(config, results)
    if not (result.steps > 0).any():
        raise ValueError(
            f"summarize(): expected results measured after step 0, got steps "
            f"{result.steps.tolist()}."
        )
    n = len(result.seeds)
    final_accuracy = {m: mean_std(result.test_accuracy[m][:, -1]) for m in METHODS}
    final_loss = {m: mean_std(result.test_loss[m][:, -1]) for m in METHODS}
    accuracy_difference = {
        m: mean_std(result.test_accuracy[m][:, -1] - result.test_accuracy["ema"][:, -1])
        for m in EXACT
    }
    loss_difference = {
        m: mean_std(result.test_loss[m][:, -1] - result.test_loss["ema"][:, -1]) for m in EXACT
    }
    final_gap = {
        m: {
            g: {name: mean_std(result.gap[m][g][:, i, -1]) for i, name in enumerate(result.layers)}
            for g in GAPS
        }
        for m in COMPARED
    }
    early = result.early_mask()
    early_steps = [int(s) for s in result.steps[early]]
    early_gap = {
        g: {
            name: mean_std(result.gap["ema"][g][:, i, early].mean(axis=1))
            for i, name in enumerate(result.layers)
        }
        for g in GAPS
    }
    variance_bias: dict[str, dict[str, Any]] = {m: {} for m in COMPARED}
    for m in COMPARED:
        for name in result.layers:
            ratios = result.variance_ratios(m, name)
            if len(ratios):
                # The geometric mean: a channel 2 % low and one 2 % high cancel, as they do in
                # statistics_gap's log variance ratio before its absolute value.
                variance_bias[m][name] = mean_std(np.expm1(np.log(ratios).mean(axis=1)))
    # The final step is always measured and is > 0, so neither mask below is empty.
    later = result.steps > 0
    loss_wins = {
        m: [
            float(np.mean(result.test_loss[m][s, later] < result.test_loss["ema"][s, later]))
            for s in range(n)
        ]
        for m in EXACT
    }

    def seeds_where(ok: np.ndarray) -> int:
        return int(np.count_nonzero(ok))

    claims = []
    for metric, candidate, baseline in _COMPARISONS:
        values = result.test_accuracy if metric == "test accuracy" else result.test_loss
        better = "at least" if metric == "test accuracy" else "at most"
        diff = values[candidate][:, -1] - values[baseline][:, -1]
        # A tie counts as held: the claim is "at least as good".
        ok = diff >= 0 if better == "at least" else diff <= 0
        claims.append(
            {
                "claim": f"{_SUBJECTS[candidate]} {better} {_OWNERS[baseline]} {metric}",
                "measure": f"final {metric}, mean over seeds",
                "values": {
                    baseline: float(values[baseline][:, -1].mean()),
                    candidate: float(values[candidate][:, -1].mean()),
                },
                "difference": mean_std(diff),
                "held": bool(diff.mean() >= 0 if better == "at least" else diff.mean() <= 0),
                "seeds_held": seeds_where(ok),
                "seeds": n,
            }
        )
    shift_final = result.gap["ema"]["mean_shift"][:, :, -1].mean(axis=1)
    shift_early = result.gap["ema"]["mean_shift"][:, :, early].mean(axis=(1, 2))
    claims.append(
        {
            "claim": "The EMA lags: its gap to the inference network's statistics is larger "
            "early in training than at the end",
            "measure": f"EMA-vs-sequential mean shift (sequential std, mean over layers), "
            f"{_step_range(early_steps)} vs the final step",
            "values": {"early": float(shift_early.mean()), "final": float(shift_final.mean())},
            "held": float(shift_early.mean()) > float(shift_final.mean()),
            "seeds_held": seeds_where(shift_early > shift_final),
            "seeds": n,
        }
    )
    summary = {
        "experiment": "population",
        "claim": CLAIM,
        "reference": REFERENCE,
        "seeds": list(result.seeds),
        "steps": config.steps,
        "dataset": config.dataset,
        "layers": list(result.layers),
        "final_accuracy": final_accuracy,
        "final_loss": final_loss,
        "accuracy_difference": accuracy_difference,
        "loss_difference": loss_difference,
        "final_gap": final_gap,
        "early_gap": early_gap,
        "early_steps": early_steps,
        "variance_bias": variance_bias,
        "loss_wins": loss_wins,
        "claims": claims,
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, summary)
    return summary


def _step_range(steps: Sequence[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _fmt(stats: Mapping[str, Any], digits: int = 3, sign: bool = False) -> str:
    plus = "+" if sign else ""
    return f"{stats['mean']:{plus}.{digits}f} ± {stats['std']:.{digits}f}"


# Column headers of the report, one per source of statistics.
_HEADERS = {
    "ema": "EMA (torch)",
    "pooled": "pooled (exact)",
    "paper": "paper (Alg. 2)",
    "sequential": "sequential (eval)",
}


def _report(config: PopulationConfig, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    momentum = "cumulative" if config.momentum is None else f"{config.momentum:g}"
    width = 19
    lines = [
        f"Population statistics on {s['dataset']}: {config.depth}x{config.hidden} "
        f"{config.activation} MLP with BN (momentum {momentum}), {config.steps} steps of SGD "
        f"(lr {config.lr:g}, batch {config.batch_size}); exact passes over the training set in "
        f"batches of {config.pass_batch_size}; {n} seed{'s' if n != 1 else ''}; mean ± std "
        "over seeds",
        "",
        f"{'':<24}" + "".join(f"{_HEADERS[m]:>{width}}" for m in METHODS),
    ]
    for label, key, digits in (
        ("final test accuracy", "final_accuracy", 3),
        ("final test loss", "final_loss", 4),
    ):
        cells = "".join(f"{_fmt(s[key][m], digits):>{width}}" for m in METHODS)
        lines.append(f"{label:<24}{cells}")
    for label, key, digits in (
        ("  minus EMA's accuracy", "accuracy_difference", 3),
        ("  minus EMA's loss", "loss_difference", 4),
    ):
        cells = "".join(f"{_fmt(s[key][m], digits, sign=True):>{width}}" for m in EXACT)
        lines.append(f"{label:<24}{'':>{width}}{cells}")
    wins = ", ".join(f"{m} {100 * np.mean(s['loss_wins'][m]):.0f} %" for m in EXACT)
    lines.append(
        f"Share of the measured steps after 0 at which the test loss was below the EMA's (mean "
        f"over seeds): {wins}."
    )
    early_label = f"EMA, {_step_range(s['early_steps'])}"
    lines += [
        "",
        "Gap to the sequential statistics (the inference network's), per BN layer, mean over "
        "channels and seeds: mean shift in sequential std | |log variance ratio|",
        f"{'layer':<8}{'EMA, final':>20}{early_label:>26}{'pooled, final':>20}{'paper, final':>20}",
    ]
    for name in s["layers"]:
        cells = []
        for source in (
            s["final_gap"]["ema"],
            s["early_gap"],
            s["final_gap"]["pooled"],
            s["final_gap"]["paper"],
        ):
            shift, ratio = source["mean_shift"][name], source["log_var_ratio"][name]
            cells.append(f"{shift['mean']:.4f} | {ratio['mean']:.4f}")
        lines.append(f"{name:<8}{cells[0]:>20}{cells[1]:>26}{cells[2]:>20}{cells[3]:>20}")
    biased = [name for name in s["layers"] if all(name in s["variance_bias"][m] for m in COMPARED)]
    if biased:
        lines += [
            "",
            "Variance at the final step relative to sequential's, per BN layer (geometric mean "
            "over channels, in %; below 0: the inference input's spread is under-estimated)",
            f"{'layer':<8}" + "".join(f"{_HEADERS[m]:>{width}}" for m in COMPARED),
        ]
        for name in biased:
            cells = "".join(
                f"{_fmt(_percent(s['variance_bias'][m][name]), 2, sign=True):>{width}}"
                for m in COMPARED
            )
            lines.append(f"{name:<8}{cells}")
    lines.append("")
    for claim in s["claims"]:
        verdict = "HELD" if claim["held"] else "DID NOT HOLD"
        values = ", ".join(f"{k} {v:.4f}" for k, v in claim["values"].items())
        if "difference" in claim:
            values += f"; difference {_fmt(claim['difference'], 4, sign=True)}"
        lines.append(
            f"{verdict}: {claim['claim']} ({claim['measure']}: {values}; held in "
            f"{claim['seeds_held']} of {claim['seeds']} seeds)."
        )
    return lines


def _percent(stats: Mapping[str, Any]) -> dict[str, float]:
    return {"mean": 100 * stats["mean"], "std": 100 * stats["std"]}


def plot(config: PopulationConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures: one, ``"population"``.

    See :func:`batchnorm.lab.plots_population.plot_population` for its six panels.
    """
    from ..plots_population import plot_population

    return {
        "population": plot_population(PopulationResult.from_seed_results(config, results, summary))
    }
