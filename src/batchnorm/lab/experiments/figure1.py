"""Ioffe & Szegedy (2015), Figure 1: BN trains faster and keeps a sigmoid's input distribution put.

The paper's setup (Sec. 4.1): a network of 3 fully connected hidden layers of 100 sigmoid units
and a 10-way linear output, weights drawn from a small Gaussian, trained with plain SGD on
mini-batches of 60 for 50,000 steps, once as is (the *baseline*) and once with BatchNorm
between each affine map and its sigmoid (*bn*). Panel (a) is test accuracy against steps;
panels (b, c) follow the 15th, 50th and 85th percentiles of the input of one sigmoid of the
last hidden layer over training, for each network.

How this reproduction measures
------------------------------
- Both networks start from the same ``nn.Linear`` weights (one seeded draw) and see the same
  mini-batches in the same order; the bn network's hidden ``nn.Linear`` layers have no bias
  (BN's shift replaces it) and use :class:`batchnorm.BatchNorm1d`.
- Every ``eval_every`` steps (and at step 0): test accuracy and loss over the whole test set in
  eval mode (BN uses its running statistics); and the distribution of the last hidden layer's
  sigmoid inputs, recorded by :class:`batchnorm.monitor.ActivationMonitor`, over a fixed probe
  set of ``probe_size`` training inputs. The probe pass runs in training mode, so BN normalises
  with the probe's own statistics as it does in training, and the running statistics are put
  back afterwards. A fixed probe separates the change caused by learning (internal covariate
  shift) from the batch-to-batch sampling noise of the training mini-batches.
- **Stability number** ("percentile range"): for each unit of the last hidden layer and each
  recorded percentile, the range (max - min over all recorded steps, step 0 included) that the
  percentile of the unit's sigmoid input covered, averaged over units and percentiles; in units
  of the sigmoid's input. Lower means more stable. The same number restricted to the steps
  after the first 10 % of training is reported too, so an early transient cannot decide it.
- The claims are judged on means over seeds, and the report also counts the seeds in which each
  held. Nothing is chosen per seed: every seed runs the same configuration.

Hyper-parameters the paper does not give: the learning rate and the initial weights' standard
deviation. ``lr=2.0`` was picked once, as the best of {0.1, 0.5, 1, 2} for the *baseline* (not
for BN) after 5,000 steps on MNIST-1D with seed 0; ``init_std=0.01`` is the customary "small
random Gaussian". Both hold for every preset and seed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...monitor import ActivationMonitor, ActivationTrace
from .. import _checks as check
from .. import data as lab_data
from .._training import (
    batch_indices,
    check_config,
    denormals_flushed,
    end_of_step,
    mean_std,
    measured_steps,
    threads,
)
from ..models import make_mlp

__all__ = [
    "CLAIM",
    "NETWORKS",
    "PRESETS",
    "TITLE",
    "Figure1Config",
    "Figure1Result",
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "percentile_range",
    "plot",
    "prepare",
    "run_seed",
    "steps_per_seed",
    "summarize",
]

TITLE = "Ioffe & Szegedy (2015) Figure 1: 3x100 sigmoid MLP with and without BatchNorm"
CLAIM = "BN trains faster and keeps each sigmoid's input distribution stable"
# The two networks, in the order the report lists them.
NETWORKS = ("baseline", "bn")
# Percentile ranges are also measured after this share of training (see the module docstring).
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class Figure1Config:
    """Settings of the Figure 1 experiment.

    Args:
        dataset: ``"mnist1d"``, ``"digits"`` or ``"mnist"`` (see :mod:`batchnorm.lab.data`).
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        steps: SGD steps per network and seed (the paper: 50,000).
        batch_size: Examples per mini-batch (the paper: 60).
        lr: Learning rate of plain SGD (no momentum, no weight decay).
        init_std: Standard deviation of the Gaussian the ``nn.Linear`` weights are drawn from;
            biases start at zero.
        hidden: Units per hidden layer (the paper: 100).
        depth: Hidden layers (the paper: 3).
        eval_every: Steps between measurements (test accuracy and percentiles).
        checkpoint_every: Steps between checkpoints; a multiple of ``eval_every``.
        probe_size: Training inputs in the fixed probe set the percentiles are measured on.
        quantiles: Percentile levels recorded (the paper: 15th, 50th, 85th).
        unit: The unit of the last hidden layer whose percentiles panels (b, c) show.
        threads: torch's intra-op threads and Numba's threads while training (both restored
            afterwards); ``None`` leaves both alone. 1 by default: the 60 x 100 matrix products
            are too small to gain from splitting, and OpenMP threads that wait by spinning
            collapse as soon as another process holds a core (measured on 2 cores with a
            benchmark running: 300 steps in 1.1 s with 1 thread, 53 s with 2). Numba's are
            pinned too because its OpenMP layer shares torch's OpenMP runtime: a parallel
            kernel launch (the probe pass) sets the runtime's thread count to Numba's.
        flush_denormals: Flush float32 denormals to zero while training (``torch
            .set_flush_denormal``): the small initial weights push the baseline's gradients
            into the denormal range, where the CPU is some 30x slower. Restored to torch's
            default (off) afterwards.

    Raises:
        ValueError: If a field is outside its range or ``checkpoint_every`` is not a multiple
            of ``eval_every``.
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    seeds: int = 3
    steps: int = 5_000
    batch_size: int = 60
    lr: float = 2.0
    init_std: float = 0.01
    hidden: int = 100
    depth: int = 3
    eval_every: int = 50
    checkpoint_every: int = 1_000
    probe_size: int = 1_000
    quantiles: tuple[float, ...] = (0.15, 0.5, 0.85)
    unit: int = 0
    threads: int | None = 1
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("seeds", self.seeds >= 1, "an int >= 1"),
            ("steps", self.steps >= 1, "an int >= 1"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("lr", self.lr > 0, "a float > 0"),
            ("init_std", self.init_std > 0, "a float > 0"),
            ("hidden", self.hidden >= 1, "an int >= 1"),
            ("depth", self.depth >= 1, "an int >= 1"),
            ("eval_every", self.eval_every >= 1, "an int >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "an int >= 1"),
            ("probe_size", self.probe_size >= 2, "an int >= 2"),
            ("quantiles", bool(self.quantiles), "a non-empty tuple of levels in [0, 1]"),
            ("quantiles", all(0 <= q <= 1 for q in self.quantiles), "levels in [0, 1]"),
            ("unit", 0 <= self.unit < self.hidden, f"an int in [0, {self.hidden})"),
            ("threads", self.threads is None or self.threads >= 1, "an int >= 1 or None"),
        ]
        check_config("Figure1Config", checks, self)


PRESETS: dict[str, Figure1Config] = {
    # Seconds: for tests and smoke runs. Not meant to show anything.
    "tiny": Figure1Config(
        dataset="digits", seeds=2, steps=40, eval_every=10, checkpoint_every=20, probe_size=200
    ),
    # About a minute on 2 cores (measured in the README).
    "quick": Figure1Config(steps=5_000, eval_every=50, checkpoint_every=1_000),
    # The paper's length: 50,000 steps.
    "paper": Figure1Config(steps=50_000, eval_every=250, checkpoint_every=5_000),
}


def prepare(config: Figure1Config) -> lab_data.Dataset:
    """Load the configured dataset (once per run; every seed shares it).

    Raises:
        ValueError: If the probe set or a mini-batch is larger than the training set.
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    n_train = len(dataset.y_train)
    for name in ("batch_size", "probe_size"):
        if getattr(config, name) > n_train:
            raise ValueError(
                f"Figure1Config(): expected {name} <= {n_train} (the {config.dataset} training "
                f"set), got {getattr(config, name)}."
            )
    return dataset


def steps_per_seed(config: Figure1Config) -> int:
    """SGD steps per seed (each trains both networks once), for the progress bar."""
    return config.steps


def _probe_forward(model: nn.Module, x: torch.Tensor) -> None:
    """A training-mode forward pass over ``x`` that leaves the model's buffers as they were."""
    saved = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad():
        model(x)
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    finally:
        model.train()
    return accuracy, loss


def _empty_history() -> dict[str, list]:
    return {"steps": [], "test_accuracy": [], "test_loss": [], "train_loss": []}


def _make_models(config: Figure1Config, data: lab_data.Dataset, seed: int) -> dict[str, nn.Module]:
    models = {}
    for name in NETWORKS:
        # One generator state for both: their nn.Linear weights start equal.
        models[name] = make_mlp(
            data.n_features,
            data.n_classes,
            hidden=config.hidden,
            depth=config.depth,
            activation="sigmoid",
            norm="none" if name == "baseline" else "batchnorm",
            init_std=config.init_std,
            generator=torch.Generator().manual_seed(seed),
        )
    return models


def run_seed(
    config: Figure1Config,
    data: lab_data.Dataset,
    seed: int,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Train the baseline and the bn network for one seed; return their measurements.

    Args:
        config: The settings.
        data: The dataset from :func:`prepare`.
        seed: Seeds the initial weights (shared by both networks) and the batch order.
        checkpoint: A dict previously passed to ``save_checkpoint`` by a run with the same
            config and seed, to continue from; the result is then the same as without the
            interruption.
        save_checkpoint: Called with a dict of tensors and plain values every
            ``config.checkpoint_every`` steps (not after the last step).
        advance: Called as ``advance(n)`` when ``n`` more steps are done.

    Returns:
        A JSON-serialisable dict with keys ``seed``, ``unit`` (the plotted unit),
        ``seconds`` (training time, earlier interrupted parts included) and ``networks``,
        which maps ``"baseline"`` and ``"bn"`` to lists ``steps``, ``test_accuracy``,
        ``test_loss``, ``train_loss`` (the mean mini-batch loss since the previous
        measurement, ``None`` at step 0) and ``trace``, the last hidden layer's
        :meth:`ActivationTrace.to_dict` (rounded to 5 decimals).
    """
    start = time.perf_counter()
    layer = f"act{config.depth}"
    n_train = len(data.y_train)
    probe = data.x_train[: config.probe_size]
    models = _make_models(config, data, seed)
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=config.lr) for name, model in models.items()
    }
    monitors = {
        name: ActivationMonitor(
            model, layer, where="input", per="unit", every=None, quantiles=config.quantiles
        )
        for name, model in models.items()
    }
    history = {name: _empty_history() for name in NETWORKS}
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint["seconds"])
        for name in NETWORKS:
            models[name].load_state_dict(checkpoint["models"][name])
            optimizers[name].load_state_dict(checkpoint["optimizers"][name])
            history[name] = {k: list(v) for k, v in checkpoint["history"][name].items()}
            trace = ActivationTrace.from_dict(checkpoint["traces"][name])
            monitors[name].records.extend(trace.records())
    loss_sums = dict.fromkeys(NETWORKS, 0.0)
    loss_count = 0

    def measure() -> None:
        nonlocal loss_count
        for name, model in models.items():
            accuracy, loss = _evaluate(model, data.x_test, data.y_test)
            row = history[name]
            row["steps"].append(step)
            row["test_accuracy"].append(accuracy)
            row["test_loss"].append(loss)
            row["train_loss"].append(loss_sums[name] / loss_count if loss_count else None)
            loss_sums[name] = 0.0
            with monitors[name].capture(step=step):
                _probe_forward(model, probe)
        loss_count = 0

    def state() -> dict:
        return {
            "step": step,
            "seconds": elapsed_before + time.perf_counter() - start,
            "models": {n: m.state_dict() for n, m in models.items()},
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
            "history": history,
            "traces": {n: monitors[n].trace(layer).to_dict() for n in NETWORKS},
        }

    batches: dict = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(denormals_flushed(config.flush_denormals))
        stack.enter_context(threads(config.threads))
        for monitor in monitors.values():
            stack.enter_context(monitor)
        if step == 0:
            measure()
        while step < config.steps:
            idx = batch_indices(seed, step, n_train, config.batch_size, batches)
            xb, yb = data.x_train[idx], data.y_train[idx]
            for name, model in models.items():
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                loss_sums[name] += loss.item()
            loss_count += 1
            step += 1
            end_of_step(step, config, measure, save_checkpoint, state, advance)

    networks = {}
    for name in NETWORKS:
        trace = monitors[name].trace(layer)
        networks[name] = {**history[name], "trace": trace.to_dict(decimals=5)}
    return {
        "seed": seed,
        "unit": config.unit,
        "seconds": elapsed_before + time.perf_counter() - start,
        "networks": networks,
    }


# --- checks of what a run reads back -------------------------------------------------------


def _check_history(history: Any, steps: list[int], where: str) -> None:
    check.equal(check.item(history, "steps", where), steps, check.at(where, "steps"))
    for key in ("test_accuracy", "test_loss", "train_loss"):
        values = check.item(history, key, where)
        check.numbers(values, check.at(where, key), len(steps), none_first=key == "train_loss")


def _check_trace(trace: Any, config: Figure1Config, steps: list[int], where: str) -> None:
    expected = {"layer": f"act{config.depth}", "where": "input", "per": "unit"}
    for key, want in expected.items():
        check.equal(check.item(trace, key, where), want, check.at(where, key))
    levels = check.item(trace, "quantile_levels", where)
    check.equal(levels, list(config.quantiles), check.at(where, "quantile_levels"))
    check.equal(check.item(trace, "steps", where), steps, check.at(where, "steps"))
    n, units = len(steps), config.hidden
    shapes = {
        "count": (n,),
        "quantiles": (n, units, len(config.quantiles)),
        "mean": (n, units),
        "std": (n, units),
        "saturated": (n, units),
    }
    for key, shape in shapes.items():
        check.array(check.item(trace, key, where), check.at(where, key), shape)


def check_result(config: Figure1Config, seed: int, result: Mapping[str, Any]) -> None:
    """Check that ``result`` is a complete :func:`run_seed` result of ``config`` and ``seed``:
    every key, both networks measured at every step, traces of the configured shape.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``result['networks']['bn']['steps']``.
    """
    check.equal(check.item(result, "seed", "result"), seed, "result['seed']")
    check.equal(check.item(result, "unit", "result"), config.unit, "result['unit']")
    networks = check.item(result, "networks", "result")
    steps = measured_steps(config)
    for name in NETWORKS:
        where = check.at("result['networks']", name)
        network = check.item(networks, name, "result['networks']")
        _check_history(network, steps, where)
        _check_trace(check.item(network, "trace", where), config, steps, check.at(where, "trace"))


def check_checkpoint(
    config: Figure1Config, data: lab_data.Dataset, seed: int, state: Mapping[str, Any]
) -> None:
    """Check that ``state`` (a dict :func:`run_seed` saved, whose ``step`` the runner has
    checked) can continue seed ``seed`` of ``config``: both networks' weights of the
    configured shapes, their SGD states, histories and traces measured at every step so far.

    Raises:
        ValueError: ``"expected <entry> to be <what>, got <what>."``, naming the entry by its
            path, e.g. ``state['models']['bn']['fc1.weight']``.
    """
    models = _make_models(config, data, seed)
    steps = measured_steps(config, state["step"])
    keys = ("models", "optimizers", "history", "traces")
    parts = {key: check.item(state, key, "state") for key in keys}
    for name, model in models.items():
        found = {key: check.item(part, name, f"state[{key!r}]") for key, part in parts.items()}
        where = {key: check.at(f"state[{key!r}]", name) for key in parts}
        check.tensors(found["models"], model.state_dict(), where["models"])
        n_params = len(list(model.parameters()))
        check.sgd_state(found["optimizers"], n_params, config.lr, where["optimizers"])
        _check_history(found["history"], steps, where["history"])
        _check_trace(found["traces"], config, steps, where["traces"])


def metric_rows(result: Mapping[str, Any]) -> list[dict]:
    """One seed's result as flat rows, one per network and measured step.

    Each row: ``seed``, ``network``, ``step``, ``test_accuracy``, ``test_loss``,
    ``train_loss``, the plotted unit's percentiles as ``p15``/``p50``/``p85`` (one key per
    level), and ``saturated``, the layer's saturated fraction (mean over units).
    """
    rows = []
    for name in NETWORKS:
        net = result["networks"][name]
        trace = ActivationTrace.from_dict(net["trace"])
        unit = result.get("unit", 0)
        for t, step in enumerate(net["steps"]):
            row = {
                "seed": result["seed"],
                "network": name,
                "step": step,
                "test_accuracy": net["test_accuracy"][t],
                "test_loss": net["test_loss"][t],
                "train_loss": net["train_loss"][t],
            }
            for level, value in zip(trace.quantile_levels, trace.quantiles[t, unit], strict=True):
                row[f"p{100 * level:g}"] = float(value)
            if trace.saturated is not None:
                row["saturated"] = float(trace.saturated[t].mean())
            rows.append(row)
    return rows


# --- results, summary, report -----------------------------------------------------------------


@dataclass(frozen=True)
class Figure1Result:
    """All seeds of a run as arrays: what the plot functions take.

    Attributes:
        config: The run's settings.
        seeds: The seeds, in order.
        steps: int64 array ``(T,)`` of measured steps (the same for every seed).
        test_accuracy: Network name -> float64 array ``(S, T)``.
        traces: Network name -> list of one ActivationTrace per seed: the last hidden
            layer's sigmoid inputs on the probe set.
        summary: The dict :func:`summarize` returns (claims, numbers).
    """

    config: Figure1Config
    seeds: tuple[int, ...]
    steps: np.ndarray
    test_accuracy: dict[str, np.ndarray]
    traces: dict[str, list[ActivationTrace]]
    summary: dict = field(default_factory=dict)

    @classmethod
    def from_seed_results(
        cls, config: Figure1Config, results: Mapping[int, dict], summary: dict | None = None
    ) -> Figure1Result:
        """Build from a dict seed -> :func:`run_seed` result (e.g. read back from JSON).

        Raises:
            ValueError: If ``results`` is empty or the seeds were measured at different steps.
        """
        if not results:
            raise ValueError("Figure1Result.from_seed_results(): expected results, got none.")
        seeds = tuple(sorted(results))
        steps = np.asarray(results[seeds[0]]["networks"]["bn"]["steps"], dtype=np.int64)
        accuracy, traces = {}, {}
        for name in NETWORKS:
            rows = [results[s]["networks"][name] for s in seeds]
            if any(list(r["steps"]) != steps.tolist() for r in rows):
                raise ValueError(
                    "Figure1Result.from_seed_results(): expected every seed to be measured at "
                    "the same steps, got different ones."
                )
            accuracy[name] = np.array([r["test_accuracy"] for r in rows], dtype=np.float64)
            traces[name] = [ActivationTrace.from_dict(r["trace"]) for r in rows]
        return cls(config, seeds, steps, accuracy, traces, dict(summary or {}))


def percentile_range(trace: ActivationTrace, start_step: int = 0) -> np.ndarray:
    """The stability number's ingredients: per unit and level, max - min over steps.

    Args:
        trace: A trace with quantiles of shape ``(T, U, Q)``.
        start_step: Only steps ``>= start_step`` count.

    Returns:
        float64 array ``(U, Q)``.
    """
    keep = trace.steps >= start_step
    q = trace.quantiles[keep]
    return q.max(axis=0) - q.min(axis=0)


def summarize(config: Figure1Config, results: Mapping[int, dict]) -> dict:
    """Judge the paper's two claims on a run's results; numbers and a printable report.

    Returns:
        A JSON-serialisable dict: ``final_accuracy``, ``percentile_range``,
        ``percentile_range_after_warmup`` and ``final_saturation`` (each per network with
        ``per_seed``, ``mean``, ``std``), ``percentile_range_by_level``, ``steps_to_match``
        (per seed, the first measured step at which bn's test accuracy reached the
        baseline's final one, or ``None``), ``claims`` (each with ``held``), ``seconds`` and
        ``report`` (lines of text).
    """
    result = Figure1Result.from_seed_results(config, results)
    warmup_step = math.ceil(WARMUP_FRACTION * config.steps)
    final_accuracy, ranges, late_ranges, by_level, saturation = {}, {}, {}, {}, {}
    for name in NETWORKS:
        final_accuracy[name] = mean_std(list(result.test_accuracy[name][:, -1]))
        per_seed = [percentile_range(t) for t in result.traces[name]]
        ranges[name] = mean_std([r.mean() for r in per_seed])
        late_ranges[name] = mean_std(
            [percentile_range(t, warmup_step).mean() for t in result.traces[name]]
        )
        levels = np.mean([r.mean(axis=0) for r in per_seed], axis=0)
        by_level[name] = {f"{q:g}": float(v) for q, v in zip(config.quantiles, levels, strict=True)}
        saturation[name] = mean_std([t.saturated[-1].mean() for t in result.traces[name]])
    steps_to_match = []
    for i, _ in enumerate(result.seeds):
        target = result.test_accuracy["baseline"][i, -1]
        reached = np.nonzero(result.test_accuracy["bn"][i] >= target)[0]
        steps_to_match.append(int(result.steps[reached[0]]) if len(reached) else None)

    n = len(result.seeds)
    acc_seeds = sum(
        b > a for a, b in zip(*(final_accuracy[k]["per_seed"] for k in NETWORKS), strict=True)
    )
    range_seeds = sum(
        b < a for a, b in zip(*(ranges[k]["per_seed"] for k in NETWORKS), strict=True)
    )
    claims = [
        {
            "claim": "BN's final test accuracy is above the baseline's",
            "measure": "mean final test accuracy over seeds",
            "baseline": final_accuracy["baseline"]["mean"],
            "bn": final_accuracy["bn"]["mean"],
            "held": final_accuracy["bn"]["mean"] > final_accuracy["baseline"]["mean"],
            "seeds_held": acc_seeds,
            "seeds": n,
        },
        {
            "claim": "BN's sigmoid inputs are more stable (smaller percentile range)",
            "measure": "mean percentile range over seeds, last hidden layer, whole run",
            "baseline": ranges["baseline"]["mean"],
            "bn": ranges["bn"]["mean"],
            "held": ranges["bn"]["mean"] < ranges["baseline"]["mean"],
            "seeds_held": range_seeds,
            "seeds": n,
        },
    ]
    summary = {
        "experiment": "figure1",
        "claim": CLAIM,
        "seeds": list(result.seeds),
        "steps": config.steps,
        "dataset": config.dataset,
        "final_accuracy": final_accuracy,
        "percentile_range": ranges,
        "percentile_range_after_warmup": late_ranges,
        "warmup_step": warmup_step,
        "percentile_range_by_level": by_level,
        "final_saturation": saturation,
        "steps_to_match": steps_to_match,
        "claims": claims,
        "seconds": float(sum(r["seconds"] for r in results.values())),
    }
    summary["report"] = _report(config, summary)
    return summary


def _fmt(stats: Mapping[str, Any], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _report(config: Figure1Config, s: Mapping[str, Any]) -> list[str]:
    n = len(s["seeds"])
    levels = [f"p{100 * q:g}" for q in config.quantiles]
    rows = [
        ("final test accuracy", "final_accuracy"),
        ("percentile range, whole run", "percentile_range"),
        (f"percentile range, steps >= {s['warmup_step']}", "percentile_range_after_warmup"),
        ("saturated fraction at the end", "final_saturation"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [
        f"Figure 1 on {s['dataset']}: {config.depth}x{config.hidden} sigmoid MLP, "
        f"{config.steps} steps of SGD (lr {config.lr:g}, batch {config.batch_size}), "
        f"{n} seed{'s' if n != 1 else ''}; mean ± std over seeds",
        "",
        f"{'':<{width}}{'without BN':>18}{'with BN':>18}",
    ]
    for label, key in rows:
        lines.append(f"{label:<{width}}{_fmt(s[key]['baseline']):>18}{_fmt(s[key]['bn']):>18}")
    for q, level in zip(config.quantiles, levels, strict=True):
        by = s["percentile_range_by_level"]
        lines.append(
            f"{'  range of ' + level:<{width}}{by['baseline'][f'{q:g}']:>18.3f}"
            f"{by['bn'][f'{q:g}']:>18.3f}"
        )
    matched = [m for m in s["steps_to_match"] if m is not None]
    lines += [
        "",
        "percentile range: for each of the last hidden layer's units and each percentile of "
        "its sigmoid input",
        "(fixed probe set), max - min over the measured steps, averaged; lower = more stable.",
        f"BN reached the baseline's final accuracy in {len(matched)} of {n} seeds"
        + (f", after {', '.join(map(str, s['steps_to_match']))} steps." if matched else "."),
        "",
    ]
    for claim in s["claims"]:
        verdict = "HELD" if claim["held"] else "DID NOT HOLD"
        lines.append(
            f"{verdict}: {claim['claim']} ({claim['measure']}: without BN "
            f"{claim['baseline']:.3f}, with BN {claim['bn']:.3f}; held in "
            f"{claim['seeds_held']} of {claim['seeds']} seeds)."
        )
    return lines


def plot(config: Figure1Config, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures: one, ``"figure1"``, the paper's three panels."""
    from ..plots import plot_figure1

    return {"figure1": plot_figure1(Figure1Result.from_seed_results(config, results, summary))}
