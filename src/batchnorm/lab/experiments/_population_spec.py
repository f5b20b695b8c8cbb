"""The population experiment's vocabulary: its title and claim, the four sources of
inference statistics, the reference every gap is measured to, and the names of the gaps.

Constants only, and no imports: the experiment (:mod:`batchnorm.lab.experiments.population`)
and its figures (:mod:`batchnorm.lab.plots_population`) both need them, and keeping them
here lets the figures depend on them without depending on the experiment.
"""

from __future__ import annotations

__all__ = [
    "CLAIM",
    "COMPARED",
    "EARLY_FRACTION",
    "EXACT",
    "GAPS",
    "METHODS",
    "REFERENCE",
    "TITLE",
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
# which is what the layer will actually see at test time (see the docstring of
# batchnorm.lab.experiments.population).
REFERENCE = "sequential"
# The statistics whose gap to the reference is measured (the reference's gap to itself is 0).
COMPARED = ("ema", "pooled", "paper")
# "Early in training" for the lag claim: measured steps after 0 and up to this share of training
# (at least the first measured step after 0). Step 0 is left out because the EMA then still
# holds its initial values (mean 0, variance 1), which says nothing about lag.
EARLY_FRACTION = 0.1
# The two numbers statistics_gap returns, per layer.
GAPS = ("mean_shift", "log_var_ratio")
