r"""Per-layer gradient norms of deep sigmoid and ReLU MLPs with and without BN: at
initialization over depths and batch sizes, and over a short training.

Two published claims pull in opposite directions. Ioffe & Szegedy (2015, Sec. 3.3): in
traditional deep networks gradients "explode or vanish", and "Batch Normalization helps
address these issues" (Sec. 1: the saturating sigmoid's vanishing gradients). Yang et al.
(2019, "A Mean Field Theory of Batch Normalization", ICLR): in a wide, deep, fully connected
network *without skip connections*, BN itself *causes* the gradients to explode at
initialization, whatever the activation or the weight scale; for ReLU the squared gradient
norm grows by :math:`\pi/(\pi - 1) \approx 1.467` per layer towards the input in the
large-batch limit, i.e. the norm by :math:`\sqrt{\pi/(\pi-1)} \approx 1.21`
(:data:`YANG_RATE`). They also observe that after training starts the gradients settle to a
much smaller dynamic range (their Sec. 6). Both predictions are stated as rules below and
judged on the same data.

How this reproduction measures
------------------------------
- **Networks**: :func:`batchnorm.lab.models.make_mlp` with ``depth`` hidden layers of
  ``width`` units and a linear output, sigmoid with Glorot's initialization or ReLU with He's
  (each the standard scale for its activation, so that the no-BN networks start as well as a
  practitioner would start them), without BN or with :class:`batchnorm.BatchNorm1d` between
  each affine map and its activation (:math:`\gamma = 1, \beta = 0`). A network without BN and
  its BN twin start from the same ``nn.Linear`` weights.
- **At initialization** (no training, float64 so that a vanishing gradient of
  :math:`10^{-30}` is still a number): for every depth in ``depths``, activation, norm and
  batch size in ``batch_sizes``, one forward and backward pass of the cross-entropy of one
  real training batch (examples drawn by the seed; every network of a batch size sees the
  same examples) in training mode, and per hidden layer :math:`l = 1..D` the Frobenius norm
  :math:`\|\partial L / \partial W_l\|` of its weight matrix (:func:`layer_gradient_norms`).
  From these:

  * the **first/last ratio** :math:`\|\partial L/\partial W_1\| / \|\partial L/\partial W_D\|`
    (below 1: smaller towards the input, vanishing; above 1: exploding);
  * the **growth per layer towards the input** (:func:`growth_rate`),
    :math:`\exp(-b)` for the least-squares slope :math:`b` of :math:`\log\|\partial L/\partial
    W_l\|` against :math:`l` over the interior layers :math:`2..D-1` (the first layer sees the
    raw input and the last feeds the output layer, so neither is typical of the recursion the
    theory describes). 1.21 is Yang's ReLU + BN prediction; 1 is no growth.
- **Over training**: the four arms (sigmoid/ReLU x none/BN) at ``train_depth`` x
  ``train_width``, plain SGD on mini-batches of ``train_batch`` for ``train_steps`` steps, each
  at the learning rate ``batchnorm lab tune gradients`` chose for it on the validation split
  (a seed no preset reports); every ``record_every`` updates, the per-layer norms of the
  gradient of the training batch (the gradient SGD then uses), and the validation accuracy
  every ``eval_every`` steps. All arms see the same batches.

The rules are judged at the deepest depth in ``depths``: Yang's at the largest batch size (the
theory's limit), the others at every batch size (the worst one). The claims and their pass
rules are :data:`RULES`, declared before the first results.

Where the code lives: the settings in ``_gradients_config``, the measures in
``_gradients_measure``, one seed's units (with the checks of results and checkpoints and the
tuning score) in ``_gradients_training``, the verdicts and report in ``_gradients_summary``;
the figures in :mod:`batchnorm.lab.plots_gradients`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _gradients_summary
from ._gradients_config import (
    ACTIVATIONS,
    ARMS,
    CLAIM,
    DEFAULT_LR,
    NORMS,
    PRESETS,
    TITLE,
    GradientsConfig,
    arm_name,
    prepare,
    steps_per_seed,
)
from ._gradients_measure import first_last_ratio, growth_rate, layer_gradient_norms
from ._gradients_training import (
    check_checkpoint,
    check_result,
    init_unit_name,
    metric_rows,
    plan,
    run_seed,
    train_unit_name,
    tune_arms,
    tune_score,
)

__all__ = [
    "ACTIVATIONS",
    "ARMS",
    "CLAIM",
    "CONFIG_TYPE",
    "DEFAULT_LR",
    "NORMS",
    "PRESETS",
    "RULES",
    "TITLE",
    "TUNING",
    "YANG_RATE",
    "GradientsConfig",
    "arm_name",
    "check_checkpoint",
    "check_result",
    "first_last_ratio",
    "growth_rate",
    "init_unit_name",
    "layer_gradient_norms",
    "metric_rows",
    "plan",
    "plot",
    "prepare",
    "run_seed",
    "steps_per_seed",
    "summarize",
    "train_unit_name",
    "tune_arms",
    "tune_score",
]

CONFIG_TYPE = GradientsConfig

# Yang et al. (2019): ReLU + BN's gradient norm grows by sqrt(pi / (pi - 1)) per layer towards
# the input at initialization, in the limit of large width and batch size.
YANG_RATE = math.sqrt(math.pi / (math.pi - 1.0))

RULES: tuple[Rule, ...] = (
    # Vanishing, as the claim is usually meant: with one learning rate for every layer, a
    # first layer whose gradient is 100x smaller than the last's learns 100x slower. A bar of
    # 10x would be too close to what the boundary layers alone can give (the first layer sees
    # the 40 raw inputs, the others hundreds of hidden units).
    Rule(
        key="sigmoid_vanishes",
        claim="Deep sigmoid networks without BN have vanishing gradients at initialization",
        anchor="Ioffe & Szegedy 2015, Sec. 1 (saturating sigmoid); Glorot & Bengio 2010",
        measure=(
            "-log10(|dL/dW_1| / |dL/dW_D|), sigmoid without BN (Glorot init), deepest depth, "
            "smallest over batch sizes; above 2: the first layer's gradient below 1/100 of the "
            "last's"
        ),
        unit="decades",
        threshold=2.0,
    ),
    # "Removes" the vanishing: the first layer's gradient within one order of magnitude of the
    # last's, the same factor of 10 the explosion rule below allows the other way.
    Rule(
        key="bn_removes_vanishing",
        claim="BN removes the vanishing gradients of deep sigmoid networks at initialization",
        anchor="Ioffe & Szegedy 2015, Sec. 3.3 (BN helps with gradients that vanish)",
        measure=(
            "log10(|dL/dW_1| / |dL/dW_D|), sigmoid with BN, deepest depth, smallest over "
            "batch sizes; above -1: the first layer's gradient at least 1/10 of the last's"
        ),
        unit="decades",
        threshold=-1.0,
    ),
    # Yang's prediction. 1.1 is the geometric midpoint (1.1005) of no growth (1) and Yang's
    # 1.21, rounded: a seed counts for the prediction when its rate is nearer 1.21 than 1 on a
    # log scale. Judged at the largest batch size, since 1.21 is the large-batch limit.
    Rule(
        key="yang_relu_explodes",
        claim=(
            "BN causes exploding gradients at initialization: a deep ReLU + BN network's "
            "gradient grows towards the input by ~sqrt(pi/(pi-1)) = 1.21 per layer"
        ),
        anchor="Yang et al. 2019, A Mean Field Theory of Batch Normalization (ICLR)",
        measure=(
            "growth per layer towards the input of |dL/dW_l| (exp of minus the slope of "
            "log|dL/dW_l| over the interior layers), ReLU with BN, deepest depth, largest batch "
            "size; above 1.1"
        ),
        unit="x/layer",
        threshold=1.1,
    ),
    # The seed's claim on the same data. Exploding as the claim means it: the first layer's
    # gradient more than 10x the last's (so one learning rate is 10x too large for it).
    Rule(
        key="bn_prevents_explosion",
        claim="BN keeps the gradients of deep ReLU networks from exploding at initialization",
        anchor="Ioffe & Szegedy 2015, Sec. 3.3 (BN helps with gradients that explode)",
        measure=(
            "-log10(|dL/dW_1| / |dL/dW_D|), ReLU with BN, deepest depth, smallest over batch "
            "sizes; above -1: the first layer's gradient at most 10x the last's"
        ),
        unit="decades",
        threshold=-1.0,
    ),
    # "Helps" read as a comparison with the same network without BN, started as a
    # practitioner would (He init). Half a decade (a factor ~3 nearer to an even spread) is the
    # least a reader of a log-scale per-layer plot would call evened out.
    Rule(
        key="bn_evens_relu",
        claim=(
            "BN evens out a deep ReLU network's per-layer gradients compared with the same "
            "network without BN (He init)"
        ),
        anchor="Ioffe & Szegedy 2015, Sec. 3.3, against He et al. 2015's initialization",
        measure=(
            "|log10(|dL/dW_1| / |dL/dW_D|)| without BN minus with BN, ReLU, deepest depth, "
            "smallest over batch sizes; above 0.5 decades"
        ),
        unit="decades",
        threshold=0.5,
    ),
    # Yang's Sec. 6 observation, on the training part. Half a decade as above: the dynamic
    # range first/last must shrink by a factor ~3 or more for "dramatically smaller".
    Rule(
        key="yang_settles",
        claim=(
            "Once training starts, a ReLU + BN network's per-layer gradients settle to a much "
            "smaller dynamic range than at initialization"
        ),
        anchor="Yang et al. 2019, Sec. 6 (learning dynamics)",
        measure=(
            "|log10 first/last| of the training gradient at update 0 minus the median over the "
            "records of the second half of training, ReLU with BN at train_depth; above 0.5 "
            "decades"
        ),
        unit="decades",
        threshold=0.5,
    ),
)

# How `batchnorm lab tune gradients` tunes each training arm's learning rate (the measurements
# at initialization need none).
TUNING: dict[str, Any] = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.01, 0.03, 0.1, 0.3, 1.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "best smoothed validation accuracy",
    "preset": "quick",
}


def summarize(config: GradientsConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: the numbers, the verdict rows and a printable
    report (see :func:`batchnorm.lab.experiments._gradients_summary.summarize`)."""
    return _gradients_summary.summarize(config, results, RULES)


def plot(config: GradientsConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures, by name: ``"profile"`` (per-layer gradient norm against layer at
    init), ``"growth"`` (growth per layer against batch size) and ``"training"`` (the
    first/last ratio over training); what to see in each: the summary's ``figure_notes``."""
    from ..plots_gradients import plot_growth, plot_profile, plot_training

    return {
        "profile": plot_profile(config, results),
        "growth": plot_growth(config, results),
        "training": plot_training(config, results),
    }
