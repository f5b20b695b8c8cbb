"""Tools that work on whole models; their public names are exported by ``batchnorm`` itself.

- :mod:`.convert`: switch BatchNorm layers between torch.nn's classes and ours.
- :mod:`.freeze`: freeze BatchNorm layers into fixed affine transforms, and back.
- :mod:`.fold`: fold BatchNorm into the Conv/Linear layer before it, for inference.
- :mod:`.population`: recompute running statistics exactly over a dataset.
- :mod:`.accumulate`: one running update for the micro-batches of an accumulated step.
- :mod:`.fuse`: fuse (BatchNorm, activation) pairs into ``batchnorm.BatchNormAct*d`` layers.

Only :func:`~batchnorm.tools.accumulate.accumulate_statistics` and
:func:`~batchnorm.tools.fuse.fuse_activations` are re-exported here: a function named like its
submodule (``fold`` in ``fold.py``) would shadow the submodule as an attribute of this package,
and ``import batchnorm.tools.fold as m`` would then give the function.
"""

# Every tool reads the family table (batchnorm.families), which each layer module fills when
# it is imported: import them all before any tool runs.
from .. import activated, distributed, frozen, inplace, lazy, modules, variants  # noqa: F401
from .accumulate import accumulate_statistics
from .fuse import fuse_activations

__all__ = ["accumulate_statistics", "fuse_activations"]
