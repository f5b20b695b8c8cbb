r"""Inference statistics: torch's running averages (per momentum) against exact population
statistics, with a control that uses no inference statistics at all.

Ioffe & Szegedy (2015), Sec. 3.1 and Algorithm 2: once the network is trained, normalise at
inference with *population* statistics, estimated over the training set with the weights fixed
(step 10: :math:`\mathrm{E}[x] = \mathrm{E}_B[\mu_B]`,
:math:`\mathrm{Var}[x] = \frac{m}{m-1}\mathrm{E}_B[\sigma_B^2]`), because "the normalization of
activations that depends on the mini-batch is neither necessary nor desirable during
inference". What torch keeps instead, and what most people use, is the exponential running
average of the batch statistics seen during training
(``running = (1 - momentum) * running + momentum * batch``), whose terms were taken while the
weights were still moving. The claims, with their pass rules declared below in :data:`RULES`
before any result: the exact statistics are no worse than the running averages at the end of
training; early in training the running averages lag behind the weights; and normalising the
test examples with their own mini-batch statistics is worse than the exact statistics.

How this reproduction measures
------------------------------
- Data: MNIST-1D generated at MNIST's size (``"mnist1d-large"``, 60,000 training and 15,000
  test sequences); ``n_val`` training examples are held out as a fixed validation split
  (:meth:`~batchnorm.lab.data.Dataset.with_validation`), which the tuning reads; the test set
  is only reported. Each network trains a fixed number of ``epochs``.
- Networks: per seed and batch size (``batch_sizes``, default 16, 60 and 256), one
  batch-normalised MLP (``depth`` hidden layers of ``hidden`` ReLU units, BN between each
  affine map and its activation, :class:`batchnorm.BatchNorm1d`) trained with plain SGD on
  seeded mini-batches; every batch size of a seed starts from the same weights. The learning
  rate of each batch size is the one ``batchnorm lab tune population`` chose for it on the
  validation split (:func:`tune_score`), read from the tuned file.
- Momenta, fairly: BN's momentum never enters a training-mode forward, so it cannot change the
  trajectory. One network per (seed, batch size) therefore serves every momentum in
  ``momenta`` (default 0.01, 0.1, 0.5; 0.1 is torch's default): forward hooks keep, per BN
  layer and momentum, the running mean and unbiased variance exactly as torch's update would
  (:class:`~._population_ema.RunningAverages`; the tests check it against
  ``torch.nn.BatchNorm1d(momentum=m)`` on the same batches).
- Measurements, after ``early_fraction`` of each network's steps and at its end, on a deep
  copy (the training network is never touched), on the validation split and the test set:
  loss and accuracy with (a) the running averages of each momentum (``ema<m>``); (b) the
  exact population statistics, :func:`~batchnorm.tools.population.recompute_statistics` with
  ``method="sequential"`` (the statistics each BN layer's input has in the inference network,
  independent of how the training set is batched), and as extra columns one training-mode
  pass in batches of the training batch size with ``"pooled"`` and ``"paper"`` (Algorithm 2
  as written); (c) the control ``batch``: the examples normalised with their own statistics
  in mini-batches of the training batch size (training-mode BN at inference, running buffers
  untouched). And the loss of the whole training set with the exact statistics, to compare
  with the validation loss: a network that memorised its training set would show a training
  loss far below it.
- Losses are the primary measure: an accuracy difference between two sources of statistics
  is often a handful of the test examples, which the report states next to the accuracies.
- Each rule's effect is one number per seed; :meth:`~batchnorm.lab.protocol.Rule.judge` turns
  them into held / not held / inconclusive with the share of seeds that agree and the sign
  test's p-value. Nothing is chosen per seed.

Choice of length (made once, before the rules were judged, from training and validation
losses only): with lr 0.1 (untuned), seed 0, and the running averages in eval mode, the
validation loss was still falling after 20 epochs at every batch size, and the training loss
was 0.07 (batch 16) to 0.15 nats (batch 256) below it; at 30 epochs batch 256's validation
loss had stopped falling while its training loss went on down. Hence ``full`` trains 20
epochs and ``quick``, the preset the learning rates are tuned with, half as many; ``full``
uses the rates tuned at 10 epochs.

Where the code lives: every name in ``__all__`` is importable from this module, which the
registry uses. The rules are declared here; everything else is defined in a private module
with one job each: the vocabulary (:data:`EXACT`, :data:`CONTROL`, ...) in
``_population_spec``, the settings in ``_population_config``, the running averages of several
momenta in ``_population_ema``, one measurement in ``_population_measure``, the training of one
seed (with the checks of its checkpoints and results, and the tuning score) in
``_population_training``, a run as arrays in ``_population_result`` and the verdicts and report
in ``_population_summary``. The figures are in :mod:`batchnorm.lab.plots_population`, which
imports only the vocabulary; :func:`plot` imports them when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _population_summary
from ._population_config import DEFAULT_LR, PRESETS, PopulationConfig, prepare, steps_per_seed
from ._population_ema import RunningAverages, bn_layers
from ._population_measure import (
    batch_own_metrics,
    batch_slices,
    evaluate,
    exact_statistics,
    measure,
    statistics_batches,
)
from ._population_result import PopulationResult
from ._population_spec import (
    CLAIM,
    CONTROL,
    EXACT,
    EXTRA,
    LAG_BATCH_SIZE,
    NATIVE_MOMENTUM,
    PHASES,
    SPLITS,
    TITLE,
    ema_method,
    methods,
)
from ._population_training import (
    check_checkpoint,
    check_result,
    metric_rows,
    run_seed,
    tune_arms,
    tune_score,
)

__all__ = [
    "CONFIG_TYPE",
    "TUNING",
    "CLAIM",
    "CONTROL",
    "DEFAULT_LR",
    "EXACT",
    "EXTRA",
    "LAG_BATCH_SIZE",
    "NATIVE_MOMENTUM",
    "NONINFERIORITY_MARGIN",
    "PHASES",
    "PRESETS",
    "RULES",
    "SPLITS",
    "TITLE",
    "PopulationConfig",
    "PopulationResult",
    "RunningAverages",
    "batch_own_metrics",
    "batch_slices",
    "bn_layers",
    "check_checkpoint",
    "check_result",
    "ema_method",
    "evaluate",
    "exact_statistics",
    "measure",
    "methods",
    "metric_rows",
    "plot",
    "prepare",
    "run_seed",
    "statistics_batches",
    "steps_per_seed",
    "summarize",
    "tune_arms",
    "tune_score",
]

# What the registry reads (batchnorm.lab.registry._from_module).
CONFIG_TYPE = PopulationConfig
TUNING = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.03, 0.1, 0.3, 1.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "minus the mean validation loss of EMA(0.1) and exact statistics at the end",
    "preset": "quick",
}


# The non-inferiority margin of the first rule, in nats of mean test cross-entropy. A mean loss
# 0.005 nats higher is a geometric-mean probability of the true class lower by a factor of
# exp(-0.005), i.e. 0.5 %: below that, we call the exact statistics "no worse" even if the
# running averages come out slightly ahead. Stated before any result of this design.
NONINFERIORITY_MARGIN = 0.005

RULES: tuple[Rule, ...] = (
    # Non-inferiority, judged at the worst batch size of each seed, so that the claim has to
    # hold for small and large batches alike. The margin is NONINFERIORITY_MARGIN (above);
    # 4 of 5 seeds must agree, the protocol's default.
    Rule(
        key="exact_no_worse",
        claim=(
            "Exact population statistics are no worse than the running averages "
            f"(momentum {NATIVE_MOMENTUM:g}) at the end of training"
        ),
        anchor="Ioffe & Szegedy 2015, Sec. 3.1 / Algorithm 2",
        measure=(
            f"per seed, min over batch sizes of test loss with EMA({NATIVE_MOMENTUM:g}) minus "
            f"test loss with the exact statistics at the end, plus a margin of "
            f"{NONINFERIORITY_MARGIN:g} nats; above 0: exact no worse"
        ),
        unit="nats",
        threshold=0.0,
        agree=0.8,
    ),
    # The lag: early in training the weights still move fast, and the running averages mix
    # statistics of weights that are gone. No margin: the claim is only the sign, at the
    # paper's batch size.
    Rule(
        key="early_lag",
        claim=(
            "Early in training the running averages lag: exact statistics give a lower test "
            "loss at the early checkpoint"
        ),
        anchor="Ioffe & Szegedy 2015, Sec. 3.1 / Algorithm 2 (statistics of the trained network)",
        measure=(
            f"test loss with EMA({NATIVE_MOMENTUM:g}) minus with the exact statistics at the "
            f"early checkpoint, batch size {LAG_BATCH_SIZE}; above 0: the running averages lag"
        ),
        unit="nats",
        threshold=0.0,
        agree=0.8,
    ),
    # The control: mini-batch statistics at inference, where they are noisiest (the smallest
    # batch size). No margin: the claim is only the sign.
    Rule(
        key="control_batch",
        claim=(
            "Normalising test examples with their own mini-batch statistics is worse than the "
            "exact population statistics"
        ),
        anchor=(
            "Ioffe & Szegedy 2015, Sec. 3.1: the normalization of activations that depends on "
            "the mini-batch is neither necessary nor desirable during inference"
        ),
        measure=(
            "test loss with test batches normalised by their own statistics minus with the "
            "exact statistics at the end, smallest batch size; above 0: the control is worse"
        ),
        unit="nats",
        threshold=0.0,
        agree=0.8,
    ),
)


def summarize(config: PopulationConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report.

    See :func:`batchnorm.lab.experiments._population_summary.summarize` for the keys; its
    ``claims`` hold one :meth:`~batchnorm.lab.protocol.Verdict.to_dict` row per rule.
    """
    return _population_summary.summarize(config, results, RULES, NONINFERIORITY_MARGIN)


def plot(config: PopulationConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures, by name: ``"end_loss"``, ``"lag"`` and ``"fit"`` (what to see in
    each: the summary's ``figure_notes``)."""
    from ..plots_population import plot_end_loss, plot_fit, plot_lag

    result = PopulationResult.from_seed_results(config, results, summary)
    return {"end_loss": plot_end_loss(result), "lag": plot_lag(result), "fit": plot_fit(result)}
