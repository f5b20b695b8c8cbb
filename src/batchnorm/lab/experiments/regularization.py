r"""Regularization: does BatchNorm narrow the gap between training and test accuracy, and does
dropout still add anything on top of it?

Ioffe & Szegedy (2015), Sec. 3.4 ("Batch Normalization regularizes the model"): since a
training example is normalised with the statistics of the other examples in its mini-batch,
the network no longer produces a deterministic output for it, which the authors found
"advantageous to the generalization of the network"; "in a batch-normalized network, we found
that Dropout can be either removed or reduced in strength". Sec. 4.2.1 ("Remove Dropout"):
removing dropout from BN-Inception "speeds up training, without increasing overfitting". Li
et al. (2019, "Understanding the disharmony between dropout and batch normalization by variance
shift") explain why dropout *before* a BN layer hurts (BN's inference statistics no longer match
what training saw) and advise dropout only after the last BN layer. Hoffer, Hubara & Soudry
(2017, "Train longer, generalize better", Sec. 4, Algorithm 1) normalise each ghost batch, a
small slice of the mini-batch, with its own statistics, and find it generalises better than BN
over the whole (large) batch.

How this reproduction measures
------------------------------
- **An over-fitting setup.** MNIST-1D's small version (``"mnist1d"``: 4,000 training sequences
  of 40 values, 1,000 test); a fixed 500 of the training sequences are the validation split
  the tuning reads, 3,500 are trained on. The network is an MLP of 3 hidden layers of 256
  ReLU units (He initialisation), far more parameters (~144k) than training examples, trained
  with SGD (momentum 0.9) on mini-batches of 64 for a fixed number of steps (``quick``: 2,500,
  ~46 epochs; ``full``: 7,000, ~128 epochs), long enough for the unregularised network to fit
  its training set (the report prints its training accuracy).
- **Arms** (every arm starts from the same linear weights and sees the same mini-batches):

  - ``none``: no normalisation, no dropout;
  - ``dropout``: dropout with :math:`p = 0.5` after every hidden layer (Srivastava et al.
    2014's rate for hidden units);
  - ``bn``: BatchNorm between each affine map and its ReLU;
  - ``bn+dropout``: BN, and dropout (:math:`p = 0.5`) after the last hidden layer only, i.e.
    after every BN layer, as Li et al. (2019) advise;
  - ``ghost``: ghost BN (:class:`batchnorm.GhostBatchNorm1d`), each mini-batch of 64 in 4
    ghost batches of 16, in place of BN.

  Each arm's learning rate was chosen by ``batchnorm lab tune regularization`` on the
  validation split (seed :data:`~batchnorm.lab.protocol.TUNING_SEED`, never reported) as the
  one with the best final validation accuracy (mean of the last ``smooth`` measurements: the
  arms are judged at the end of training, with no early stopping); the presets read it from the
  tuned file and never tune. The dropout masks come from a generator seeded per seed and arm.
- **Measured** at the end of training, in eval mode (dropout off, BN on its running
  statistics): the training accuracy :math:`a_\text{train}` on the 3,500 training sequences,
  the test accuracy :math:`a_\text{test}`, the **gap**
  :math:`g = a_\text{train} - a_\text{test}` (percentage points), and the test loss (mean
  cross-entropy); every ``eval_every`` steps, the validation accuracy (the curves). A diverged
  arm (non-finite loss) has no final numbers: its test accuracy counts as chance (10 %) in the
  accuracy rules and it is left out of the gap rule (reported as missing).

The claims and their pass rules are :data:`RULES`, declared before the first results (see
:mod:`batchnorm.lab.protocol` for how a verdict is reached; one test example is 0.1 pp):

- ``gap``: BN's gap is at least 2 pp smaller than no-BN's (Sec. 3.4);
- ``accuracy``: BN's test accuracy is at least 1 pp above no-BN's (Sec. 3.4);
- ``dropout_helps``: dropout raises the test accuracy of the network *without* BN by at least
  1 pp: the premise that makes "BN reduces the need for dropout" say something;
- ``dropout_unneeded``: BN reduces the need for dropout: adding dropout (after the last BN) to
  BN gains less than 1 pp of test accuracy. *Held* supports Ioffe & Szegedy (Sec. 3.4, 4.2.1);
  *not held* means dropout still adds at least 1 pp on top of BN, which is what Li et al.'s
  placement is meant to allow;
- ``ghost``: ghost BN's test accuracy is above BN's (Hoffer et al. 2017). Here the batch is
  small (64) and the ghost batches smaller still (16): the rule asks whether the extra noise of
  smaller normalisation batches regularises in this regime.

Where the code lives: every name in ``__all__`` is importable from this module, which the
registry uses. The settings are in ``_regularization_config``, the training of one seed (with
the checks of its results and checkpoints, and the tuning score) in
``_regularization_training``, the measures, verdicts and report in ``_regularization_summary``;
the figures in :mod:`batchnorm.lab.plots_regularization`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _regularization_summary
from ._regularization_config import (
    ARMS,
    CLAIM,
    DATASETS,
    PRESETS,
    TITLE,
    UNTUNED_LR,
    RegularizationConfig,
    arm_model_options,
    prepare,
    steps_per_seed,
    units,
)
from ._regularization_summary import RegularizationResult, gap_pp
from ._regularization_training import (
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
    "ACCURACY_THRESHOLD",
    "ARMS",
    "CLAIM",
    "CONFIG_TYPE",
    "DATASETS",
    "GAP_THRESHOLD",
    "PRESETS",
    "RULES",
    "TITLE",
    "TUNING",
    "UNTUNED_LR",
    "RegularizationConfig",
    "RegularizationResult",
    "arm_model_options",
    "build_model",
    "check_checkpoint",
    "check_result",
    "gap_pp",
    "metric_rows",
    "plot",
    "prepare",
    "run_seed",
    "steps_per_seed",
    "summarize",
    "train_arm",
    "tune_arms",
    "tune_score",
    "units",
]

CONFIG_TYPE = RegularizationConfig

# The gap bar, in percentage points: the binomial standard deviation of one arm's accuracy on
# the 1,000 test sequences is about 1.5 pp (at 65 %), so a seed counts for "BN narrows the gap"
# only when the narrowing exceeds one arm's test-set noise; it is a few per cent of the ~30 pp
# gap an over-fitted MLP shows on MNIST-1D, the least a practitioner would call regularization.
GAP_THRESHOLD = 2.0
# The bar of every "X is better than Y by" accuracy rule, in percentage points: 10 of the 1,000
# test sequences. Both arms are scored on the same test sequences, so their difference is less
# noisy than one arm's accuracy; the 4-of-5 agreement guards against the rest.
ACCURACY_THRESHOLD = 1.0

_REGULARIZES = (
    "Ioffe & Szegedy 2015, Sec. 3.4: BN regularizes the model, advantageous to generalization"
)

RULES: tuple[Rule, ...] = (
    Rule(
        key="gap",
        claim=f"BN narrows the train/test accuracy gap (by at least {GAP_THRESHOLD:g} pp)",
        anchor=_REGULARIZES,
        measure=(
            "gap without BN - gap with BN, gap = final train accuracy - test accuracy (eval "
            "mode), in pp"
        ),
        unit="pp",
        threshold=GAP_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="accuracy",
        claim=f"BN raises the test accuracy of an over-fitting MLP (by at least "
        f"{ACCURACY_THRESHOLD:g} pp)",
        anchor=_REGULARIZES,
        measure="final test accuracy with BN - without, in pp",
        unit="pp",
        threshold=ACCURACY_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="dropout_helps",
        claim=f"Dropout raises the test accuracy of the network without BN (by at least "
        f"{ACCURACY_THRESHOLD:g} pp): the premise of 'BN reduces the need for dropout'",
        anchor="Srivastava et al. 2014 (dropout, p = 0.5 for hidden units)",
        measure="final test accuracy with dropout (every hidden layer) - without, no BN, in pp",
        unit="pp",
        threshold=ACCURACY_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="dropout_unneeded",
        claim=f"BN reduces the need for dropout: dropout after the last BN adds less than "
        f"{ACCURACY_THRESHOLD:g} pp of test accuracy (not held: dropout still helps, as Li "
        "et al. 2019's placement allows)",
        anchor=(
            "Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1 (Remove Dropout); against: Li et al. "
            "2019 (dropout after the last BN)"
        ),
        measure=(
            f"final test accuracy of BN - of BN + dropout (last layer), in pp; above "
            f"-{ACCURACY_THRESHOLD:g}: dropout adds less than {ACCURACY_THRESHOLD:g} pp"
        ),
        unit="pp",
        threshold=-ACCURACY_THRESHOLD,
        agree=0.8,
    ),
    Rule(
        key="ghost",
        claim="Ghost BN (ghost batches of 16) reaches a higher test accuracy than BN",
        anchor="Hoffer, Hubara & Soudry 2017, Sec. 4, Algorithm 1 (Ghost Batch Normalization)",
        measure="final test accuracy with ghost BN - with BN, in pp; above 0: ghost BN better",
        unit="pp",
        # The claim is the sign: any improvement, in 4 of 5 seeds.
        threshold=0.0,
        agree=0.8,
    ),
)

# How `batchnorm lab tune regularization` tunes (registry.Tuning's keyword arguments): each arm
# on its own, over rates around the usual 0.03 of momentum SGD for a ReLU MLP, extended by 3x
# while the best is at an edge.
TUNING: dict[str, Any] = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.003, 0.01, 0.03, 0.1, 0.3),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "final validation accuracy (mean of the last `smooth` measurements)",
    "preset": "quick",
}


def summarize(config: RegularizationConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report
    (see :func:`batchnorm.lab.experiments._regularization_summary.summarize` for the keys)."""
    return _regularization_summary.summarize(config, results, RULES)


def plot(
    config: RegularizationConfig, results: Mapping[int, dict], summary: dict
) -> dict[str, Any]:
    """The run's figures, by name: ``"accuracy"`` (train and test accuracy per arm),
    ``"gap"`` (the gap per arm) and ``"curves"`` (validation accuracy over training)."""
    from ..plots_regularization import plot_accuracy, plot_curves, plot_gap

    result = RegularizationResult.from_seed_results(config, results, summary)
    return {
        "accuracy": plot_accuracy(result),
        "gap": plot_gap(result),
        "curves": plot_curves(result),
    }
