"""One module per claim of the paper; :mod:`batchnorm.lab.registry` lists them.

- :mod:`~batchnorm.lab.experiments.figure1`: Figure 1, BN trains faster and keeps a sigmoid's
  input distribution stable.
"""

__all__: list[str] = []
