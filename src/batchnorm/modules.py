"""``BatchNorm1d/2d/3d``: torch.nn's layers, with the forward pass on this package's op.

Each class subclasses its torch.nn namesake, so parameters, buffers, ``state_dict`` keys,
``_version`` and its migration (a checkpoint without ``num_batches_tracked`` loads with 0),
``reset_parameters`` and ``extra_repr`` are torch's own, and ``isinstance(layer,
torch.nn.BatchNorm2d)`` keeps holding for code that looks for BatchNorm layers. What changes is
``forward``: stricter validation that runs before any state is touched, and the Numba kernels.
The subclasses add no instance state, which is what lets :func:`batchnorm.convert` switch a
layer between the two implementations in place.
"""

from __future__ import annotations

import torch

from . import _docs
from . import functional as _functional
from ._validate import check_constructor_args, check_module_input, check_nonfinite_policy
from .functional import _batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _InputChecks:
    """The per-call input check every layer of this package shares, and the names it reports.

    The class supplies ``_ranks`` (accepted input ranks) and ``_shape_hint``; the instance
    ``num_features`` and, for the dtype check, a ``weight`` or ``running_mean``.
    """

    _ranks: tuple[int, ...]
    _shape_hint: str

    def _where(self) -> str:
        return f"{type(self).__name__}(num_features={self.num_features})"

    def _shape_text(self) -> str:
        return self._shape_hint.format(C=self.num_features)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        # Bound methods, not strings: the names are only formatted when there is an error.
        check_module_input(
            self._where,
            input,
            self.num_features,
            self._ranks,
            self._shape_text,
            self._state_dtype(),
        )

    def _state_dtype(self) -> torch.dtype | None:
        for t in (self.weight, self.running_mean):
            if t is not None:
                return t.dtype
        return None


class _BatchNormMixin(_InputChecks):
    """The shared constructor check and forward pass; the class supplies the accepted ranks."""

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

    def _count_skipped_batch(self) -> None:
        self.nonfinite_batches_skipped += 1

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.nonfinite != _BatchNormMixin.nonfinite:
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self._forward_plain_case(input)
        if output is not None:
            return output
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        # The same choices torch.nn makes: batch statistics in training, and in evaluation too
        # when there are no running estimates; running buffers are read in evaluation even if
        # track_running_stats was switched off after construction.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked if tracking else None,
            where=self._where,
            nonfinite=self.nonfinite,
            on_skip=self._count_skipped_batch,
        )

    def _forward_plain_case(self, input: torch.Tensor) -> torch.Tensor | None:
        """The forward pass of the common case, in the fewest steps; None for anything else.

        On a small batch the full path's fixed cost (two argument checks ~6 us, each
        ``nn.Module.__getattr__`` ~0.7 us) is a good part of the call, where torch's whole
        ``BatchNorm1d`` on (60, 100) takes ~32 us. So the case almost every call is (a CPU
        float32/float64 input of the right rank and channels, parameters and buffers of its
        dtype and shape, a float ``eps`` and ``momentum``) is recognised with cheap tests on
        the module's own dicts and served directly; everything else, including every error,
        returns None and takes the full path, which reports it in this package's words.

        * Training: the same kernels and autograd Function as the full path, minus its checks.
        * Evaluation, inputs routed to torch's op (``functional.EVAL_NATIVE_BYTES``): torch's op
          is called directly, and if it raises the full path runs (nothing is mutated in
          evaluation); the rank and channel count are checked first because torch's op would
          not object to them.
        """
        if (
            not isinstance(input, torch.Tensor)
            or input.dim() not in self._ranks
            or input.shape[1] != self.num_features
            or torch.compiler.is_compiling()
        ):
            return None
        # The dicts behind nn.Module.__getattr__. A name missing from them (a parametrization,
        # a plain attribute set in its place) leaves the call to the full path.
        parameters, buffers = self._parameters, self._buffers
        try:
            weight, bias = parameters["weight"], parameters["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
        except KeyError:
            return None
        eps = self.eps
        if type(eps) is not float or not _functional._kernels_take(input):
            return None
        if self.training:
            return self._train_plain_case(
                input, weight, bias, running_mean, running_var, counter, eps
            )
        if running_mean is None or running_var is None:
            return None
        if _functional._native_is_faster(input, training=False):
            try:
                return torch.batch_norm(
                    input, weight, bias, running_mean, running_var, False, 0.0, eps, False
                )
            except (RuntimeError, TypeError, ValueError):
                return None
        if input.numel() == 0 or not _plain_per_channel(
            input, weight, bias, running_mean, running_var
        ):
            return None
        return _functional._eval_step(input, running_mean, running_var, weight, bias, eps)

    def _train_plain_case(self, input, weight, bias, running_mean, running_var, counter, eps):
        """The training half of :meth:`_forward_plain_case`: what ``check_batch_norm_args``
        would accept, established with the fewest tests (on failure: None, the full path)."""
        momentum, nonfinite = self.momentum, self.nonfinite
        if (momentum is not None and type(momentum) is not float) or (
            nonfinite != "skip" and nonfinite != "raise"
        ):
            return None
        if input.numel() <= input.shape[1]:  # empty, or one value per channel: full path
            return None
        if self.track_running_stats:
            if (
                running_mean is None
                or running_var is None
                or (momentum is None and counter is None)
                or (counter is not None and (counter.numel() != 1 or not counter.is_cpu))
            ):
                return None
        else:
            running_mean = running_var = counter = None
        if not _plain_per_channel(input, weight, bias, running_mean, running_var):
            return None
        return _functional._train_step(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            counter,
            momentum,
            eps,
            _functional._Guard(nonfinite, self._where, self._count_skipped_batch),
        )


def _plain_per_channel(input, weight, bias, running_mean, running_var) -> bool:
    """Whether the per-channel tensors given (None = absent) are what the kernels take without
    the full check: ``(C,)`` tensors on the CPU in the input's dtype, running statistics that
    do not require grad (those take torch's op, outside the graph; see functional._fallback)."""
    dtype = input.dtype
    shape = (input.shape[1],)
    for t in (weight, bias):
        if t is not None and (t.dtype != dtype or t.shape != shape or not t.is_cpu):
            return False
    for t in (running_mean, running_var):
        if t is not None and (
            t.dtype != dtype or t.shape != shape or not t.is_cpu or t.requires_grad
        ):
            return False
    return True


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    _ranks = (2, 3)
    _shape_hint = "(N, {C}) or (N, {C}, L)"
    __doc__ = _docs.module_doc(
        name="BatchNorm1d",
        what="a 2-D ``(N, C)`` or 3-D ``(N, C, L)`` input",
        axes="the batch axis (and the length axis for 3-D input)",
        shape=":math:`(N, C)` or :math:`(N, C, L)`",
        example="torch.randn(8, 3)",
        example_shape="[8, 3]",
    )


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    _ranks = (4,)
    _shape_hint = "(N, {C}, H, W)"
    __doc__ = _docs.module_doc(
        name="BatchNorm2d",
        what="a 4-D ``(N, C, H, W)`` input",
        axes="the batch and both spatial axes",
        shape=":math:`(N, C, H, W)`, contiguous or channels_last",
        example="torch.randn(8, 3, 5, 5)",
        example_shape="[8, 3, 5, 5]",
    )


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    _ranks = (5,)
    _shape_hint = "(N, {C}, D, H, W)"
    __doc__ = _docs.module_doc(
        name="BatchNorm3d",
        what="a 5-D ``(N, C, D, H, W)`` input",
        axes="the batch and the three spatial axes",
        shape=":math:`(N, C, D, H, W)`, contiguous or channels_last_3d",
        example="torch.randn(4, 3, 2, 5, 5)",
        example_shape="[4, 3, 2, 5, 5]",
    )
