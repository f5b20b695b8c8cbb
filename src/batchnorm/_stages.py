r"""The stages of batch norm on one route, without autograd: tensors in, tensors and arrays out.

Each function runs one stage on the route :func:`batchnorm.routing.choose` picked: the Numba
kernels (through :mod:`._bridge`) or torch ops. Autograd, validation and bookkeeping (counters,
warnings) are the callers' (:mod:`batchnorm.functional`, :mod:`._autograd`,
:mod:`batchnorm.distributed`).

The stages, per channel :math:`c` over the :math:`m` values of the channel:

* **moments**: :math:`\mu_c` and :math:`M2_c = \sum (x - \mu_c)^2`, float64;
* **normalize**: :math:`y = (x - \mu)\,s + t` with per-channel ``scale`` :math:`s` and
  ``shift`` :math:`t` (for batch norm :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}`,
  :math:`t = \beta`);
* **backward sums**: :math:`S_1 = \sum \delta`, :math:`S_2 = \sum \delta (x - \mu)`;
* **backward apply**: :math:`dx = k^{dy}\delta + k^{xmu}(x - \mu) + k^{const}`;

The fused functions (:func:`train_forward`, :func:`eval_forward`, :func:`backward`) are the
fast compositions of those stages for the common calls; their kernels run the same blocks and
give the same numbers (see :mod:`batchnorm.kernels.fused`).
"""

from __future__ import annotations

import numpy as np
import torch

from ._bridge import (
    ABSENT,
    NUMPY_DTYPE,
    array,
    empty_output,
    float64_or,
    kernel,
    kernel_view,
    limit_of,
    match_layout,
    numpy_view,
    optional_array,
    run_parallel,
)
from .kernels import activated as _activated
from .kernels._config import contiguous_view, nchw_variant, nhwc_variant
from .routing import kernel_layout

__all__ = [
    "accumulate_dtype",
    "act_backward",
    "act_eval_forward",
    "act_normalize_",
    "act_train_forward",
    "backward",
    "backward_apply",
    "backward_sums",
    "broadcast_shape",
    "eval_forward",
    "ghost_backward",
    "ghost_train_forward",
    "inplace_backward",
    "masked_moments",
    "moments",
    "native_batch_norm",
    "native_train",
    "normalize",
    "reduce_dims",
    "train_forward",
]


def native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """torch's own op: every call of the package to it goes through here (tests spy on it)."""
    return torch.nn.functional.batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the torch-op stages' arithmetic: float64 on CPU, float32 elsewhere.

    GPUs run float64 at 1/2 to 1/64 of their float32 rate and batch norm is memory-bound, so a
    float64 copy of the activations would cost time and memory; torch's own CUDA BatchNorm
    accumulates in float32 too. float64 input stays float64.
    """
    if x.is_cpu or x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def broadcast_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``(1, -1, 1, ...)``: a ``(C,)`` tensor reshaped to broadcast over ``x``'s channels."""
    return (1, -1) + (1,) * (x.dim() - 2)


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every axis but the channel axis 1."""
    return [0, *range(2, x.dim())]


def _layout(x: torch.Tensor) -> str:
    """:func:`~batchnorm.routing.kernel_layout` of an input a kernel route took (never ``None``)."""
    layout = kernel_layout(x)
    assert layout is not None, "a kernel route only takes inputs the kernels can view"
    return layout


def _as_tensor(a, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.to(device=like.device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


def moments(x: torch.Tensor, route: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and M2 of a non-empty ``x``, float64 NumPy arrays of shape ``(C,)``.

    The kernels' block moments on a kernel route; ``torch.var_mean`` in the accumulation dtype
    (:func:`accumulate_dtype`) on the input's device otherwise, only ``2 C`` numbers travelling
    to the host.
    """
    channels = x.shape[1]
    count = x.numel() // channels
    if route != "torch":
        layout = _layout(x)
        xa = kernel_view(numpy_view(x), layout)
        mean = np.empty(channels)
        m2 = np.empty(channels)
        run_parallel(kernel("moments", layout, xa.dtype), xa, mean, m2)
        return mean, m2
    with torch.no_grad():
        var_t, mean_t = torch.var_mean(x.to(accumulate_dtype(x)), dim=reduce_dims(x), correction=0)
        stats = torch.stack([mean_t, var_t]).double().cpu().numpy()
    # M2 = m * biased variance: the sum of squared deviations the merge works with.
    return stats[0], stats[1] * count


def masked_moments(
    x: torch.Tensor, excluded: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and M2 of the positions of ``x`` that ``excluded`` does not mark.

    Torch ops in the accumulation dtype, differentiable with respect to ``x``: the mean is
    taken first and M2 summed about it, so a large mean does not cancel a small spread.

    Args:
        x: ``(N, C, *)``.
        excluded: Boolean ``(N, *)`` (``x``'s shape without the channel axis); True marks a
            position left out of the statistics (padding).

    Returns:
        ``(count, mean, m2)``: the number of included positions (a Python int, the same for
        every channel) and two ``(C,)`` tensors. A count of 0 gives zeros.
    """
    acc = accumulate_dtype(x)
    keep = (~excluded).unsqueeze(1).to(acc)
    count = int(keep.sum().item())
    dims = reduce_dims(x)
    xs = x.to(acc)
    if count == 0:
        zeros = xs.new_zeros(x.shape[1])
        return 0, zeros, zeros.clone()
    mean = (xs * keep).sum(dim=dims) / count
    centred = (xs - mean.reshape(broadcast_shape(x))) * keep
    return count, mean, (centred * centred).sum(dim=dims)


def normalize(x: torch.Tensor, mean, scale, shift, route: str) -> torch.Tensor:
    """``y = (x - mean) * scale + shift`` per channel, in ``x``'s dtype and memory layout.

    Args:
        x: ``(N, C, *)`` input.
        mean, scale, shift: ``(C,)`` float64 NumPy arrays (tensors on the torch route too).
        route: The route of the call.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    if route != "torch":
        layout = _layout(x)
        xa = kernel_view(numpy_view(x), layout)
        y, ya = empty_output(x, layout)
        run_parallel(
            kernel("normalize", layout, xa.dtype), xa, array(mean), array(scale), array(shift), ya
        )
        return y
    acc = accumulate_dtype(x)
    shape = broadcast_shape(x)
    mean_t, scale_t, shift_t = (_as_tensor(a, x, acc).reshape(shape) for a in (mean, scale, shift))
    with torch.no_grad():
        y = (x.detach().to(acc) - mean_t) * scale_t + shift_t
        return y.to(x.dtype)


def backward_sums(dy: torch.Tensor, x: torch.Tensor, mean, route: str):
    r"""The backward's per-channel sums :math:`S_1 = \sum\delta`, :math:`S_2 = \sum\delta(x-\mu)`.

    Returns:
        ``(sum_dy, sum_dy_xmu)``, float64 NumPy arrays of shape ``(C,)`` (zeros for empty ``x``).
    """
    channels = x.shape[1]
    if x.numel() == 0:
        return np.zeros(channels), np.zeros(channels)
    if route != "torch":
        layout = _layout(x)
        sum_dy = np.zeros(channels)
        sum_dy_xmu = np.zeros(channels)
        xa = kernel_view(numpy_view(x), layout)
        dya = kernel_view(numpy_view(match_layout(dy, x)), layout)
        run_parallel(
            kernel("backward_reduce", layout, xa.dtype), dya, xa, array(mean), sum_dy, sum_dy_xmu
        )
        return sum_dy, sum_dy_xmu
    acc = accumulate_dtype(x)
    mean_t = _as_tensor(mean, x, acc).reshape(broadcast_shape(x))
    with torch.no_grad():
        dy_acc = dy.to(acc)
        dims = reduce_dims(x)
        sums = torch.stack(
            [dy_acc.sum(dim=dims), (dy_acc * (x.detach().to(acc) - mean_t)).sum(dim=dims)]
        )
    sum_dy, sum_dy_xmu = sums.double().cpu().numpy()
    return sum_dy, sum_dy_xmu


def backward_apply(dy: torch.Tensor, x: torch.Tensor, mean, k_dy, k_xmu, k_const, route: str):
    r"""The input gradient :math:`dx = k^{dy}\delta + k^{xmu}(x - \mu) + k^{const}` per channel.

    Args:
        dy, x: ``(N, C, *)``, the output's gradient and the forward's input.
        mean, k_dy, k_xmu, k_const: ``(C,)`` float64 NumPy arrays.
        route: The route of the call.

    Returns:
        ``dx`` in ``x``'s dtype and memory layout.
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    if route != "torch":
        layout = _layout(x)
        xa = kernel_view(numpy_view(x), layout)
        dya = kernel_view(numpy_view(match_layout(dy, x)), layout)
        dx, dxa = empty_output(x, layout)
        run_parallel(
            kernel("backward_apply", layout, xa.dtype),
            dya,
            xa,
            array(mean),
            k_dy,
            k_xmu,
            k_const,
            dxa,
        )
        return dx
    acc = accumulate_dtype(x)
    shape = broadcast_shape(x)
    mean_t, k_dy_t, k_xmu_t, k_const_t = (
        _as_tensor(a, x, acc).reshape(shape) for a in (mean, k_dy, k_xmu, k_const)
    )
    with torch.no_grad():
        dx = dy.to(acc) * k_dy_t + (x.detach().to(acc) - mean_t) * k_xmu_t + k_const_t
        return dx.to(x.dtype)


# --------------------------------------------------------------------------------------------
# The fused compositions (the kernels' fast path for whole passes)
# --------------------------------------------------------------------------------------------


def train_forward(
    x, weight, bias, running_mean, running_var, factor: float, eps: float, route, code: int = 0,
    param=None,
):  # fmt: skip
    """Moments, normalize and the running update in one kernel call (Algorithm 1).

    ``code``: an activation applied to the output (:mod:`batchnorm.kernels.activated`, the
    parallel kernels; ``param`` its parameter); 0 is none, on the ``route``'s kernels.

    Returns:
        ``(y, mean, var, updated)``: the output; the batch mean and *biased* variance (float64
        NumPy arrays of shape ``(C,)``, what the backward needs); and ``False`` if running
        statistics were given but left alone because the batch's are not finite.
    """
    layout = _layout(x)
    channels = x.shape[1]
    xa = kernel_view(numpy_view(x), layout)
    y, ya = empty_output(x, layout)
    mean = np.empty(channels)
    var = np.empty(channels)
    if running_mean is not None:
        running_mean_a, running_var_a = numpy_view(running_mean), numpy_view(running_var)
    else:
        factor = 0.0
        running_mean_a = running_var_a = ABSENT[x.dtype]
    weight_a, bias_a = optional_array(weight, x.dtype), optional_array(bias, x.dtype)
    stats = (mean, var, running_mean_a, running_var_a, factor, limit_of(xa.dtype))
    if code:
        fn, shape = _activated.select(code, "train", layout, xa.shape)
        xv, yv = contiguous_view(xa, shape), contiguous_view(ya, shape)
        updated = run_parallel(fn, xv, weight_a, bias_a, eps, _kernel_param(param), yv, *stats)
    elif route == "serial":
        updated = kernel("train_serial", layout, xa.dtype)(xa, weight_a, bias_a, eps, ya, *stats)
    else:
        fn = kernel("train_parallel", layout, xa.dtype)
        updated = run_parallel(fn, xa, weight_a, bias_a, eps, ya, *stats)
    if updated and running_mean is not None:
        torch.autograd.graph.increment_version(running_mean)
        torch.autograd.graph.increment_version(running_var)
    return y, mean, var, updated


def eval_forward(x, running_mean, running_var, weight, bias, eps: float, route) -> torch.Tensor:
    """Algorithm 2, step 11: normalize with the given (population) statistics."""
    layout = _layout(x)
    xa = kernel_view(numpy_view(x), layout)
    weight_a = optional_array(weight, x.dtype)
    bias_a = optional_array(bias, x.dtype)
    running_mean_a, running_var_a = numpy_view(running_mean), numpy_view(running_var)
    if route == "serial":
        y, ya = empty_output(x, layout)
        kernel("eval_serial", layout, xa.dtype)(
            xa, running_mean_a, running_var_a, weight_a, bias_a, eps, ya
        )
        return y
    channels = x.shape[1]
    invstd = 1.0 / np.sqrt(running_var_a.astype(np.float64) + eps)
    scale = invstd * float64_or(weight_a, channels, 1.0)
    return normalize(
        x, running_mean_a.astype(np.float64), scale, float64_or(bias_a, channels, 0.0), route
    )


def backward(dy, x, weight, mean, var, eps: float, training: bool, route):
    r"""Gradients of either transform, from the statistics it normalized with.

    With :math:`\sigma^{-1} = 1/\sqrt{\mathrm{var} + \epsilon}` and per-channel sums
    :math:`S_1 = \sum \delta`, :math:`S_2 = \sum \delta (x - \mu)`, training gives
    (``reference.batch_norm_train_backward``)

    .. math::
        dx = \gamma\sigma^{-1}\,\delta - \frac{\gamma\sigma^{-3} S_2}{m}(x - \mu)
             - \frac{\gamma\sigma^{-1} S_1}{m}

    and evaluation only the first term (the statistics are constants there). Both have
    :math:`d\gamma = \sigma^{-1} S_2` and :math:`d\beta = S_1`.

    Args:
        route: ``"serial"`` or ``"parallel"``.

    Returns:
        ``(dx, dweight, dbias)``; ``dweight``/``dbias`` have ``x``'s dtype and shape ``(C,)``.
    """
    layout = _layout(x)
    channels = x.shape[1]
    xa = kernel_view(numpy_view(x), layout)
    dya = kernel_view(numpy_view(match_layout(dy, x)), layout)
    dx, dxa = empty_output(x, layout)
    # In x's dtype: the kernels accumulate in float64 and round once at the store, which saves
    # two tensor conversions (~3 us each on a small batch).
    dweight = np.empty(channels, xa.dtype)
    dbias = np.empty(channels, xa.dtype)
    args = (
        dya,
        xa,
        array(mean),
        array(var),
        optional_array(weight, x.dtype),
        eps,
        training,
        dxa,
        dweight,
        dbias,
    )
    if route == "serial":
        kernel("backward_serial", layout, xa.dtype)(*args)
    else:
        run_parallel(kernel("backward_parallel", layout, xa.dtype), *args)
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


# --------------------------------------------------------------------------------------------
# Ghost batches: the training passes per chunk of the batch (kernels/grouped.py)
# --------------------------------------------------------------------------------------------


def ghost_train_forward(x, size: int, groups: int, weight, bias, eps: float):
    """Batch norm of each of ``groups`` chunks of ``size`` samples (the last runs to ``N``).

    Only for a contiguous float32/float64 CPU ``x`` on the parallel route: one kernel call,
    no copy of ``x``.

    Returns:
        ``(y, mean, var, merged_mean, merged_m2)``: the output (``x``'s shape, dtype and
        layout); the chunks' means and *biased* variances, float64 ``(groups, C)`` (what the
        backward needs); the whole batch's mean and M2, float64 ``(C,)`` (the chunks' moments
        merged).
    """
    channels = x.shape[1]
    xa = kernel_view(numpy_view(x), "nchw")
    y, ya = empty_output(x, "nchw")
    mean = np.empty((groups, channels))
    var = np.empty((groups, channels))
    merged_mean = np.empty(channels)
    merged_m2 = np.empty(channels)
    run_parallel(
        kernel("ghost_train", "nchw", xa.dtype),
        xa,
        size,
        optional_array(weight, x.dtype),
        optional_array(bias, x.dtype),
        eps,
        ya,
        mean,
        var,
        merged_mean,
        merged_m2,
    )
    return y, mean, var, merged_mean, merged_m2


def ghost_backward(dy, x, weight, mean, var, eps: float, size: int):
    """Gradients of :func:`ghost_train_forward`: batch norm's training backward per chunk.

    Returns:
        ``(dx, dweight, dbias)``; ``dweight``/``dbias`` (summed over the chunks) have ``x``'s
        dtype and shape ``(C,)``.
    """
    channels = x.shape[1]
    xa = kernel_view(numpy_view(x), "nchw")
    dya = kernel_view(numpy_view(dy.contiguous()), "nchw")
    dx, dxa = empty_output(x, "nchw")
    dweight = np.empty(channels, xa.dtype)
    dbias = np.empty(channels, xa.dtype)
    run_parallel(
        kernel("ghost_backward", "nchw", xa.dtype),
        dya,
        xa,
        size,
        mean,
        var,
        optional_array(weight, x.dtype),
        eps,
        dxa,
        dweight,
        dbias,
    )
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


def native_train(input, weight, bias, eps: float, stats_dtype, stats_device):
    """torch's training op, and the batch's mean and *biased* variance as float64 arrays.

    torch's op folds the batch into the running buffers it is given,
    ``new = (1 - momentum) old + momentum batch``; given zeroed scratch buffers and momentum 1,
    they end up holding exactly the batch's mean and unbiased variance, in ``stats_dtype``
    (zeros, not empty memory: ``0 * NaN`` is NaN). On the CPU the scratch is NumPy memory (3 us
    cheaper a call than torch's allocation and views, next to a ~20 us op on a small batch).

    Returns:
        ``(y, mean, var)``: the op's output (differentiable as torch's op is) and two ``(C,)``
        float64 arrays.
    """
    channels = input.shape[1]
    dtype = NUMPY_DTYPE.get(stats_dtype)
    if dtype is not None and stats_device.type == "cpu":
        both = np.zeros((2, channels), dtype)
        batch_mean, batch_var = torch.from_numpy(both[0]), torch.from_numpy(both[1])
    else:
        scratch = torch.zeros((2, channels), dtype=stats_dtype, device=stats_device)
        batch_mean, batch_var = scratch.unbind()
    y = native_batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    if dtype is None or stats_device.type != "cpu":
        both = scratch.double().cpu().numpy()
    count = input.numel() // channels
    # Back from the unbiased variance torch stores to the biased one the update takes.
    return y, both[0].astype(np.float64), both[1].astype(np.float64) * ((count - 1) / count)


# --------------------------------------------------------------------------------------------
# Batch norm followed by an activation (kernels/activated.py): one call each way
# --------------------------------------------------------------------------------------------


def act_train_forward(x, weight, bias, running_mean, running_var, factor, eps, code, param):
    """:func:`train_forward` with the activation ``code`` applied to the output."""
    return train_forward(
        x, weight, bias, running_mean, running_var, factor, eps, "parallel", code, param
    )


def _kernel_param(param) -> float:
    # The kernels take a float whatever the activation; those without a parameter ignore it.
    return 0.0 if param is None else float(param)


def _affine_of(mean, var, weight, bias, eps: float, channels: int):
    r"""float64 ``(mean, invstd, scale, shift)`` of the map :math:`z = (x - \mu) s + t`, with the
    kernels' arithmetic (``_affine``), so that a backward recomputes the forward's ``z``."""
    invstd = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    scale = invstd * float64_or(weight, channels, 1.0)
    return np.asarray(mean, dtype=np.float64), invstd, scale, float64_or(bias, channels, 0.0)


def act_eval_forward(x, running_mean, running_var, weight, bias, eps, code, param):
    """:func:`eval_forward` with the activation ``code`` applied to the output."""
    layout = _layout(x)
    xa = kernel_view(numpy_view(x), layout)
    y, ya = empty_output(x, layout)
    mean, _, scale, shift = _affine_of(
        numpy_view(running_mean),
        numpy_view(running_var),
        optional_array(weight, x.dtype),
        optional_array(bias, x.dtype),
        eps,
        x.shape[1],
    )
    fn, shape = _activated.select(code, "eval", layout, xa.shape)
    run_parallel(
        fn,
        contiguous_view(xa, shape),
        mean,
        scale,
        shift,
        _kernel_param(param),
        contiguous_view(ya, shape),
    )
    return y


def act_normalize_(x, *, mean, var, weight, bias, eps, code, param) -> torch.Tensor:
    """:func:`act_eval_forward` with float64 NumPy ``(C,)`` statistics, written over ``x``
    (the kernels read each value before they write it; the in-place activated layers)."""
    layout = _layout(x)
    xa = kernel_view(numpy_view(x), layout)
    mean, _, scale, shift = _affine_of(
        mean,
        var,
        optional_array(weight, x.dtype),
        optional_array(bias, x.dtype),
        eps,
        x.shape[1],
    )
    fn, shape = _activated.select(code, "inplace", layout, xa.shape)
    run_parallel(fn, contiguous_view(xa, shape), mean, scale, shift, _kernel_param(param))
    return x


def act_backward(dy, x, weight, bias, mean, var, eps, training, code, param):
    r"""Gradients of :func:`act_train_forward` (``training``) or :func:`act_eval_forward`.

    :math:`\delta_z = \delta\,a'(z)` with :math:`z` recomputed from ``x``, then
    :func:`backward`'s formulas with :math:`\delta_z` for :math:`\delta`.

    Returns:
        ``(dx, dweight, dbias)`` as :func:`backward`.
    """
    layout = _layout(x)
    channels = x.shape[1]
    xa = kernel_view(numpy_view(x), layout)
    dya = kernel_view(numpy_view(match_layout(dy, x)), layout)
    dx, dxa = empty_output(x, layout)
    weight_a = optional_array(weight, x.dtype)
    mean64, invstd, scale, shift = _affine_of(
        array(mean), array(var), weight_a, optional_array(bias, x.dtype), eps, channels
    )
    dweight = np.empty(channels, xa.dtype)
    dbias = np.empty(channels, xa.dtype)
    fn, shape = _activated.select(code, "backward", layout, xa.shape)
    run_parallel(
        fn,
        contiguous_view(dya, shape),
        contiguous_view(xa, shape),
        mean64,
        scale,
        shift,
        invstd,
        weight_a,
        _kernel_param(param),
        training,
        contiguous_view(dxa, shape),
        dweight,
        dbias,
    )
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


def inplace_backward(dy, y, inv_gamma, beta, k, code: int, param, training: bool, want_dx: bool):
    r"""The backward of in-place activated batch norm from its output ``y`` (one kernel call;
    see :func:`batchnorm.kernels.activated.inplace_backward_for` for the math).

    Args:
        dy, y: The output's gradient and the output, ``(N, C, *)`` on the kernels' layouts.
        inv_gamma, beta, k: float64 ``(C,)``: :math:`1/\gamma`, :math:`\beta` and
            :math:`\gamma\,\mathrm{invstd}`.

    Returns:
        ``(dx, sum_dz, sum_dz_x_hat)``: ``dx`` in ``y``'s dtype and layout (``None`` unless
        ``want_dx``), and the float64 per-channel sums (:math:`d\beta`, :math:`d\gamma`).
    """
    layout = _layout(y)
    channels = y.shape[1]
    ya = kernel_view(numpy_view(y), layout)
    dya = kernel_view(numpy_view(match_layout(dy, y)), layout)
    dx, dxa = empty_output(y, layout) if want_dx else (None, ya)
    sum_dz = np.empty(channels)
    sum_dz_x_hat = np.empty(channels)
    rows, cols = _activated.inplace_backward_for(code)
    fn, shape = (nchw_variant if layout == "nchw" else nhwc_variant)(ya.shape, rows, cols)
    run_parallel(
        fn,
        contiguous_view(dya, shape),
        contiguous_view(ya, shape),
        inv_gamma,
        beta,
        k,
        _kernel_param(param),
        training,
        want_dx,
        contiguous_view(dxa, shape),
        sum_dz,
        sum_dz_x_hat,
    )
    return dx, sum_dz, sum_dz_x_hat
