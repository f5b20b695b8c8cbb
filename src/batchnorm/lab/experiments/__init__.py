"""One module per claim of the paper; :mod:`batchnorm.lab.registry` lists them.

- :mod:`~batchnorm.lab.experiments.figure1`: Figure 1, BN trains faster and keeps a sigmoid's
  input distribution stable.
- :mod:`~batchnorm.lab.experiments.population`: inference statistics, the running averages
  against an exact pass over the training set (Algorithm 2).
- :mod:`~batchnorm.lab.experiments.anatomy`: one trained BN layer on one real batch, step by
  step (standardized, not made Gaussian).
- :mod:`~batchnorm.lab.experiments.convergence`: steps to a validation target with and without
  BN (MLP and 1-D CNN).
- :mod:`~batchnorm.lab.experiments.learning_rate`: a learning-rate sweep, the largest stable
  rate and the effective rate lr/||W||^2.
- :mod:`~batchnorm.lab.experiments.initialization`: the initial weight scale at a fixed rate.
- :mod:`~batchnorm.lab.experiments.regularization`: train/test gap with dropout, BN, both and
  ghost BN.
- :mod:`~batchnorm.lab.experiments.batch_size`: test error from batch 64 down to 2 for BN,
  GroupNorm, batch renorm, ghost BN and none.
- :mod:`~batchnorm.lab.experiments.gradients`: per-layer gradient norms of deep networks
  (vanishing sigmoid gradients; Yang et al.'s explosion with ReLU + BN).
- :mod:`~batchnorm.lab.experiments.mechanism`: Santurkar et al.'s gradient-based covariate
  shift, noisy BN and the smoothness of the loss along the gradient.
"""

__all__: list[str] = []
