"""``BatchNorm1d/2d/3d``: torch.nn's layers, with the forward pass on this package's op.

Each class subclasses its torch.nn namesake, so parameters, buffers, ``state_dict`` keys,
``_version`` and its migration (a checkpoint without ``num_batches_tracked`` loads with 0),
``reset_parameters`` and ``extra_repr`` are torch's own, and ``isinstance(layer,
torch.nn.BatchNorm2d)`` keeps holding for code that looks for BatchNorm layers. What changes is
``forward``: one call into :func:`batchnorm.functional.forward_layer`, which validates before
any state is touched and runs the Numba kernels. The subclasses add no instance state beyond
their policies (``nonfinite``, ``single_value``: plain attributes with class-level defaults, not
in the ``state_dict``), which is what lets :func:`batchnorm.convert` switch a layer between the
two implementations in place.

Two extensions torch's layers do not have, composed from the stages of
:mod:`batchnorm.functional` and off the path of the plain call: ``forward(input, mask=...)``
leaves padding out of the statistics, and ``single_value="use_running"`` normalizes a training
batch of one value per channel with the running statistics instead of raising.

:class:`BatchNormBase` is the shared part, public so that other layers of the package
(SyncBatchNorm) and of users build on it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from . import _docs
from ._interop import register_fusers, traced_call, twin_of
from ._validate import (
    check_batch_norm_args,
    check_constructor_args,
    check_layer_input,
    check_mask,
    check_nonfinite_policy,
    check_single_value_policy,
    layer_name,
    single_value_error,
)
from .families import Family, known_family, register
from .functional import forward_layer, normalize, normalize_batch, update_running

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase"]

if TYPE_CHECKING:
    # The type checker sees the mixin as what it is always mixed into, torch.nn's BatchNorm
    # base, so that its methods may use the layer's parameters, buffers and torch's methods.
    _MixinBase = torch.nn.modules.batchnorm._BatchNorm
else:
    _MixinBase = object


class BatchNormBase(_MixinBase):
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
        single_value: ``"raise"`` (torch's behaviour) or ``"use_running"``: what a training
            batch with fewer than 2 values per channel does (see :meth:`forward`). Set by the
            constructor's keyword-only argument of that name (``"use_running"`` needs
            ``track_running_stats=True``); not in the ``state_dict``.
    """

    input_ranks: tuple[int, ...] | None
    input_shape: str
    # Class-level defaults, so that a torch.nn layer switched to our class by convert() (which
    # changes __class__ and runs no constructor) has them too.
    nonfinite: str = "skip"
    nonfinite_batches_skipped: int = 0
    single_value: str = "raise"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
        single_value: str = "raise",
    ) -> None:
        check_constructor_args(type(self).__name__, num_features, eps, momentum)
        check_nonfinite_policy(f"{type(self).__name__}()", nonfinite)
        check_single_value_policy(f"{type(self).__name__}()", single_value, track_running_stats)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        if nonfinite != type(self).nonfinite:
            self.nonfinite = nonfinite
        if single_value != type(self).single_value:
            self.single_value = single_value

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.nonfinite != BatchNormBase.nonfinite:
            text += f", nonfinite={self.nonfinite!r}"
        if self.single_value != BatchNormBase.single_value:
            text += f", single_value={self.single_value!r}"
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
        twin = twin_of(self, known_family(type(self)).torch)
        for name in ("nonfinite", "nonfinite_batches_skipped", "single_value"):
            twin.__dict__.pop(name, None)
        return twin

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``input``; in training, update the running statistics (see the class).

        Masks: ``mask`` is a boolean tensor of ``input``'s shape without the channel axis 1
        (``(N,)`` for ``(N, C)``, ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for
        ``(N, C, H, W)``), on ``input``'s device, ``True`` where a value is real and ``False``
        at padding. Padding is left out of the statistics and of the running update (``m`` is
        then the number of real positions), its value never enters the arithmetic (NaN or
        infinite padding is harmless), its output is zero and its gradient is zero. In
        evaluation mode the running statistics normalize the real positions and padding is
        zero. A mask of all ``True`` is the same call as no mask. The masked call runs in torch
        ops (float64 on the CPU) rather than the fused kernels, and not under ``torch.func``
        transforms; without a mask nothing changes.

        One value per channel: a training batch with fewer than 2 values per channel (``N``
        times the spatial size is 1, or a mask leaves fewer than 2 real positions) has no
        variance. With ``single_value="raise"`` (the default) it raises ``ValueError`` with
        torch's words, "Expected more than 1 value per channel when training"; with
        ``"use_running"`` it is normalized with the running statistics (as in evaluation
        mode), and the running statistics and ``num_batches_tracked`` stay as they were.

        Args:
            input: ``(N, C, *)`` of the layer's rank.
            mask: ``None``, or the boolean mask of real values described above.

        Returns:
            The normalized input: the shape, dtype and memory format of ``input``.

        Raises:
            TypeError: ``mask`` is not a boolean tensor (and the input errors of the class).
            ValueError: ``mask`` has the wrong shape or device; one value per channel in
                training under ``single_value="raise"`` (and the input errors of the class).
                Every check runs before any state changes.
        """
        if mask is not None:
            return _forward_masked(self, input, mask)
        try:
            return forward_layer(self, input)
        except ValueError:
            # The one-value-per-channel refusal is the last check before any state changes,
            # so a layer told to use its running statistics instead can still do so. A try
            # costs nothing until it catches (Python 3.11), which keeps the plain call as fast.
            if not uses_running_instead(self, input):
                raise
        return forward_with_running(self, input)


def _state_dtype(layer) -> torch.dtype | None:
    for t in (layer.weight, layer.running_mean):
        if t is not None:
            return t.dtype
    return None


def uses_running_instead(layer, input) -> bool:
    """Whether a refused call is a training batch of one value per channel that ``layer``'s
    ``single_value`` policy normalizes with its running statistics."""
    return (
        layer.single_value == "use_running"
        and layer.training
        and isinstance(input, torch.Tensor)
        and input.dim() >= 2
        and 0 < input.numel() == input.shape[1]
        and layer.running_mean is not None
        and layer.running_var is not None
    )


def forward_with_running(layer, input: torch.Tensor) -> torch.Tensor:
    """A training batch of one value per channel under ``single_value="use_running"``: the
    evaluation transform with the running statistics, which are not updated (nor counted)."""
    where = functools.partial(layer_name, layer)
    check_layer_input(where, layer, input, _state_dtype(layer))
    check_nonfinite_policy(where, layer.nonfinite)
    check_batch_norm_args(
        where,
        input,
        layer.running_mean,
        layer.running_var,
        layer.weight,
        layer.bias,
        False,
        layer.momentum,
        layer.eps,
        None,
    )
    return normalize(
        input,
        layer.running_mean,
        layer.running_var,
        layer.weight,
        layer.bias,
        layer.eps,
        where=where,
    )


def _forward_masked(layer, input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:meth:`BatchNormBase.forward` with a mask of real values: every check first, then the
    stages (``normalize_batch`` and ``update_running``, or ``normalize``) on the input with
    its padding zeroed, and zeros written over the padding of the output."""
    if isinstance(input, torch.fx.Proxy):
        return _traced_masked(layer, input, mask)
    where = functools.partial(layer_name, layer)
    check_layer_input(where, layer, input, _state_dtype(layer))
    check_mask(where, input, mask)
    count = int(mask.sum())  # real positions: the values per channel (the mask has no C axis)
    if count == mask.numel():
        # Nothing is padding: exactly the unmasked call, on the fused kernels.
        return BatchNormBase.forward(layer, input)
    padding = ~mask
    running_mean, running_var = layer.running_mean, layer.running_var
    has_running = running_mean is not None and running_var is not None
    use_batch_stats = layer.training or not has_running
    if use_batch_stats and count < 2:
        if not (layer.training and layer.single_value == "use_running" and has_running):
            raise single_value_error(where, input, count)
        use_batch_stats = False  # single_value="use_running": no statistics, no update
    check_nonfinite_policy(where, layer.nonfinite)
    tracking = use_batch_stats and layer.training and layer.track_running_stats and has_running
    counter = layer.num_batches_tracked if tracking else None
    check_batch_norm_args(
        where,
        input,
        running_mean if tracking or not use_batch_stats else None,
        running_var if tracking or not use_batch_stats else None,
        layer.weight,
        layer.bias,
        use_batch_stats,
        layer.momentum,
        layer.eps,
        counter,
    )
    # Padding replaced by zeros: its values never reach the arithmetic, so NaN or Inf there
    # cannot leak into the statistics or, as 0 * NaN, into the gradients of weight and bias.
    clean = _zero_padding(input, padding)
    if not use_batch_stats:
        output = normalize(
            clean, running_mean, running_var, layer.weight, layer.bias, layer.eps, where=where
        )
        return _zero_padding(output, padding)
    output, moments = normalize_batch(
        clean, layer.weight, layer.bias, layer.eps, mask=mask, where=where
    )
    if tracking:
        update_running(
            running_mean,
            running_var,
            moments,
            layer.momentum,
            num_batches_tracked=counter,
            nonfinite=layer.nonfinite,
            where=where,
            on_skip=functools.partial(_count_skipped, layer),
        )
    return _zero_padding(output, padding)


def _zero_padding(t: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    # A copy in t's memory format filled in place: an out-of-place masked_fill with a mask
    # broadcast over the channels returns a contiguous tensor, losing channels-last.
    return t.clone(memory_format=torch.preserve_format).masked_fill_(padding.unsqueeze(1), 0)


def _traced_masked(layer, input, mask):
    """The layer under ``torch.fx`` with a mask: one ``call_module`` node taking the mask.

    A layer traced as the root receives a placeholder for ``mask`` even when none is meant
    (its default, ``None``): that trace goes through torch's forward, as without a mask.
    """
    path = input.tracer.path_of_module(layer)
    if path:
        return input.tracer.create_proxy("call_module", path, (input,), {"mask": mask})
    node = getattr(mask, "node", None)
    if node is not None and node.op == "placeholder" and node.args == (None,):
        return traced_call(layer, input, torch.nn.modules.batchnorm._BatchNorm.forward)
    raise NotImplementedError(
        f"{layer_name(layer)}: expected a mask only when the layer is traced inside a model, "
        "got one for the layer traced as the root of torch.fx.symbolic_trace. Trace a module "
        "that holds the layer."
    )


def _count_skipped(layer) -> None:
    layer.nonfinite_batches_skipped += 1


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
