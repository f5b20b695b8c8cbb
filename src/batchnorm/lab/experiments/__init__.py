"""One module per claim of the paper; :mod:`batchnorm.lab.registry` lists them.

- :mod:`~batchnorm.lab.experiments.figure1`: Figure 1, BN trains faster and keeps a sigmoid's
  input distribution stable.
- :mod:`~batchnorm.lab.experiments.population`: inference statistics, the running averages
  against an exact pass over the training set (Algorithm 2).
"""

__all__: list[str] = []
