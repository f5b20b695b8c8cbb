"""``BatchNorm1d/2d/3d``: torch.nn's layers, with the forward pass on this package's op.

Each class subclasses its torch.nn namesake, so parameters, buffers, ``state_dict`` keys,
``_version`` and its migration (a checkpoint without ``num_batches_tracked`` loads with 0),
``reset_parameters`` and ``extra_repr`` are torch's own, and ``isinstance(layer,
torch.nn.BatchNorm2d)`` keeps holding for code that looks for BatchNorm layers. What changes is
``forward``: one call into :func:`batchnorm.functional.forward_layer`, which validates before
any state is touched and runs the Numba kernels. The subclasses add no instance state, which is
what lets :func:`batchnorm.convert` switch a layer between the two implementations in place.

:class:`BatchNormBase` is the shared part, public so that other layers of the package
(SyncBatchNorm) and of users build on it.
"""

from __future__ import annotations

import torch

from . import _docs
from ._interop import register_fusers, twin_of
from ._validate import check_constructor_args, check_layer_input, check_nonfinite_policy, layer_name
from .families import Family, family_of, register
from .functional import forward_layer

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase"]


class BatchNormBase:
    """What every BatchNorm layer of this package adds to torch.nn's: checks, policy, forward.

    A mixin placed before a torch.nn BatchNorm class (``class BatchNorm2d(BatchNormBase,
    torch.nn.BatchNorm2d)``). It supplies the constructor's argument checks, the non-finite
    policy (``nonfinite`` and the count ``nonfinite_batches_skipped``) and ``forward``, a single
    call to :func:`batchnorm.functional.forward_layer`.

    Attributes:
        input_ranks: Class attribute: the input ranks the layer accepts, or ``None`` for any
            rank >= 2.
        input_shape: Class attribute: the accepted shape for messages, with a ``C`` field in
            braces that becomes ``num_features`` (for BatchNorm2d it reads ``(N, 3, H, W)``
            for 3 channels).
        nonfinite: ``"skip"`` or ``"raise"``, what a training batch with non-finite statistics
            does (see :func:`batchnorm.batch_norm`).
        nonfinite_batches_skipped: How many training batches were left out of the running
            statistics for that reason.
    """

    input_ranks: tuple[int, ...] | None
    input_shape: str
    # Class-level defaults, so that a torch.nn layer switched to our class by convert() (which
    # changes __class__ and runs no constructor) has them too.
    nonfinite: str = "skip"
    nonfinite_batches_skipped: int = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        check_constructor_args(type(self).__name__, num_features, eps, momentum)
        check_nonfinite_policy(f"{type(self).__name__}()", nonfinite)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        if nonfinite != type(self).nonfinite:
            self.nonfinite = nonfinite

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.nonfinite != BatchNormBase.nonfinite:
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # torch.nn's hook name, for code that calls it; forward_layer makes the same check. A
        # symbolic-tracing Proxy has no shape to check (torch's forward traces a root layer).
        if isinstance(input, torch.fx.Proxy):
            return
        check_layer_input(lambda: layer_name(self), self, input, _state_dtype(self))

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles instead: the torch.nn twin, same tensors.

        TorchScript cannot compile a forward that calls NumPy and Numba; the scripted layer
        computes with torch's op (this package's non-finite guard and stricter checks do not
        come along).
        """
        twin = twin_of(self, family_of(type(self)).torch)
        for name in ("nonfinite", "nonfinite_batches_skipped"):
            twin.__dict__.pop(name, None)
        return twin

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return forward_layer(self, input)


def _state_dtype(layer) -> torch.dtype | None:
    for t in (layer.weight, layer.running_mean):
        if t is not None:
            return t.dtype
    return None


class BatchNorm1d(BatchNormBase, torch.nn.BatchNorm1d):
    input_ranks = (2, 3)
    input_shape = "(N, {C}) or (N, {C}, L)"
    __doc__ = _docs.module_doc(
        name="BatchNorm1d",
        what="a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input",
        axes="the batch axis (and the length axis for 3-D input)",
        shape=":math:`(N, C)` or :math:`(N, C, L)`",
        example="torch.randn(8, 3)",
        example_shape="[8, 3]",
    )


class BatchNorm2d(BatchNormBase, torch.nn.BatchNorm2d):
    input_ranks = (4,)
    input_shape = "(N, {C}, H, W)"
    __doc__ = _docs.module_doc(
        name="BatchNorm2d",
        what="a 4-D ``(N, C, H, W)`` input",
        axes="the batch and both spatial axes",
        shape=":math:`(N, C, H, W)`, contiguous or channels_last",
        example="torch.randn(8, 3, 5, 5)",
        example_shape="[8, 3, 5, 5]",
    )


class BatchNorm3d(BatchNormBase, torch.nn.BatchNorm3d):
    input_ranks = (5,)
    input_shape = "(N, {C}, D, H, W)"
    __doc__ = _docs.module_doc(
        name="BatchNorm3d",
        what="a 5-D ``(N, C, D, H, W)`` input",
        axes="the batch and the three spatial axes",
        shape=":math:`(N, C, D, H, W)`, contiguous or channels_last_3d",
        example="torch.randn(4, 3, 2, 5, 5)",
        example_shape="[4, 3, 2, 5, 5]",
    )


# The families of the fixed-rank layers (batchnorm.families); frozen.py and distributed.py add
# their twins.
for _ours, _torch, _lazy in (
    (BatchNorm1d, torch.nn.BatchNorm1d, torch.nn.LazyBatchNorm1d),
    (BatchNorm2d, torch.nn.BatchNorm2d, torch.nn.LazyBatchNorm2d),
    (BatchNorm3d, torch.nn.BatchNorm3d, torch.nn.LazyBatchNorm3d),
):
    register(Family(_ours.__name__, _ours.input_ranks, _ours, _torch, torch_lazy=_lazy))
# torch.ao.quantization.fuse_modules finds fusion methods by exact class (see _interop).
register_fusers(
    {
        BatchNorm1d: torch.nn.BatchNorm1d,
        BatchNorm2d: torch.nn.BatchNorm2d,
        BatchNorm3d: torch.nn.BatchNorm3d,
    }
)
