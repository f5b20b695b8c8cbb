r"""Anatomy of one BatchNorm layer: a trained network's hidden layer on one real batch, step by
step as a textbook explains it, and what BN does *not* do to the values.

Ioffe & Szegedy (2015), Sec. 3 and Algorithm 1: for each unit :math:`k` of a mini-batch
:math:`\{x_1 \ldots x_m\}`, BN computes the batch mean and the biased batch variance,

.. math::
    \mu_B = \frac{1}{m}\sum_i x_i, \qquad \sigma_B^2 = \frac{1}{m}\sum_i (x_i - \mu_B)^2,
    \qquad \hat{x}_i = \frac{x_i - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}},
    \qquad y_i = \gamma\,\hat{x}_i + \beta,

so that :math:`\hat{x}` has mean 0 and variance exactly
:math:`\sigma_B^2 / (\sigma_B^2 + \epsilon)` over the batch, and :math:`y` mean
:math:`\beta` and variance :math:`\gamma^2 \sigma_B^2 / (\sigma_B^2 + \epsilon)`. The map from
:math:`x` to :math:`\hat{x}` is affine per unit: it moves and rescales a unit's values, and
leaves the *shape* of their distribution (skewness, kurtosis, modes) exactly as it was. A
common reading says more: that BN makes each unit's values Gaussian (CS231n's course notes:
BN forces the activations "to take on a unit gaussian distribution"). This experiment measures
both.

How this reproduction measures
------------------------------
- **Networks** (per seed): two MLPs with BN between each affine map and its nonlinearity
  (:func:`batchnorm.lab.models.make_mlp`, ``depth`` hidden layers of ``hidden`` units,
  :class:`batchnorm.BatchNorm1d` with torch's ``eps = 1e-5``): one with ReLU (He init) and one
  with sigmoid (Glorot init), trained with plain SGD on mini-batches of ``batch_size`` for
  ``steps`` steps on MNIST-1D, each at the learning rate ``batchnorm lab tune anatomy`` chose
  for it on the validation split (a seed no preset reports). The rules are about a *trained*
  layer, so a short training that gets well above chance suffices.
- **One real batch**: ``measure_batch`` training examples drawn by the seed (the same examples
  for both networks), passed once through a copy of each trained network in training mode,
  so every BN layer normalises with this batch's own statistics. A forward hook keeps each
  BN layer's input :math:`x` (float32, what the layer saw) and output :math:`y`.
- **Per unit** of every hidden layer, in float64:

  * the batch mean and biased variance of :math:`x`, and the *layer's own* batch statistics,
    read from a copy of the layer run on the same input with ``momentum = 1`` and fresh
    buffers (its running mean is then :math:`\mu_B`, its running variance the unbiased
    :math:`\frac{m}{m-1}\sigma_B^2`, torch's convention);
  * :math:`\hat{x}` two ways: computed from :math:`x` by the formula above
    (:func:`standardize`, which equals ``torch.nn.functional.batch_norm`` without affine), and
    *the layer's*, :math:`(y - \beta)/\gamma` (what the network actually computed);
  * of the layer's :math:`\hat{x}`: its mean, its variance against
    :math:`\sigma_B^2/(\sigma_B^2+\epsilon)`, the share of values with
    :math:`|\hat{x}| \le 1` (a standard normal: :math:`P(|Z| \le 1) = 0.6827`), the skewness
    :math:`E[z^3]` and the excess kurtosis :math:`E[z^4] - 3` of its values standardised by
    their own mean and (biased) standard deviation; the same moments of :math:`x`;
  * :math:`\gamma` and :math:`\beta`, the output's mean and standard deviation.

  A unit *looks Gaussian* (:func:`looks_gaussian`) when its share within :math:`\pm 1` is
  within :data:`SHARE_TOLERANCE` of 0.6827 and :math:`|\text{skew}| <` :data:`SKEW_TOLERANCE`.
  At a batch of 256, a unit whose values *are* Gaussian passes with probability about 0.99
  (simulated: the share's standard deviation is 0.020, below the binomial 0.029 because the
  window :math:`\pm 1` is set by the sample's own mean and standard deviation, so 0.05 is 2.5
  of them; the skew's is :math:`\sqrt{6/256} = 0.15`, so 0.5 is 3.3), and an exponential unit
  (skew 2) fails. The same test on the input :math:`x` (standardised by its own mean and
  standard deviation) is the report's "before BN" column: BN cannot change its outcome, so a
  layer whose :math:`\hat{x}` looks Gaussian already had Gaussian-looking inputs.
- The rules are judged on every hidden layer (``standardizes``, ``shape_kept``) or on hidden
  layer ``layer`` (``gaussian``) of both networks; the report lists every layer.

The claims and their pass rules are :data:`RULES`, declared before the first results.

Where the code lives: the settings in ``_anatomy_config``, the measures (pure functions of
tensors) in ``_anatomy_measure``, training and measuring one seed (with the checks of results
and checkpoints, and the tuning score) in ``_anatomy_training``, the verdicts and report in
``_anatomy_summary``; the figures in :mod:`batchnorm.lab.plots_anatomy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _anatomy_summary
from ._anatomy_config import (
    ACTIVATIONS,
    CLAIM,
    DEFAULT_LR,
    GAUSSIAN_SHARE,
    PRESETS,
    TITLE,
    AnatomyConfig,
    prepare,
    steps_per_seed,
)
from ._anatomy_measure import (
    SHARE_TOLERANCE,
    SKEW_TOLERANCE,
    excess_kurtosis,
    layer_batch_statistics,
    looks_gaussian,
    measure_layer,
    moments,
    share_within_one,
    skewness,
    standardize,
)
from ._anatomy_training import (
    check_checkpoint,
    check_result,
    metric_rows,
    plan,
    run_seed,
    tune_arms,
    tune_score,
)

__all__ = [
    "ACTIVATIONS",
    "CLAIM",
    "CONFIG_TYPE",
    "DEFAULT_LR",
    "GAUSSIAN_SHARE",
    "GAUSSIAN_UNITS_THRESHOLD",
    "PRESETS",
    "RULES",
    "SHARE_TOLERANCE",
    "SKEW_TOLERANCE",
    "STANDARDIZE_DIGITS",
    "TITLE",
    "TUNING",
    "AnatomyConfig",
    "check_checkpoint",
    "check_result",
    "excess_kurtosis",
    "layer_batch_statistics",
    "looks_gaussian",
    "measure_layer",
    "metric_rows",
    "moments",
    "plan",
    "plot",
    "prepare",
    "run_seed",
    "share_within_one",
    "skewness",
    "standardize",
    "steps_per_seed",
    "summarize",
    "tune_arms",
    "tune_score",
]

CONFIG_TYPE = AnatomyConfig

# The by-construction rules' bar: every deviation below 10^-4, i.e. an effect -log10(worst)
# above 4. Why this bar: the layer computes in float32 (unit roundoff 6e-8), and a float32
# mean or variance of a batch of up to a thousand values is off by well under 1e-5 relative;
# so a correct layer passes with a margin of more than ten. The mistakes it must catch fail it
# by a factor of ten or more: normalising with the unbiased variance (the makemore notebooks'
# choice) puts var(x_hat) off by 1/(m - 1), 3.9e-3 at m = 256; normalising with the running
# statistics (inference mode) or an eps of 1e-3 instead of 1e-5 is off by far more.
STANDARDIZE_DIGITS = 4.0
# The misreading's bar: at least 75 % of the layer's units must look Gaussian. A layer of truly
# Gaussian units would show about 99 % at a batch of 256 (see the module docstring), so 75 %
# is met with room to spare if the claim is true; a layer where a quarter of the units visibly
# are not Gaussian does not make "BN makes each unit's values Gaussian" true.
GAUSSIAN_UNITS_THRESHOLD = 0.75

RULES: tuple[Rule, ...] = (
    Rule(
        key="standardizes",
        claim=(
            "BN standardizes each unit over the batch: x_hat has mean 0 and variance "
            "sigma^2/(sigma^2+eps), with the batch's own mean and biased variance"
        ),
        anchor="Ioffe & Szegedy 2015, Sec. 3, Algorithm 1",
        measure=(
            "-log10 of the worst deviation over every unit of every hidden layer of both "
            "networks: |mean x_hat|, |var x_hat - sigma^2/(sigma^2+eps)| (x_hat = (y - beta)/"
            "gamma, the layer's output), and the layer's batch mean and variance vs the "
            "formula's (in units of sqrt(sigma^2+eps) and sigma^2+eps); above 4: every "
            "deviation below 1e-4"
        ),
        unit="-log10",
        threshold=STANDARDIZE_DIGITS,
    ),
    Rule(
        key="shape_kept",
        claim=(
            "BN changes only each unit's location and scale, not the shape of its "
            "distribution: x_hat's skewness and excess kurtosis are the input's"
        ),
        anchor="Ioffe & Szegedy 2015, Algorithm 1 (an affine map per unit)",
        measure=(
            "-log10 of the worst over every unit of every hidden layer of both networks of "
            "|skew(x_hat) - skew(x)| and |kurt(x_hat) - kurt(x)|, each divided by max(1, |the "
            "input's value|), x_hat from the layer's output; above 4: every deviation below 1e-4"
        ),
        unit="-log10",
        threshold=STANDARDIZE_DIGITS,
    ),
    Rule(
        key="gaussian",
        claim=(
            "BN makes each unit's values Gaussian: x_hat within +-1 as often as a standard "
            "normal (68.3 %) and symmetric (the common reading, not the paper's claim)"
        ),
        anchor=(
            "CS231n course notes (BN makes activations 'take on a unit gaussian "
            "distribution'); the paper claims only zero mean and unit variance (Sec. 3)"
        ),
        measure=(
            f"share of the units of hidden layer `layer` (both networks) whose x_hat has "
            f"|P(|x_hat| <= 1) - 0.683| < {SHARE_TOLERANCE:g} and |skew| < {SKEW_TOLERANCE:g}"
        ),
        unit="share",
        threshold=GAUSSIAN_UNITS_THRESHOLD,
    ),
)

# How `batchnorm lab tune anatomy` tunes each network's learning rate (its score: the best
# smoothed validation accuracy of the training run alone; the measurement needs no tuning).
TUNING: dict[str, Any] = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.03, 0.1, 0.3, 1.0, 3.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "best smoothed validation accuracy",
    "preset": "quick",
}


def summarize(config: AnatomyConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: the numbers, the verdict rows and a printable
    report (see :func:`batchnorm.lab.experiments._anatomy_summary.summarize`)."""
    return _anatomy_summary.summarize(config, results, RULES)


def plot(config: AnatomyConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures, by name: ``"histograms"`` (raw input, x_hat and output of a few
    units with the Gaussian density), ``"shape"`` (per-unit share within +-1 and skew against
    the Gaussian's) and ``"affine"`` (gamma and beta); what to see in each: the summary's
    ``figure_notes``."""
    from ..plots_anatomy import plot_affine, plot_histograms, plot_shape

    return {
        "histograms": plot_histograms(config, results),
        "shape": plot_shape(config, results),
        "affine": plot_affine(config, results),
    }
