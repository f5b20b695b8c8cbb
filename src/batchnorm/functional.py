r"""The torch op: ``batch_norm`` on the Numba kernels, with autograd and dispatch.

Three ways in, one implementation:

* **eager** calls go through :class:`torch.autograd.Function` subclasses (a few microseconds of
  overhead per call);
* under :func:`torch.compile` and :func:`torch.export.export` the same kernels are reached
  through custom ops ``torch.ops.batchnorm.*`` registered with fake (meta) implementations, so
  graphs hold them as opaque nodes. Eager mode does not use them: an eager call to a custom op
  with autograd costs ~80 µs, more than torch's whole BatchNorm1d on a small batch;
* inputs the kernels do not cover (CUDA and other devices, float16/bfloat16, strided layouts)
  go to torch's native op.

Both the eager Function and the custom ops call :func:`_train_forward`, :func:`_eval_forward`
and :func:`_backward`, which view tensors as NumPy arrays without copying and run the kernels.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from . import kernels, outputs
from ._validate import (
    NonFiniteStatisticsError,
    NonFiniteStatisticsWarning,
    _name,
    check_batch_norm_args,
    check_nonfinite_policy,
)

__all__ = ["batch_norm", "backend_for"]

_KERNEL_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Layout and dispatch
# --------------------------------------------------------------------------------------------


def _layout(x: torch.Tensor) -> str | None:
    """Which kernel layout views ``x`` without a copy: ``"nchw"``, ``"nhwc"`` or ``None``.

    ``"nchw"``: contiguous ``(N, C, *)``, viewed as ``(N, C, S)``. ``"nhwc"``: the channel
    axis innermost (channels_last / channels_last_3d, or any ``(N, C)`` matrix), viewed as
    ``(M, C)`` with ``M = N * S``.
    """
    if x.dim() == 2:
        return "nhwc" if x.is_contiguous() else None
    if x.is_contiguous():
        return "nchw"
    if x.permute(0, *range(2, x.dim()), 1).is_contiguous():
        return "nhwc"
    return None


# Evaluation-mode inputs of fewer than this many bytes go to torch's native op even when the
# kernels could take them: there it is faster. The bound is glibc's largest mmap threshold
# (32 MiB): below it torch's output comes from malloc's warm heap and torch's eval kernel (float32,
# folded x * scale + shift) runs at 82-109 % of the copy roofline, ours at 28-82 %; above it
# torch's output is mapped afresh on every call and ours (from batchnorm.outputs) is not.
# Measured (eval size sweep, module level, float32, 2 threads, docs/NOTES.md): torch/ours
# 0.33-0.93 from 1e5 to 7.6e6 values ((N, 64, H, W) contiguous and channels-last, (N, 256)),
# except contiguous 7.6e6 (30 MB, 1.38); 2.8-3.3 at 1.6e7 and 3.3e7.
# Training is never routed. torch's training op is not accurate in float32: it loses the
# variance to cancellation when the mean is large next to the spread. Normalized output vs the
# float64 reference, (256, 100): mean 100 / std 1 error 3.6e-5, 1e3 / 1: 3.5e-4, 100 / 0.01:
# 3.2e-3, 1e4 / 0.01: 0.22; the kernels 1.2e-7 (float32 rounding) in every case. (Its speed
# advantage on small training inputs went with the layers' plain case, modules.py.) Its
# evaluation op has the same weakness to a lesser degree (4e-2 at 1e4 / 0.01): setting this
# bound to 0 keeps evaluation on the kernels, at 0.45-0.9x torch's speed for those sizes.
EVAL_NATIVE_BYTES = 32 << 20


def backend_for(input: torch.Tensor, training: bool = True) -> str:
    """Say which implementation serves ``input``: ``"numba"`` or ``"torch"``.

    The Numba kernels take CPU float32/float64 tensors that are contiguous or channels-last
    (channel axis innermost in memory). Everything else, including every non-CPU device,
    float16, bfloat16 and other strides, is served by torch's native ``batch_norm``. In
    evaluation mode (``training=False``), inputs of fewer than ``EVAL_NATIVE_BYTES`` bytes
    (32 MiB) go to torch's op too, because it is measured faster there.

    Args:
        input: A tensor of shape ``(N, C, *)``.
        training: Whether the call normalises with batch statistics (training mode).

    Returns:
        ``"numba"`` or ``"torch"``.

    Example:
        >>> backend_for(torch.zeros(4, 3))
        'numba'
        >>> backend_for(torch.zeros(4, 3), training=False)
        'torch'
        >>> backend_for(torch.zeros(4, 3, dtype=torch.bfloat16))
        'torch'
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"backend_for(): expected a torch.Tensor, got {type(input).__name__}.")
    return "numba" if _kernels_take(input) and not _native_is_faster(input, training) else "torch"


def _kernels_take(input: torch.Tensor) -> bool:
    """Whether the kernels can serve ``input`` at all (CPU, float32/64, dense layout)."""
    if input.device.type != "cpu" or input.dtype not in _KERNEL_DTYPES or input.dim() < 2:
        return False
    return input.layout == torch.strided and _layout(input) is not None


def _native_is_faster(input: torch.Tensor, training: bool) -> bool:
    """Whether torch's op is measured faster for an input the kernels could take."""
    return not training and input.numel() * input.element_size() < EVAL_NATIVE_BYTES


_warned: set[str] = set()


def _warn_fallback_once(input: torch.Tensor) -> None:
    # Non-CPU devices are served by torch by design; only a CPU input we could have served
    # faster is worth a (single) warning.
    if input.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if input.dtype not in _KERNEL_DTYPES:
        key = f"dtype:{input.dtype}"
        msg = (
            f"batch_norm(): {str(input.dtype).replace('torch.', '')} input on cpu is handled by "
            "torch's native op; the Numba kernels cover float32 and float64."
        )
    else:
        key = "layout"
        msg = (
            f"batch_norm(): input with strides {input.stride()} is neither contiguous nor "
            "channels-last; it is handled by torch's native op."
        )
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """torch's own op: the fallback, looked up at call time so that tests can spy on it."""
    return torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


# --------------------------------------------------------------------------------------------
# Kernel calls: tensors in, tensors out, no autograd, no validation
# --------------------------------------------------------------------------------------------


# Inputs with at most this many values run on the serial fused kernels (one call per pass, no
# thread start-up); larger ones on the parallel fused kernels (kernels/fused.py). Measured
# kernel to kernel (float32, 2 threads, timeit min), serial / parallel in us, training forward
# then backward: (N, 256) at 32K values 25/33 and 24/37, 65K 38/36 and 42/54, 98K 62/41 and
# 63/56; (N, 64, 256) at 32K 16/23 and 17/27, 65K 28/32 and 30/38, 98K 41/41 and 57/54.
SERIAL_MAX_ELEMENTS = 1 << 16
# The channels-last training forward stays serial up to this multiple of it: its serial kernel
# sums blocks like the parallel one (kernels/serial.py) and measured faster up to ~1.2e5 values
# (module level, float32, parallel / serial: (300, 256) 1.18, (391, 256) 1.10, (450, 256)
# 1.09, (24, 64, 8, 8) channels-last 1.11; at 131072 values 0.94-1.02).
NHWC_TRAIN_SERIAL_SCALE = 15 / 8

_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
# Largest finite value of each kernel dtype: batch statistics beyond it would be stored as Inf.
_LIMIT = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float64)}
# Zero-length arrays stand for an absent weight, bias or running statistic in the kernels.
_ABSENT = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


_kernel_cache: dict[tuple[str, str, torch.dtype], object] = {}


def _kernel(op: str, layout: str, dtype) -> object:
    """``kernels.select_kernel``, memoised.

    Resolving a NumPy dtype's name costs ~2 us a call, noticeable next to a ~30 us BatchNorm on
    a small batch (measured: module train forward on (60, 100) went from 55 to 50 us).
    """
    key = (op, layout, dtype)
    kernel = _kernel_cache.get(key)
    if kernel is None:
        kernel = _kernel_cache[key] = kernels.select_kernel(op, layout, dtype)
    return kernel


def _kernel_array(a: np.ndarray, layout: str) -> np.ndarray:
    """View an ``(N, C, *)`` array as the kernel's ``(N, C, S)`` (nchw) or ``(M, C)`` (nhwc)."""
    n, c = a.shape[0], a.shape[1]
    if layout == "nchw":
        return a.reshape(n, c, -1)
    if a.ndim == 2:
        return a
    return np.moveaxis(a, 1, -1).reshape(-1, c)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a CPU tensor (detached: the kernels are outside autograd)."""
    # detach() only where numpy() needs it: 0.8 us instead of 1.2 us a call for buffers.
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _empty_output(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, np.ndarray]:
    """A new tensor with ``x``'s shape, dtype and memory layout, and its kernel view.

    The memory comes from NumPy, not torch's allocator, through :mod:`.outputs`: large buffers
    are reused once their tensors are gone, so a training loop does not map and zero fresh pages
    on every call (for a memory-bound op that costs as much as the op itself), and fresh large
    allocations get transparent huge pages, which NumPy asks for and torch's CPU allocator does
    not (unless THP_MEM_ALLOC_ENABLE=1; FACTS.md: allocate + fill of 49 MiB, 12.7 ms vs 2.6 ms).
    """
    dtype = _NUMPY_DTYPE[x.dtype]
    if layout == "nchw" or x.dim() == 2:
        array = outputs.empty(tuple(x.shape), dtype)
        return torch.from_numpy(array), _kernel_array(array, layout)
    channels_last = (x.shape[0], *x.shape[2:], x.shape[1])
    array = outputs.empty(channels_last, dtype)
    out = torch.from_numpy(array).permute(0, x.dim() - 1, *range(1, x.dim() - 1))
    return out, array.reshape(-1, x.shape[1])


def _array(a: torch.Tensor | np.ndarray) -> np.ndarray:
    """``a`` itself if it is a NumPy array, else its zero-copy view."""
    return a if isinstance(a, np.ndarray) else _numpy(a)


def _optional(t: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray:
    return _ABSENT[dtype] if t is None else _numpy(t)


def _float64(a: np.ndarray, channels: int, fill: float) -> np.ndarray:
    return np.full(channels, fill) if a.shape[0] == 0 else a.astype(np.float64)


@contextlib.contextmanager
def _torch_thread_count():
    """Run parallel kernels with torch's thread count, and leave torch's count as it was.

    Numba's OpenMP layer runs in the same OpenMP runtime as torch, and starting a parallel
    region sets that runtime's thread count to Numba's: without this, one large BatchNorm call
    would silently undo a user's ``torch.set_num_threads(1)`` (measured: a small MLP then ran
    50x slower next to a busy core).
    """
    threads = torch.get_num_threads()
    kernels.set_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1]


def _batch_weight(num_batches_tracked: torch.Tensor | None, momentum: float | None) -> float:
    """The weight of this training batch's statistics in the running averages.

    ``momentum=None`` is torch's cumulative average: ``1 / num_batches_tracked``, counting this
    batch (the counter itself is advanced only once the update has happened).
    """
    if momentum is None and num_batches_tracked is not None:
        return 1.0 / (float(num_batches_tracked) + 1.0)
    return float(momentum)


def _count_batch(num_batches_tracked: torch.Tensor | None) -> None:
    # torch's own in-place add (an integer tensor never needs grad): 1.6 us, where a NumPy
    # view, its increment and a manual version bump took 2.9 us.
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)


class _Guard(NamedTuple):
    """What to do with a training batch whose statistics are not finite, and who asked.

    Attributes:
        nonfinite: ``"skip"`` (leave the running statistics alone and warn) or ``"raise"``.
        where: The caller's name for messages (a string, or a callable that returns it).
        on_skip: Called after a skipped batch (modules count them), or ``None``.
    """

    nonfinite: str = "skip"
    where: object = "batch_norm()"
    on_skip: Callable[[], None] | None = None


def _reject_batch(guard: _Guard, mean, var) -> None:
    """Report a batch left out of the running statistics: raise, or warn and count."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    shown = ", ".join(map(str, bad[:8])) + (", ..." if bad.size > 8 else "")
    what = (
        f"the batch's mean or variance is NaN or infinite (in channels {shown})"
        if bad.size
        else "the batch's variance is too large for the running statistics' dtype"
    )
    if guard.nonfinite == "raise":
        raise NonFiniteStatisticsError(
            f"{_name(guard.where)}: expected finite batch statistics, but {what}; the running "
            "statistics and num_batches_tracked were left unchanged."
        )
    warnings.warn(
        NonFiniteStatisticsWarning(
            f"{_name(guard.where)}: {what}; this batch was left out of the running statistics "
            "(and not counted in num_batches_tracked). Pass nonfinite='raise' to stop instead."
        ),
        stacklevel=2,
    )
    if guard.on_skip is not None:
        guard.on_skip()


def _train_forward(
    x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard=None
):
    """Algorithm 1 on the kernels, plus the running-average update when buffers are given.

    A batch with non-finite statistics updates nothing and is handled by ``guard``.

    Returns:
        ``(y, mean, var)``: the output and the batch mean and *biased* variance (float64 NumPy
        arrays of shape ``(C,)``) that the backward pass needs. They stay NumPy arrays on the
        eager path (two tensor conversions and two autograd outputs fewer per call); the custom
        op wraps them.
    """
    layout = _layout(x)
    channels = x.shape[1]
    xa = _kernel_array(_numpy(x), layout)
    y, ya = _empty_output(x, layout)
    mean = np.empty(channels)
    var = np.empty(channels)
    weight_a = _optional(weight, x.dtype)
    bias_a = _optional(bias, x.dtype)
    track = running_mean is not None
    if track:
        factor = _batch_weight(num_batches_tracked, momentum)
        running_mean_a, running_var_a = _numpy(running_mean), _numpy(running_var)
    else:
        factor = 0.0
        running_mean_a = running_var_a = _ABSENT[x.dtype]
    limit = _LIMIT[xa.dtype]
    args = (xa, weight_a, bias_a, eps, ya, mean, var, running_mean_a, running_var_a, factor, limit)
    serial_max = SERIAL_MAX_ELEMENTS * (NHWC_TRAIN_SERIAL_SCALE if layout == "nhwc" else 1)
    if x.numel() <= serial_max:
        updated = _kernel("train_serial", layout, xa.dtype)(*args)
    else:
        with _torch_thread_count():
            updated = _kernel("train_parallel", layout, xa.dtype)(*args)
    if not updated:
        _reject_batch(guard or _Guard(), mean, var)
    elif track:
        _count_batch(num_batches_tracked)
        # The buffers were written through NumPy, which autograd cannot see: tell it, so that a
        # graph that saved them (an evaluation-mode forward) refuses to backpropagate stale
        # values, exactly as after an in-place torch op.
        torch.autograd.graph.increment_version(running_mean)
        torch.autograd.graph.increment_version(running_var)
    return y, mean, var


def _eval_forward(x, running_mean, running_var, weight, bias, eps: float):
    """Algorithm 2, step 11 on the kernels: normalize with the given population statistics."""
    layout = _layout(x)
    xa = _kernel_array(_numpy(x), layout)
    y, ya = _empty_output(x, layout)
    weight_a = _optional(weight, x.dtype)
    bias_a = _optional(bias, x.dtype)
    running_mean_a, running_var_a = _numpy(running_mean), _numpy(running_var)
    if x.numel() <= SERIAL_MAX_ELEMENTS:
        _kernel("eval_serial", layout, xa.dtype)(
            xa, running_mean_a, running_var_a, weight_a, bias_a, eps, ya
        )
        return y
    channels = x.shape[1]
    invstd = 1.0 / np.sqrt(running_var_a.astype(np.float64) + eps)
    scale = invstd * _float64(weight_a, channels, 1.0)
    with _torch_thread_count():
        _kernel("normalize", layout, xa.dtype)(
            xa, running_mean_a.astype(np.float64), scale, _float64(bias_a, channels, 0.0), ya
        )
    return y


def _backward(dy, x, weight, mean, var, eps: float, training: bool):
    r"""Gradients of either transform, from the statistics it normalized with.

    With :math:`\sigma^{-1} = 1/\sqrt{\mathrm{var} + \epsilon}` and per-channel sums
    :math:`S_1 = \sum \delta`, :math:`S_2 = \sum \delta (x - \mu)`, training gives
    (``reference.batch_norm_train_backward``)

    .. math::
        dx = \gamma\sigma^{-1}\,\delta - \frac{\gamma\sigma^{-3} S_2}{m}(x - \mu)
             - \frac{\gamma\sigma^{-1} S_1}{m}

    and evaluation only the first term (the statistics are constants there). Both have
    :math:`d\gamma = \sigma^{-1} S_2` and :math:`d\beta = S_1`.

    Returns:
        ``(dx, dweight, dbias)``; ``dweight``/``dbias`` have ``x``'s dtype and shape ``(C,)``.
    """
    layout = _layout(x)
    channels = x.shape[1]
    # The gradient arrives in whatever layout autograd produced (often an expanded view from a
    # sum); the kernels need it in x's memory layout.
    if layout == "nchw" or x.dim() == 2:
        dy = dy.contiguous()
    elif dy.stride() != x.stride():
        dy = dy.permute(0, *range(2, dy.dim()), 1).contiguous()
        dy = dy.permute(0, dy.dim() - 1, *range(1, dy.dim() - 1))
    xa = _kernel_array(_numpy(x), layout)
    dya = _kernel_array(_numpy(dy), layout)
    dx, dxa = _empty_output(x, layout)
    mean_a, var_a = _array(mean), _array(var)
    weight_a = _optional(weight, x.dtype)
    # In x's dtype: the kernels accumulate in float64 and round once at the store, which saves
    # two tensor conversions (~3 us each on a small batch).
    dweight = np.empty(channels, xa.dtype)
    dbias = np.empty(channels, xa.dtype)
    args = (dya, xa, mean_a, var_a, weight_a, eps, training, dxa, dweight, dbias)
    if x.numel() <= SERIAL_MAX_ELEMENTS:
        _kernel("backward_serial", layout, xa.dtype)(*args)
    else:
        with _torch_thread_count():
            _kernel("backward_parallel", layout, xa.dtype)(*args)
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


# --------------------------------------------------------------------------------------------
# Differentiable composites, used only for double backward (create_graph=True)
# --------------------------------------------------------------------------------------------


def _composite_grads(dy, x, weight, running_mean, running_var, eps, training):
    """The backward formulas in torch ops, so that autograd can differentiate them again."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    axes = [0, *range(2, x.dim())]
    if training:
        m = _values_per_channel(x)
        mean = x.mean(dim=axes, keepdim=True)
        xmu = x - mean
        invstd = torch.rsqrt((xmu * xmu).mean(dim=axes, keepdim=True) + eps)
    else:
        xmu = x - running_mean.reshape(shape)
        invstd = torch.rsqrt(running_var.reshape(shape) + eps)
    x_hat = xmu * invstd
    sum_dy = dy.sum(dim=axes)
    sum_dy_xhat = (dy * x_hat).sum(dim=axes)
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    if training:
        dx = scale / m * (m * dy - sum_dy.reshape(shape) - x_hat * sum_dy_xhat.reshape(shape))
    else:
        dx = scale * dy
    return dx, sum_dy_xhat, sum_dy


# --------------------------------------------------------------------------------------------
# Eager path: autograd.Function
# --------------------------------------------------------------------------------------------


class _TrainFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard
    ):
        y, mean, var = _train_forward(
            x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard
        )
        ctx.save_for_backward(x, weight)
        # The batch statistics are new NumPy arrays nobody else holds: kept on ctx as they are,
        # not as saved tensors or extra (non-differentiable) outputs, which measured ~4 us a
        # call on (60, 100).
        ctx.stats = (mean, var)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = _composite_grads(dy, x, weight, None, None, ctx.eps, True)
        else:
            dx, dw, db = _backward(dy, x, weight, *ctx.stats, ctx.eps, True)
        return (*_select_grads(ctx, dx, dw, db), None, None, None, None, None, None)


class _EvalFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps = eps
        return _eval_forward(x, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, running_mean, running_var = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = _composite_grads(dy, x, weight, running_mean, running_var, ctx.eps, False)
        else:
            dx, dw, db = _backward(dy, x, weight, running_mean, running_var, ctx.eps, False)
        dx, dw, db = _select_grads(ctx, dx, dw, db, offset=3)
        return dx, None, None, dw, db, None


def _select_grads(ctx, dx, dw, db, offset=1):
    """Drop the gradients autograd did not ask for (weight and bias sit at ``offset``)."""
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dw if need[offset] else None,
        db if need[offset + 1] else None,
    )


# ``Function.apply`` is a Python wrapper around the C++ ``_FunctionBase.apply``. Outside
# functorch transforms (vmap, grad, ...) it only adds argument binding for ``setup_context``
# functions (ours have none) and a pytree walk over the arguments that unwraps dead functorch
# wrappers (none can reach us outside a transform): ~3 us a call, 10 % of a small BatchNorm.
# The C++ entry is used directly in that case; inside a transform, the full wrapper.
# Both are private: if a torch release drops either, every call takes the public wrapper.
_direct_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``, without the Python wrapper's cost where it does nothing."""
    if _direct_apply is None or _transforms_active is None or _transforms_active():
        return fn.apply(*args)
    return _direct_apply.__get__(None, fn)(*args)


def _train_step(
    input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard
):
    """A checked training call on the kernels: with autograd when a graph will be recorded."""
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
    # autograd.Function costs ~8 us a call, a quarter of torch's whole op on a small batch:
    # skip it when nothing will be differentiated.
    if _records_graph(input, weight, bias):
        return _apply(_TrainFn, *args, guard)
    return _train_forward(*args, guard)[0]


def _records_graph(input, weight, bias) -> bool:
    """Whether autograd will record this call (and so a backward pass may follow)."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _eval_step(input, running_mean, running_var, weight, bias, eps):
    """A checked evaluation call on the kernels: with autograd when a graph will be recorded."""
    if _records_graph(input, weight, bias):
        return _apply(_EvalFn, input, running_mean, running_var, weight, bias, eps)
    return _eval_forward(input, running_mean, running_var, weight, bias, eps)


# --------------------------------------------------------------------------------------------
# Compiled path: custom ops with fake implementations
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("batchnorm::batch_norm_train", mutates_args=())
def _train_forward_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, var = _train_forward(x, weight, bias, None, None, None, None, eps)
    return y, torch.from_numpy(mean), torch.from_numpy(var)


@_train_forward_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty((x.shape[1],), dtype=torch.float64)
    return torch.empty_like(x), stats, torch.empty_like(stats)


# torch cannot attach an autograd formula to an op that mutates its arguments, so in graphs the
# running-average update is an op of its own after the (functional) training forward.
@torch.library.custom_op(
    "batchnorm::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def _update_running_op(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
    nonfinite: str,
    where: str,
) -> None:
    running_mean_a = _numpy(running_mean)
    updated = kernels.update_running(
        running_mean_a,
        _numpy(running_var),
        _numpy(mean),
        _numpy(var),
        count,
        _batch_weight(num_batches_tracked, momentum),
        _LIMIT[running_mean_a.dtype],
    )
    if not updated:
        # In a graph there is no module to count the batch; the warning (or error) remains.
        _reject_batch(_Guard(nonfinite, where), mean, var)
        return
    _count_batch(num_batches_tracked)
    torch.autograd.graph.increment_version(running_mean)
    torch.autograd.graph.increment_version(running_var)


@_update_running_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, where):
    return None


@torch.library.custom_op("batchnorm::batch_norm_eval", mutates_args=())
def _eval_forward_op(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    return _eval_forward(x, running_mean, running_var, weight, bias, eps)


@_eval_forward_op.register_fake
def _(x, running_mean, running_var, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::batch_norm_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, mean, var, eps, training)


@_backward_op.register_fake
def _(dy, x, weight, mean, var, eps, training):
    per_channel = x.new_empty((x.shape[1],))
    return torch.empty_like(x), per_channel, torch.empty_like(per_channel)


def _train_setup_context(ctx, inputs, output):
    x, weight, _bias, eps = inputs
    _y, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps


def _train_backward(ctx, dy, _dmean, _dvar):
    x, weight, mean, var = ctx.saved_tensors
    dx, dw, db = torch.ops.batchnorm.batch_norm_backward(dy, x, weight, mean, var, ctx.eps, True)
    return (*_select_grads(ctx, dx, dw, db), None)


def _eval_setup_context(ctx, inputs, output):
    x, running_mean, running_var, weight, _bias, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.eps = eps


def _eval_backward(ctx, dy):
    x, weight, running_mean, running_var = ctx.saved_tensors
    dx, dw, db = torch.ops.batchnorm.batch_norm_backward(
        dy, x, weight, running_mean, running_var, ctx.eps, False
    )
    dx, dw, db = _select_grads(ctx, dx, dw, db, offset=3)
    return dx, None, None, dw, db, None


_train_forward_op.register_autograd(_train_backward, setup_context=_train_setup_context)
_eval_forward_op.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# --------------------------------------------------------------------------------------------
# The public op
# --------------------------------------------------------------------------------------------


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Batch Normalization, a drop-in for :func:`torch.nn.functional.batch_norm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta

    With ``training=True`` the mean and the *biased* variance of the batch are used (over every
    axis but the channel axis 1; Ioffe & Szegedy 2015, Alg. 1). With ``training=False`` the
    running (population) statistics are used (Alg. 2).

    Mutation: when ``training`` and running statistics are given, ``running_mean`` and
    ``running_var`` are updated in place, ``running = (1 - momentum) * running + momentum *
    batch``, folding in the *unbiased* batch variance (factor ``m / (m - 1)``, as torch does).
    ``momentum`` is the weight of the new batch, the opposite of flax's and equinox's decay.
    ``momentum=None`` means a cumulative average and needs ``num_batches_tracked``; when that
    tensor is given it is incremented by one per training call. Nothing is mutated unless every
    check passed, and a batch with no values (``N == 0``) changes nothing.

    Non-finite batches: a training batch whose mean or unbiased variance is NaN or infinite in
    any channel (or too large for the buffers' dtype) is never folded into the running
    statistics, where it would stay forever (torch keeps it: pytorch#88474). With
    ``nonfinite="skip"`` the buffers and ``num_batches_tracked`` stay as they were and a
    :class:`~batchnorm.NonFiniteStatisticsWarning` is issued; the output is still returned
    (NaN where the input was). With ``nonfinite="raise"``, a
    :class:`~batchnorm.NonFiniteStatisticsError` is raised instead, equally without any change.

    Dtypes: CPU float32/float64 inputs are computed by the Numba kernels with float64
    statistics and arithmetic, rounded once to the input dtype. Other devices and dtypes
    (float16, bfloat16) and inputs that are neither contiguous nor channels-last are passed to
    torch's native op (see :func:`backend_for`).

    Args:
        input: ``(N, C, *)`` tensor.
        running_mean: ``(C,)`` running mean or ``None``.
        running_var: ``(C,)`` running (unbiased) variance or ``None``.
        weight: ``(C,)`` scale :math:`\gamma` or ``None`` (1).
        bias: ``(C,)`` shift :math:`\beta` or ``None`` (0).
        training: Normalize with the batch's statistics (and update the running ones).
        momentum: Weight of the new batch in the running averages, or ``None``.
        eps: Added to the variance before the square root.
        num_batches_tracked: 0-dim long tensor counting training calls, or ``None``.
        nonfinite: ``"skip"`` or ``"raise"``: what a training batch with non-finite statistics
            does (see above).

    Returns:
        Tensor of the shape, dtype and memory format of ``input``.

    Raises:
        TypeError: Non-floating input, or float32/float64 input with parameters or running
            statistics of another dtype.
        ValueError: Wrong shapes, evaluation without running statistics, a single value per
            channel in training, or an unknown ``nonfinite`` policy.
        NonFiniteStatisticsError: ``nonfinite="raise"`` and the batch's statistics are not
            finite.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm(x, None, None, training=True, eps=0.0)
        tensor([[-1., -1.],
                [ 1.,  1.]])
    """
    return _batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked,
        where="batch_norm()",
        nonfinite=nonfinite,
    )


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    num_batches_tracked,
    where,
    nonfinite="skip",
    on_skip=None,
):
    check_nonfinite_policy(where, nonfinite)
    check_batch_norm_args(
        where,
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        num_batches_tracked,
    )
    if not training or running_mean is None:
        num_batches_tracked = None  # counted only when running statistics are updated
    eps = float(eps)
    if input.numel() == 0:
        # No values, no statistics: normalize nothing and leave every buffer as it was.
        return _native_batch_norm(
            input,
            None if training else running_mean,
            None if training else running_var,
            weight,
            bias,
            training,
            0.0,
            eps,
        )
    if not _kernels_take(input) or (
        running_mean is not None and (running_mean.requires_grad or running_var.requires_grad)
    ):
        return _fallback(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            num_batches_tracked,
            _Guard(nonfinite, where, on_skip),
        )
    compiling = torch.compiler.is_compiling()
    if _native_is_faster(input, training) and not compiling:
        # Faster on torch's op at this size (see EVAL_NATIVE_BYTES); nothing is mutated
        # in evaluation mode, so no semantics of this package are lost on the way.
        return _native_batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    if compiling:
        if training:
            y, mean, var = torch.ops.batchnorm.batch_norm_train(input, weight, bias, eps)
            if running_mean is not None:
                torch.ops.batchnorm.update_running_stats(
                    running_mean,
                    running_var,
                    num_batches_tracked,
                    mean,
                    var,
                    _values_per_channel(input),
                    momentum,
                    nonfinite,
                    _name(where),
                )
            return y
        return torch.ops.batchnorm.batch_norm_eval(
            input, running_mean, running_var, weight, bias, eps
        )
    if training:
        return _train_step(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            momentum,
            eps,
            _Guard(nonfinite, where, on_skip),
        )
    return _eval_step(input, running_mean, running_var, weight, bias, eps)


def _fallback(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    num_batches_tracked,
    guard,
):
    """torch's native op, with this package's counter, cumulative average and non-finite guard."""
    if not _kernels_take(input):  # not for running statistics that require grad
        _warn_fallback_once(input)
    if not training or running_mean is None:
        return _native_batch_norm(
            input, running_mean, running_var, weight, bias, training, 0.0, eps
        )
    return _native_train(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard
    )


def _native_train(
    input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, guard
):
    """A training step on torch's op, with this package's running update and non-finite guard.

    ``running_mean`` and ``running_var`` are given (the caller has checked the arguments).
    """
    batch_mean, batch_var, both = _scratch_stats(running_mean)
    output = _native_batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    _fold_batch(
        both, batch_mean, batch_var, running_mean, running_var, num_batches_tracked, momentum, guard
    )
    return output


def _scratch_stats(running_mean: torch.Tensor):
    """Zeroed stand-ins for the running statistics in one call of torch's training op.

    torch's op folds the batch straight into the buffers it is given,
    ``new = (1 - momentum) old + momentum batch``. Given these with momentum 1, they end up
    holding exactly the batch's mean and unbiased variance, in the buffers' dtype, for
    :func:`_fold_batch` to check before anything the caller owns is touched. Zeros, not empty
    memory: ``0 * NaN`` is NaN.

    Returns:
        ``(mean, var, both)``: two ``(C,)`` tensors and one ``(2, C)`` array holding both, a
        NumPy array on the CPU (3 us cheaper a call than torch's allocation and views, next to
        a ~20 us op on a small batch), a tensor elsewhere.
    """
    dtype = _NUMPY_DTYPE.get(running_mean.dtype)
    if dtype is not None and running_mean.is_cpu:
        both = np.zeros((2, running_mean.shape[0]), dtype)
        return torch.from_numpy(both[0]), torch.from_numpy(both[1]), both
    both = torch.zeros(
        (2, running_mean.shape[0]), dtype=running_mean.dtype, device=running_mean.device
    )
    return (*both.unbind(), both)


def _fold_batch(
    both, batch_mean, batch_var, running_mean, running_var, num_batches_tracked, momentum, guard
) -> None:
    """Fold a batch's statistics (from :func:`_scratch_stats`) into the running buffers.

    The kernels' rule: nothing changes unless every statistic is finite (a variance too large
    for the buffers' dtype was already stored as Inf by torch's op), and then
    ``running <- running + factor (batch - running)``, ``factor`` being the momentum or, when
    it is None, ``1 / num_batches_tracked`` counting this batch; the counter advances last.
    One ``_foreach_lerp_`` updates both buffers and bumps their version counters.
    """
    if isinstance(both, np.ndarray):
        finite = bool(np.isfinite(both).all())
    else:
        finite = bool(torch.isfinite(both).all())
    if not finite:
        batch = both if isinstance(both, np.ndarray) else both.double().cpu().numpy()
        _reject_batch(guard, batch[0], batch[1])
        return
    factor = _batch_weight(num_batches_tracked, momentum)
    if running_mean.requires_grad or running_var.requires_grad:
        with torch.no_grad():  # updated as torch.nn updates them: outside the graph
            torch._foreach_lerp_((running_mean, running_var), (batch_mean, batch_var), factor)
    else:
        torch._foreach_lerp_((running_mean, running_var), (batch_mean, batch_var), factor)
    _count_batch(num_batches_tracked)
