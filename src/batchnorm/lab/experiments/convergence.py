r"""Convergence: does BatchNorm reach a given accuracy in fewer steps, each arm at its own best
learning rate?

Ioffe & Szegedy (2015), Sec. 4.2.2 and the table of Fig. 3: Inception reached 72.2 % validation
accuracy in 31.0M training steps, BN-Inception in 13.3M, and BN-x5 (BN with a 5x larger
learning rate) in 2.1M, "14 times fewer". Part of that gain is the larger learning rate BN
allows; a fair test therefore gives every arm its own tuned learning rate, so "faster" means
faster at each network's best setting, not at one shared rate that suits one arm.

How this reproduction measures
------------------------------
- **Data.** MNIST-1D at MNIST's size (``"mnist1d-large"``: 60,000 training sequences of 40
  values, 15,000 test); a fixed 5,000 of the training sequences are the validation split the
  tuning and the speed target read; the test set is only reported.
- **Networks and arms.** Two networks, each trained without (``none``) and with BatchNorm
  (``bn``) between every affine map or convolution and its nonlinearity:

  - ``mlp``: the paper's Sec. 4.1 network, 3 hidden layers of 100 sigmoid units, Glorot
    initialisation (:math:`\mathcal{N}(0, 2/(\text{fan\_in} + \text{fan\_out}))`: the
    standard scale, so that BN is not credited with rescuing the paper's small init, which
    figure1 and the initialization experiment test), plain SGD on mini-batches of 60.
  - ``cnn``: :func:`~batchnorm.lab.models.make_cnn1d`, three blocks of 32 channels (kernel 5,
    stride 2 after the first), ReLU, He initialisation, global mean pooling and a linear
    output; SGD with momentum 0.9 (both arms), mini-batches of 32.

  The two arms of a network start from the same convolution/linear weights and see the same
  mini-batches in the same order. Each arm's learning rate was chosen by ``batchnorm lab tune
  convergence`` on the validation split (seed :data:`~batchnorm.lab.protocol.TUNING_SEED`,
  never reported) as the one with the best smoothed validation accuracy; the presets read it
  from the tuned file and never tune.
- **Measured** every ``eval_every`` steps (and at step 0), in eval mode: validation accuracy
  and loss, and the mean training loss since the last measurement; at the end: test and
  training accuracy and loss (:func:`~batchnorm.lab._classify.train_classifier`).
- **Steps to target.** Let :math:`\bar a_t` be an arm's validation accuracy smoothed by the
  trailing mean of ``smooth`` measurements. Per seed and network, the target is

  .. math:: \tau = f \cdot \max_t \bar a^{\text{none}}_t, \qquad f = 0.98,

  98 % of the no-BN arm's best smoothed validation accuracy, so the no-BN arm reaches it by
  construction. An arm's steps to target are the first measured step :math:`t > 0` with
  :math:`\bar a_t \ge \tau`; an arm that never gets there (or diverges first) counts
  ``steps + eval_every``, a bound: its true steps are more, so a BN arm that never reaches the
  target gets a speed-up *above* its true one (which is still below 1). The **speed-up** is
  :math:`s = \text{steps}^{\text{none}} / \text{steps}^{\text{bn}}`.
- **Final accuracy.** Test accuracy at the end of training. A diverged arm (non-finite loss)
  has no final numbers; its accuracy counts as chance (:math:`1/10`), which is what a network
  that outputs NaN scores.

The claims and their pass rules are :data:`RULES`, declared before the first results (see
:mod:`batchnorm.lab.protocol` for how a verdict is reached): the speed-up above 1.25x in 4 of
5 seeds, for each network; and BN's final test accuracy no worse than 0.5 pp below the no-BN
arm's, for each network.

Where the code lives: every name in ``__all__`` is importable from this module, which the
registry uses. The settings are in ``_convergence_config``, the training of one seed (with the
checks of its results and checkpoints, and the tuning score) in ``_convergence_training``,
the measures, verdicts and report in ``_convergence_summary``; the figures in
:mod:`batchnorm.lab.plots_convergence`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _convergence_summary
from ._convergence_config import (
    ARMS,
    CLAIM,
    NETS,
    NORMS,
    PRESETS,
    SPEEDUP_THRESHOLD,
    TITLE,
    UNTUNED_LR,
    ConvergenceConfig,
    arm_name,
    prepare,
    split_arm,
    steps_per_seed,
    units,
)
from ._convergence_summary import ConvergenceResult, speed_per_seed, steps_to_target
from ._convergence_training import (
    build_model,
    check_checkpoint,
    check_result,
    metric_rows,
    run_seed,
    train_arm,
    tune_arms,
    tune_score,
)

__all__ = [
    "ACCURACY_MARGIN",
    "ARMS",
    "CLAIM",
    "CONFIG_TYPE",
    "NETS",
    "NORMS",
    "PRESETS",
    "RULES",
    "SPEEDUP_THRESHOLD",
    "TITLE",
    "TUNING",
    "UNTUNED_LR",
    "ConvergenceConfig",
    "ConvergenceResult",
    "arm_name",
    "build_model",
    "check_checkpoint",
    "check_result",
    "metric_rows",
    "plot",
    "prepare",
    "run_seed",
    "speed_per_seed",
    "split_arm",
    "steps_per_seed",
    "steps_to_target",
    "summarize",
    "train_arm",
    "tune_arms",
    "tune_score",
    "units",
]

CONFIG_TYPE = ConvergenceConfig

# Non-inferiority margin of the accuracy rules, in percentage points of test accuracy: 0.5 pp
# is 75 of the 15,000 test sequences, above the binomial standard deviation of one arm's test
# accuracy there (about 0.4 pp at 70 %), so a loss larger than this is not test-set luck.
ACCURACY_MARGIN = 0.5

_SPEED_ANCHOR = (
    "Ioffe & Szegedy 2015, Sec. 4.2.2, Fig. 3: Inception 31.0M vs BN-x5 2.1M steps to 72.2 % "
    "(14x fewer)"
)
_ACCURACY_ANCHOR = (
    "Ioffe & Szegedy 2015, Sec. 4.2.2, Fig. 3 (max accuracy: BN-Baseline 72.7 %, Inception 72.2 %)"
)

RULES: tuple[Rule, ...] = (
    Rule(
        key="speed_mlp",
        claim="BN reaches the no-BN MLP's accuracy in fewer steps (3x100 sigmoid MLP)",
        anchor=_SPEED_ANCHOR,
        measure=(
            "no-BN steps / BN steps to 98 % of the no-BN arm's best smoothed validation "
            "accuracy (a bound for an arm that never reaches it)"
        ),
        unit="x",
        threshold=SPEEDUP_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="speed_cnn",
        claim="BN reaches the no-BN CNN's accuracy in fewer steps (1-D CNN)",
        anchor=_SPEED_ANCHOR,
        measure=(
            "no-BN steps / BN steps to 98 % of the no-BN arm's best smoothed validation "
            "accuracy (a bound for an arm that never reaches it)"
        ),
        unit="x",
        threshold=SPEEDUP_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="accuracy_mlp",
        claim=(
            f"BN's final test accuracy is no worse than without BN (within {ACCURACY_MARGIN:g} "
            "pp; 3x100 sigmoid MLP)"
        ),
        anchor=_ACCURACY_ANCHOR,
        measure=(
            "final test accuracy with BN - without, in pp (a diverged arm counts as chance); "
            f"above -{ACCURACY_MARGIN:g}: no worse"
        ),
        unit="pp",
        threshold=-ACCURACY_MARGIN,
        agree=0.8,
    ),
    Rule(
        key="accuracy_cnn",
        claim=(
            f"BN's final test accuracy is no worse than without BN (within {ACCURACY_MARGIN:g} "
            "pp; 1-D CNN)"
        ),
        anchor=_ACCURACY_ANCHOR,
        measure=(
            "final test accuracy with BN - without, in pp (a diverged arm counts as chance); "
            f"above -{ACCURACY_MARGIN:g}: no worse"
        ),
        unit="pp",
        threshold=-ACCURACY_MARGIN,
        agree=0.8,
    ),
)

# How `batchnorm lab tune convergence` tunes (registry.Tuning's keyword arguments): each of the
# four arms on its own, over a grid wide enough for plain SGD on a sigmoid MLP (rates near 1)
# and momentum SGD on a ReLU CNN (rates near 0.03); extended by 3x while the best is at an edge.
TUNING: dict[str, Any] = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "best smoothed validation accuracy",
    "preset": "quick",
}


def summarize(config: ConvergenceConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report
    (see :func:`batchnorm.lab.experiments._convergence_summary.summarize` for the keys)."""
    return _convergence_summary.summarize(config, results, RULES)


def plot(config: ConvergenceConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures, by name: ``"curves_mlp"``, ``"curves_cnn"`` (smoothed validation
    accuracy against steps, every seed, the targets marked) and ``"speedup"`` (per seed)."""
    from ..plots_convergence import plot_curves, plot_speedup

    result = ConvergenceResult.from_seed_results(config, results, summary)
    return {
        "curves_mlp": plot_curves(result, "mlp"),
        "curves_cnn": plot_curves(result, "cnn"),
        "speedup": plot_speedup(result),
    }
