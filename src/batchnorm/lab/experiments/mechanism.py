r"""Why does BatchNorm help? Ioffe's internal covariate shift against Santurkar et al.'s smoother
landscape, measured on the same networks.

Ioffe & Szegedy (2015, Sec. 1-2) introduced BatchNorm to reduce *internal covariate shift*: as
the earlier layers learn, the distribution of a layer's input moves, and the layer has to keep
adapting to it. Santurkar, Tsipras, Ilyas & Madry ("How does batch normalization help
optimization?", NeurIPS 2018) dispute it on two counts. (1) Measured by what matters to
optimisation, how much a layer's gradient changes when the earlier layers update, BN networks
show as much shift or more (their Sec. 2.2, Fig. 3); and a BN network with noise injected after
each BN, so that every layer's input distribution moves at every step ("noisy BN"), trains about
as well as plain BN and better than no BN (Sec. 2.1, Fig. 2). (2) What BN does instead is make
the loss landscape smoother: the loss and its gradient change less along the gradient
direction (Sec. 3.1, Fig. 4). Both accounts' predictions are :data:`RULES` below, declared
before the first results; each is judged on its own, so both can fail.

Setup
-----
- Data: MNIST-1D at MNIST's size (``"mnist1d-large"``): 60,000 training sequences of 40 values,
  of which a fixed 5,000 are the validation split (tuning reads it), and 15,000 test
  sequences (only reported).
- Network: an MLP of ``depth`` = 6 hidden layers of 100 ReLU units, He initialisation, a
  10-way linear output (:func:`~batchnorm.lab.models.make_mlp`); deep enough that the earlier
  layers' updates can move a layer's input, small enough for the budget.
- Arms (one unit each, :mod:`batchnorm.lab._units`): ``none`` (no normalisation); ``bn``
  (this library's BatchNorm1d between each affine map and its ReLU); ``noisy``
  (:class:`~batchnorm.lab.models.NoisyBatchNorm1d`, strength :math:`s = 1`: after each BN, at
  every training step, each unit draws a mean :math:`\mu \sim U(-1, 1)` and a variance
  :math:`\nu \sim U(1, 2)`, and each activation :math:`y` becomes :math:`a y + b` with
  :math:`a \sim \mathcal N(1, \nu - 1 + 0.01)`, :math:`b \sim \mathcal N(\mu, \nu)`).
  Strength 1 makes the noise the size of BN's own output (unit variance): the next layer's
  input moves by about its own spread at every step, which is the "severe" shift Santurkar et
  al. meant to create; a weaker noise would test little. In eval mode the noisy arm is BN.
- Training: plain SGD, batch 60, ``steps`` per arm (quick 3,000, about 3.3 epochs; full
  10,000), each arm at its own learning rate, tuned by ``batchnorm lab tune mechanism`` on the
  validation split (best smoothed validation accuracy, seed
  :data:`~batchnorm.lab.protocol.TUNING_SEED`, never reported). Every arm of a seed starts from
  the same ``nn.Linear`` weights and sees the same mini-batches.

Measures (:mod:`._mechanism_measure`), every ``measure_every`` steps and at step 0, on a fixed
probe batch of 60 training examples, on deep copies of the network in training mode (the
trained network, its BN buffers and noise generators are never touched; a noisy arm's noise is
held fixed within one measurement):

- **Gradient-based covariate shift** (Santurkar et al., Def. 2.1), per weight layer
  :math:`i` (``fc1 .. fc6``, ``out``): :math:`G_i = \nabla_{W_i} L(\theta)` and
  :math:`G'_i = \nabla_{W_i} L(\theta_{<i} - \eta\, \nabla_{\theta_{<i}} L, \theta_{\ge i})`,
  the layer's gradient after only the earlier layers took their SGD step on this batch (its
  own and the later parameters unchanged). Recorded: :math:`\|G_i - G'_i\|`, the *relative
  shift* :math:`\|G_i - G'_i\| / \|G_i\|` and :math:`\cos(G_i, G'_i)`. The step
  :math:`\eta` = ``shift_lr`` = 0.1 is the same for every arm: the shift grows about linearly
  with the step, so measuring each arm at its own (tuned) rate would compare learning rates,
  not networks (Santurkar et al. compare both networks at one rate). To first order the ratio
  between arms does not depend on :math:`\eta`. The shift at each arm's own rate is recorded
  too and reported, not judged. ``fc1`` has no earlier layers: its shift is 0 by
  construction, and it is left out of the layer means.
- **Loss landscape along the gradient** (Santurkar et al., Sec. 3.1, Fig. 4): with
  :math:`g = \nabla L(\theta)` over all parameters and :math:`\theta_\eta = \theta - \eta g`
  for :math:`\eta \in` ``etas`` = (0.05, 0.1, 0.2, 0.4), the same absolute steps for every arm:
  the *loss range* :math:`\max_\eta L(\theta_\eta) - \min_\eta L(\theta_\eta)`; the *gradient
  predictiveness* :math:`\max_\eta \|\nabla L(\theta) - \nabla L(\theta_\eta)\|`; the
  *effective* :math:`\beta`*-smoothness*
  :math:`\max_\eta \|\nabla L(\theta) - \nabla L(\theta_\eta)\| / \|\eta g\|`. A loss that is
  not finite along the line counts as an infinite range.
- **Accuracy**: each arm's test accuracy at the end of training (eval mode).

A seed's number for a measure is its median over the measurements (robust to the first steps'
transient), for the shift of the mean over the layers ``fc2 .. out``. Each rule's effect is one
number per seed; :meth:`~batchnorm.lab.protocol.Rule.judge` makes the verdict (4 of 5 seeds).

Where the code lives: the settings in ``_mechanism_config``, the two measurements in
``_mechanism_measure``, the training of a seed (its checks, metric rows and tuning score) in
``_mechanism_training``, the arrays, effects and report in ``_mechanism_summary``, the figures
in :mod:`batchnorm.lab.plots_mechanism`. Every name in ``__all__`` is importable from here,
which the registry uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Rule
from . import _mechanism_summary
from ._mechanism_config import (
    ARMS,
    CLAIM,
    NORM_OF_ARM,
    PRESETS,
    TITLE,
    UNTUNED_LR,
    MechanismConfig,
    prepare,
    probe_steps,
    steps_per_seed,
)
from ._mechanism_measure import gradient_shift, landscape, model_loss, reseed_noise, weight_layers
from ._mechanism_summary import NOISY_MARGIN_PP, MechanismResult, effects, seed_numbers
from ._mechanism_training import (
    build_model,
    check_checkpoint,
    check_result,
    layer_names,
    metric_rows,
    probe_batch,
    run_seed,
    train_arm,
    tune_arms,
    tune_score,
    units,
)

__all__ = [
    "ARMS",
    "CLAIM",
    "CONFIG_TYPE",
    "NORM_OF_ARM",
    "NOISY_MARGIN_PP",
    "PRESETS",
    "RULES",
    "TITLE",
    "TUNING",
    "UNTUNED_LR",
    "MechanismConfig",
    "MechanismResult",
    "build_model",
    "check_checkpoint",
    "check_result",
    "effects",
    "gradient_shift",
    "landscape",
    "layer_names",
    "metric_rows",
    "model_loss",
    "plot",
    "prepare",
    "probe_batch",
    "probe_steps",
    "reseed_noise",
    "run_seed",
    "seed_numbers",
    "steps_per_seed",
    "summarize",
    "train_arm",
    "tune_arms",
    "tune_score",
    "units",
    "weight_layers",
]

CONFIG_TYPE = MechanismConfig

# The claims and their pass rules, declared before the first results of this design. Each
# effect is one number per seed, signed so that larger favours the claim; 4 of 5 seeds must
# agree (the protocol's default).
RULES: tuple[Rule, ...] = (
    # Ioffe's prediction. 1.25: a 25 % lower shift is the least we would call "reduces"; the
    # lab's other ratio rules (figure1's speed and shift) use the same bar.
    Rule(
        key="ics_ioffe",
        claim=(
            "BN reduces internal covariate shift: a layer's gradient changes less when the "
            "earlier layers update (Ioffe's account)"
        ),
        anchor="Ioffe & Szegedy 2015, Sec. 1-2; measured as Santurkar et al. 2018, Def. 2.1",
        measure=(
            "relative gradient shift |G - G'| / |G| without BN / with BN (per seed: median over "
            "training of the mean over layers fc2..out; common step 0.1 of the earlier layers)"
        ),
        unit="x",
        threshold=1.25,
    ),
    # Santurkar's prediction on the same numbers, the opposite way: BN's shift is not cut by
    # the 25 % the Ioffe rule asks for (their Fig. 3 shows as much shift with BN, or more).
    # 0.8 = 1 / 1.25, so in each seed exactly one of the two rules counts the seed for itself.
    Rule(
        key="ics_santurkar",
        claim=(
            "BN does not reduce internal covariate shift: with BN a layer's gradient changes "
            "as much when the earlier layers update (Santurkar et al.)"
        ),
        anchor="Santurkar et al. 2018, Sec. 2.2, Fig. 3",
        measure=(
            "relative gradient shift with BN / without BN (the inverse of the Ioffe rule's "
            "ratio; above 0.8: BN does not cut the shift by 25 %)"
        ),
        unit="x",
        threshold=0.8,
    ),
    # Santurkar's smoothness, three views (their Fig. 4 a-c). 1.25 as above: a landscape 25 %
    # less variable is the least we would call smoother.
    Rule(
        key="loss_range",
        claim="BN makes the loss change less along the gradient (a smoother loss landscape)",
        anchor="Santurkar et al. 2018, Sec. 3.1, Fig. 4(a)",
        measure=(
            "range of the loss at theta - eta g, eta in (0.05, 0.1, 0.2, 0.4), without BN / with "
            "BN (per seed: median over training)"
        ),
        unit="x",
        threshold=1.25,
    ),
    Rule(
        key="grad_change",
        claim="BN makes the gradient more predictive: it changes less along the gradient",
        anchor="Santurkar et al. 2018, Sec. 3.1, Fig. 4(b)",
        measure=(
            "max over eta of |grad L(theta) - grad L(theta - eta g)|, without BN / with BN "
            "(per seed: median over training)"
        ),
        unit="x",
        threshold=1.25,
    ),
    Rule(
        key="beta",
        claim="BN lowers the effective beta-smoothness of the loss",
        anchor="Santurkar et al. 2018, Sec. 3.1, Fig. 4(c)",
        measure=(
            "max over eta of |grad L(theta) - grad L(theta - eta g)| / |eta g|, without BN / "
            "with BN (per seed: median over training)"
        ),
        unit="x",
        threshold=1.25,
    ),
    # Noisy BN trains about as well as BN (Santurkar), where Ioffe's account predicts worse
    # (the noise re-creates the shift BN removes). "About as well": within 2 pp of 15,000
    # test examples (300 examples), a gap a user would notice, while the sampling noise of a
    # difference of two accuracies is ~0.5 pp, so noise alone does not decide the verdict.
    Rule(
        key="noisy_as_bn",
        claim="BN with time-varying noise after each BN (noisy BN) trains about as well as BN",
        anchor="Santurkar et al. 2018, Sec. 2.1, Fig. 2",
        measure=(
            f"final test accuracy noisy BN - BN, plus a {NOISY_MARGIN_PP:g} pp margin (above 0: "
            f"noisy BN at most {NOISY_MARGIN_PP:g} pp worse)"
        ),
        unit="pp",
        threshold=0.0,
    ),
    # 0.5 pp: 75 of the 15,000 test examples, the bar figure1's accuracy rule uses.
    Rule(
        key="noisy_above_none",
        claim="Noisy BN still trains better than no normalisation",
        anchor="Santurkar et al. 2018, Sec. 2.1, Fig. 2",
        measure="final test accuracy noisy BN - without BN",
        unit="pp",
        threshold=0.5,
    ),
)

# How `batchnorm lab tune mechanism` tunes each arm's learning rate (registry.Tuning's fields).
TUNING = {
    "arms": tune_arms,
    "score": tune_score,
    "grid": (0.01, 0.03, 0.1, 0.3, 1.0),
    "factor": 3.0,
    "hyper_parameter": "lr",
    "metric": "best smoothed validation accuracy",
    "preset": "quick",
}


def summarize(config: MechanismConfig, results: Mapping[int, dict]) -> dict:
    """Judge :data:`RULES` on a run's results: numbers, verdict rows and a printable report
    (see :func:`batchnorm.lab.experiments._mechanism_summary.summarize` for the keys)."""
    return _mechanism_summary.summarize(config, results, RULES)


def plot(config: MechanismConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures, by name: ``"shift"``, ``"shift_by_layer"``, ``"landscape"`` and
    ``"training"`` (what to see in each: the summary's ``figure_notes``)."""
    from ..plots_mechanism import plot_landscape, plot_shift, plot_shift_by_layer, plot_training

    result = MechanismResult.from_seed_results(config, results, summary)
    return {
        "shift": plot_shift(result),
        "shift_by_layer": plot_shift_by_layer(result),
        "landscape": plot_landscape(result),
        "training": plot_training(result),
    }
