"""The population experiment's vocabulary: its title and claim, the sources of inference
statistics it compares, the two moments of training it measures at and the two splits it
measures on.

Constants and one naming function, no imports of the lab: the experiment
(:mod:`batchnorm.lab.experiments.population`) and its figures
(:mod:`batchnorm.lab.plots_population`) both need them, and keeping them here lets the figures
depend on them without depending on the experiment.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CLAIM",
    "CONTROL",
    "EXACT",
    "EXTRA",
    "LAG_BATCH_SIZE",
    "NATIVE_MOMENTUM",
    "PHASES",
    "SPLITS",
    "TITLE",
    "ema_method",
    "methods",
]

TITLE = "Inference statistics: running averages (per momentum) vs exact population statistics"
CLAIM = (
    "Population statistics computed exactly after training (Algorithm 2) are at least as good "
    "for inference as torch's running averages, which lag early in training; normalising test "
    "batches with their own statistics is worse than either"
)
# The exact population statistics: recompute_statistics(method="sequential"), the statistics
# every BN layer's input has in the inference network (Algorithm 2's pass, layer by layer with
# the earlier layers in eval mode, so that nothing depends on how the training set is batched).
EXACT = "sequential"
# Extra columns, one pass each in batches of the training batch size: the exact mean and
# unbiased variance of what each layer saw in a training-mode pass, and Algorithm 2 as written
# (the mean of the batch means and of the batches' unbiased variances).
EXTRA = ("pooled", "paper")
# The control: test examples normalised with their own statistics, in mini-batches of the
# training batch size (training-mode BN at inference, which the paper rules out in Sec. 3.1).
CONTROL = "batch"
# torch's default BN momentum: the running averages the rules compare with.
NATIVE_MOMENTUM = 0.1
# The batch size the lag rule is declared for: the paper's (Sec. 4.1).
LAG_BATCH_SIZE = 60
# The two measured moments of each network's training, in order.
PHASES = ("early", "end")
# The held-out splits every measurement is made on: validation (tuning reads it) and test.
SPLITS = ("val", "test")


def ema_method(momentum: float) -> str:
    """The name of the running averages with ``momentum``: ``ema_method(0.1) == "ema0.1"``."""
    return f"ema{momentum:g}"


def methods(momenta: Sequence[float]) -> list[str]:
    """Every source of inference statistics of a run, in the order the report lists them: the
    running averages per momentum, the exact statistics, the extra passes, the control."""
    return [*(ema_method(m) for m in momenta), EXACT, *EXTRA, CONTROL]
