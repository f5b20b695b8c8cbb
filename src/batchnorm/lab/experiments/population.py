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

Where the code lives: every name in ``__all__`` is importable from this module, which the
registry uses, and is defined in a private module with one job each: the vocabulary
(:data:`METHODS`, :data:`REFERENCE`, ...) in ``_population_spec``, the settings in
``_population_config``, one measurement in ``_population_measure``, the training of one seed
(and the checks of its checkpoints and results) in ``_population_training``, a run as arrays
in ``_population_result`` and the verdict in ``_population_summary``. The figures are in
:mod:`batchnorm.lab.plots_population`, which imports only the vocabulary; :func:`plot` imports
them when called, as figure1 does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._population_config import PRESETS, PopulationConfig, prepare, steps_per_seed
from ._population_measure import measure_statistics, statistics_batches, statistics_gap
from ._population_result import PopulationResult
from ._population_spec import (
    CLAIM,
    COMPARED,
    EARLY_FRACTION,
    EXACT,
    GAPS,
    METHODS,
    REFERENCE,
    TITLE,
)
from ._population_summary import summarize
from ._population_training import check_checkpoint, check_result, metric_rows, run_seed

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
    "check_checkpoint",
    "check_result",
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


def plot(config: PopulationConfig, results: Mapping[int, dict], summary: dict) -> dict[str, Any]:
    """The run's figures: one, ``"population"``.

    See :func:`batchnorm.lab.plots_population.plot_population` for its six panels.
    """
    from ..plots_population import plot_population

    return {
        "population": plot_population(PopulationResult.from_seed_results(config, results, summary))
    }
