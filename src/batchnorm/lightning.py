"""Synchronized BatchNorm on CPU under PyTorch Lightning: :class:`SyncBatchNormPlugin`.

``Trainer(sync_batchnorm=True)`` alone swaps every BatchNorm layer for
``torch.nn.SyncBatchNorm``, which refuses CPU modules. Give the trainer this plugin and the
layers become :class:`batchnorm.SyncBatchNorm` instead, which runs on CPU (gloo) and on GPUs::

    from lightning.pytorch import Trainer
    from batchnorm.lightning import SyncBatchNormPlugin

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp",
                      sync_batchnorm=True, plugins=[SyncBatchNormPlugin()])

Lightning calls :meth:`SyncBatchNormPlugin.apply` when a multi-process strategy (DDP and its
relatives) sets up for ``fit``, after the process group exists, and
:meth:`SyncBatchNormPlugin.revert` when it tears down, so the model you get back after
``fit`` has its original layer classes. Checkpoints written meanwhile hold the usual BatchNorm
keys (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``): they
load into ``batchnorm.BatchNorm*d`` and into ``torch.nn.BatchNorm*d`` alike. One process
(``devices=1``) applies no layer sync at all.

Lightning is an optional dependency: ``pip install "batchnorm[lightning]"``. Importing
``batchnorm`` never imports it; importing this module without it raises
``ModuleNotFoundError`` saying what to install.
"""

from __future__ import annotations

from typing import Any

from torch.nn import Module

try:
    from lightning.pytorch.plugins import TorchSyncBatchNorm
except ImportError as err:
    raise ModuleNotFoundError(
        "batchnorm.lightning: expected the lightning package (PyTorch Lightning 2.x) to be "
        'installed, got none. Install the extra: pip install "batchnorm[lightning]".',
        name="lightning",
    ) from err

from .tools.convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["SyncBatchNormPlugin"]


# A subclass of Lightning's TorchSyncBatchNorm, not only of its base LayerSync: Lightning 2.x
# refuses `sync_batchnorm=True` together with any other LayerSync plugin ("Choose one or the
# other"), and accepts it with a TorchSyncBatchNorm. Both spellings then work:
# `Trainer(sync_batchnorm=True, plugins=[SyncBatchNormPlugin()])` and
# `Trainer(plugins=[SyncBatchNormPlugin()])`.
class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """A Lightning ``LayerSync`` plugin that puts :class:`batchnorm.SyncBatchNorm` in, and out.

    :meth:`apply` is :func:`batchnorm.convert_sync_batchnorm`: ``torch.nn.BatchNorm1d/2d/3d``,
    ``torch.nn.SyncBatchNorm`` and ``batchnorm.BatchNorm1d/2d/3d`` layers become
    :class:`batchnorm.SyncBatchNorm` in place (same module and Parameter objects, buffers and
    hooks), each remembering its class; an activated layer (``batchnorm.BatchNormAct*d``) is
    split into ``Sequential(layer, activation)``. :meth:`revert` is
    :func:`batchnorm.revert_sync_batchnorm`: every layer gets its original class back. Every
    synchronized layer normalises with the mean and variance of the global batch (all ranks'
    shards together), so the running statistics are the same on every rank and equal to those
    of one process fed the whole batch.

    Args:
        process_group: The group to synchronize over; ``None`` (the default) for the world
            group Lightning creates.

    Raises:
        TypeError: From :meth:`apply`, if the model holds a BatchNorm-like layer that cannot
            be converted without dropping behaviour (a subclass of a BatchNorm class, an
            uninitialized lazy layer); nothing is converted then. See
            :func:`batchnorm.convert_sync_batchnorm`.
    """

    def __init__(self, process_group: Any = None) -> None:
        super().__init__()
        self.process_group = process_group

    def apply(self, model: Module) -> Module:
        """Make every BatchNorm layer of ``model`` a :class:`batchnorm.SyncBatchNorm`, in place.

        Returns:
            ``model`` itself (the LightningModule Lightning passes in), converted.
        """
        return convert_sync_batchnorm(model, self.process_group)

    def revert(self, model: Module) -> Module:
        """Turn every :class:`batchnorm.SyncBatchNorm` of ``model`` back, in place.

        Layers converted by :meth:`apply` get their original class back; see
        :func:`batchnorm.revert_sync_batchnorm` for layers built as ``SyncBatchNorm``.

        Returns:
            ``model`` itself, reverted.
        """
        return revert_sync_batchnorm(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process_group={self.process_group!r})"
