r"""The eager autograd functions over the stages, in ``setup_context`` form.

Each :class:`torch.autograd.Function` here has a ``forward`` without ``ctx`` and a separate
``setup_context``: the form torch.func transforms and forward-mode AD need, so that ``vmap``
and ``jvp`` rules can be added without rebuilding the functions.

* :class:`TrainFn`: training forward with the batch's own statistics (fused kernels), whose
  backward includes the terms through the statistics;
* :class:`EvalFn`: normalization with given statistics in the input's dtype (the running
  ones), constants for autograd (torch.nn's evaluation semantics);
* :class:`NormalizeFn`: normalization with given float64 statistics, differentiable with
  respect to them too (the staged API).

Double backward (``create_graph=True``) and a backward batched by a torch.func transform
recompute the first backward with torch ops, which autograd can differentiate again and
functorch can batch (:func:`composite_grads`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _stages

__all__ = [
    "ActEvalFn",
    "ActTrainFn",
    "EvalFn",
    "GhostTrainFn",
    "NormalizeFn",
    "TrainFn",
    "apply",
    "composite_grads",
    "records_graph",
    "select_grads",
    "training_grads",
]


def records_graph(input, weight, bias) -> bool:
    """Whether autograd will record this call (and so a backward pass may follow)."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


# ``Function.apply`` is a Python wrapper around the C++ ``_FunctionBase.apply``. Outside
# functorch transforms (vmap, grad, ...) it binds default arguments for ``setup_context``
# functions (ours are always called with every argument) and walks the arguments to unwrap dead
# functorch wrappers (none can reach us outside a transform): ~13 us a call with a
# setup_context, against ~6 us for the C++ entry, next to ~30 us for a whole small BatchNorm.
# The C++ entry is used directly in that case; inside a transform, the full wrapper. Both are
# private: if a torch release drops either, every call takes the public wrapper.
_direct_apply = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


_functorch = getattr(torch._C, "_functorch", None)


def _needs_composite(dy: torch.Tensor) -> bool:
    """Whether a backward must be torch ops: to be differentiated again (``create_graph``), or
    batched by a transform (``torch.func.vmap`` over gradients, or the older vmap that
    ``gradcheck(check_batched_grad=True)`` uses, which leaves no transform active but hands
    over a batched gradient)."""
    if torch.is_grad_enabled() or (_transforms_active is not None and _transforms_active()):
        return True
    return _functorch is not None and (
        _functorch.is_legacy_batchedtensor(dy) or _functorch.is_functorch_wrapped_tensor(dy)
    )


def apply(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``, without the Python wrapper's cost where it does nothing."""
    if _direct_apply is None or _transforms_active is None or _transforms_active():
        return fn.apply(*args)
    return _direct_apply.__get__(None, fn)(*args)


def select_grads(ctx, dx, dw, db, offset=1):
    """Drop the gradients autograd did not ask for (weight and bias sit at ``offset``)."""
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dw if need[offset] else None,
        db if need[offset + 1] else None,
    )


def training_grads(dy, x_hat, invstd, weight):
    r"""The backward of a training forward in torch ops, from the normalized input.

    .. math::
        dx = \frac{\gamma\,\sigma^{-1}}{m}\Big(m\,\delta - \textstyle\sum\delta
        - \hat{x}\sum\delta\hat{x}\Big), \quad d\gamma = \textstyle\sum\delta\hat{x},
        \quad d\beta = \sum\delta

    Args:
        dy: The output's gradient :math:`\delta`.
        x_hat: :math:`\hat{x}`, the input normalized with the batch's statistics.
        invstd: :math:`\sigma^{-1}`, shaped to broadcast over the channel axis.
        weight: :math:`\gamma` (``(C,)``) or None.

    Returns:
        ``(dx, dweight, dbias)``.
    """
    shape = _stages.broadcast_shape(dy)
    axes = _stages.reduce_dims(dy)
    m = dy.numel() // dy.shape[1]
    sum_dy = dy.sum(dim=axes)
    sum_dy_xhat = (dy * x_hat).sum(dim=axes)
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    dx = scale / m * (m * dy - sum_dy.reshape(shape) - x_hat * sum_dy_xhat.reshape(shape))
    return dx, sum_dy_xhat, sum_dy


def composite_grads(dy, x, weight, mean, var, eps, training):
    """The backward formulas in torch ops, so that autograd can differentiate them again.

    With ``training`` the statistics are recomputed from ``x`` (they are functions of it);
    otherwise ``mean`` and ``var`` are the constants the forward used.

    Returns:
        ``(dx, dweight, dbias)``.
    """
    shape = _stages.broadcast_shape(x)
    axes = _stages.reduce_dims(x)
    if training:
        batch_mean = x.mean(dim=axes, keepdim=True)
        xmu = x - batch_mean
        invstd = torch.rsqrt((xmu * xmu).mean(dim=axes, keepdim=True) + eps)
        return training_grads(dy, xmu * invstd, invstd, weight)
    xmu = x - mean.reshape(shape)
    invstd = torch.rsqrt(var.reshape(shape) + eps)
    x_hat = xmu * invstd
    sum_dy = dy.sum(dim=axes)
    sum_dy_xhat = (dy * x_hat).sum(dim=axes)
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    dx = scale * dy
    return dx, sum_dy_xhat, sum_dy


class TrainFn(torch.autograd.Function):
    """Training forward on the fused kernels: ``(x, weight, bias, running..., factor, eps,
    route) -> (y, (mean, var, updated))``; the second output is not a tensor."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, factor, eps, route):
        y, mean, var, updated = _stages.train_forward(
            x, weight, bias, running_mean, running_var, factor, eps, route
        )
        # The batch statistics are new NumPy arrays nobody else holds: passed on as a
        # non-tensor output, not as saved tensors or extra differentiable outputs, which
        # measured ~4 us a call on (60, 100).
        return y, (mean, var, updated)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, _rm, _rv, _factor, eps, route = inputs
        ctx.save_for_backward(x, weight)
        ctx.stats = output[1]
        ctx.eps = eps
        ctx.route = route

    @staticmethod
    def backward(ctx, dy, _stats):
        x, weight = ctx.saved_tensors
        mean, var, _ = ctx.stats
        if _needs_composite(dy):
            dx, dw, db = composite_grads(dy, x, weight, None, None, ctx.eps, True)
        else:
            dx, dw, db = _stages.backward(dy, x, weight, mean, var, ctx.eps, True, ctx.route)
        return (*select_grads(ctx, dx, dw, db), None, None, None, None, None)


class GhostTrainFn(torch.autograd.Function):
    """Ghost batch norm's training forward on the grouped kernels: ``(x, weight, bias, size,
    groups, eps) -> (y, (mean, var, merged_mean, merged_m2))`` (see
    :func:`._stages.ghost_train_forward`); the second output is not a tensor."""

    @staticmethod
    def forward(x, weight, bias, size, groups, eps):
        y, *stats = _stages.ghost_train_forward(x, size, groups, weight, bias, eps)
        return y, tuple(stats)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _bias, size, _groups, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.stats = output[1]
        ctx.size = size
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, _stats):
        x, weight = ctx.saved_tensors
        mean, var = ctx.stats[:2]
        if _needs_composite(dy):
            # Per chunk, in torch ops (differentiable again); the last chunk runs to N.
            sizes = [ctx.size] * (mean.shape[0] - 1)
            sizes.append(x.shape[0] - sum(sizes))
            parts = [
                composite_grads(d, c, weight, None, None, ctx.eps, True)
                for d, c in zip(dy.split(sizes), x.split(sizes), strict=True)
            ]
            dx = torch.cat([p[0] for p in parts])
            dw = torch.stack([p[1] for p in parts]).sum(0)
            db = torch.stack([p[2] for p in parts]).sum(0)
        else:
            dx, dw, db = _stages.ghost_backward(dy, x, weight, mean, var, ctx.eps, ctx.size)
        return (*select_grads(ctx, dx, dw, db), None, None, None)


def _composite_act_grads(dy, x, weight, bias, mean, var, eps, training, spec, param):
    r"""The fused layers' backward in torch ops (double backward, batched gradients):
    :math:`\delta_z = \delta\,a'(z)`, then batch norm's formulas with :math:`\delta_z`."""
    shape = _stages.broadcast_shape(x)
    axes = _stages.reduce_dims(x)
    if training:
        xmu = x - x.mean(dim=axes, keepdim=True)
        invstd = torch.rsqrt((xmu * xmu).mean(dim=axes, keepdim=True) + eps)
    else:
        xmu = x - mean.reshape(shape)
        invstd = torch.rsqrt(var.reshape(shape) + eps)
    x_hat = xmu * invstd
    z = x_hat if weight is None else x_hat * weight.reshape(shape)
    z = z if bias is None else z + bias.reshape(shape)
    dz = dy * spec.derivative(z, param)
    if training:
        return training_grads(dz, x_hat, invstd, weight)
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    return scale * dz, (dz * x_hat).sum(dim=axes), dz.sum(dim=axes)


class ActTrainFn(torch.autograd.Function):
    """:class:`TrainFn` with an activation: ``(x, weight, bias, running..., factor, eps, spec,
    param) -> (y, (mean, var, updated))``; saves ``x`` (never ``z``) and the parameters."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, factor, eps, spec, param):
        y, mean, var, updated = _stages.act_train_forward(
            x, weight, bias, running_mean, running_var, factor, eps, spec.code, param
        )
        return y, (mean, var, updated)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _rm, _rv, _factor, eps, spec, param = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = output[1]
        ctx.eps = eps
        ctx.spec = spec
        ctx.param = param

    @staticmethod
    def backward(ctx, dy, _stats):
        x, weight, bias = ctx.saved_tensors
        mean, var, _ = ctx.stats
        if _needs_composite(dy):
            dx, dw, db = _composite_act_grads(
                dy, x, weight, bias, None, None, ctx.eps, True, ctx.spec, ctx.param
            )
        else:
            dx, dw, db = _stages.act_backward(
                dy, x, weight, bias, mean, var, ctx.eps, True, ctx.spec.code, ctx.param
            )
        return (*select_grads(ctx, dx, dw, db), None, None, None, None, None, None)


class ActEvalFn(torch.autograd.Function):
    """:class:`EvalFn` with an activation (the running statistics are constants)."""

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps, spec, param):
        return _stages.act_eval_forward(
            x, running_mean, running_var, weight, bias, eps, spec.code, param
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, bias, eps, spec, param = inputs
        ctx.save_for_backward(x, weight, bias, running_mean, running_var)
        ctx.eps = eps
        ctx.spec = spec
        ctx.param = param

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, running_mean, running_var = ctx.saved_tensors
        if _needs_composite(dy):
            dx, dw, db = _composite_act_grads(
                dy, x, weight, bias, running_mean, running_var, ctx.eps, False, ctx.spec,
                ctx.param,
            )  # fmt: skip
        else:
            dx, dw, db = _stages.act_backward(
                dy, x, weight, bias, running_mean, running_var, ctx.eps, False, ctx.spec.code,
                ctx.param,
            )  # fmt: skip
        dx, dw, db = select_grads(ctx, dx, dw, db, offset=3)
        return dx, None, None, dw, db, None, None, None


class EvalFn(torch.autograd.Function):
    """Evaluation forward on the kernels with statistics in the input's dtype (constants)."""

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps, route):
        return _stages.eval_forward(x, running_mean, running_var, weight, bias, eps, route)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, _bias, eps, route = inputs
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.route = route

    @staticmethod
    def backward(ctx, dy):
        x, weight, running_mean, running_var = ctx.saved_tensors
        if _needs_composite(dy):
            dx, dw, db = composite_grads(dy, x, weight, running_mean, running_var, ctx.eps, False)
        else:
            dx, dw, db = _stages.backward(
                dy, x, weight, running_mean, running_var, ctx.eps, False, ctx.route
            )
        dx, dw, db = select_grads(ctx, dx, dw, db, offset=3)
        return dx, None, None, dw, db, None, None


class NormalizeFn(torch.autograd.Function):
    r"""``y = (x - mean) / sqrt(var + eps) * weight + bias`` with float64 ``(C,)`` statistics.

    Differentiable with respect to all five tensors. With :math:`s = \gamma\sigma^{-1}`,
    :math:`S_1 = \sum\delta`, :math:`S_2 = \sum\delta(x - \mu)`:

    .. math::
        dx = s\,\delta, \quad d\gamma = \sigma^{-1} S_2, \quad d\beta = S_1, \quad
        d\mu = -s\,S_1, \quad d\sigma^2 = -\tfrac{1}{2}\gamma\sigma^{-3} S_2

    (the backward's two stages: the sums, then the input gradient).
    """

    @staticmethod
    def forward(x, mean, var, weight, bias, eps, route):
        invstd = 1.0 / np.sqrt(_float64(var) + eps)
        scale = invstd if weight is None else invstd * _float64(weight)
        shift = np.zeros_like(invstd) if bias is None else _float64(bias)
        return _stages.normalize(x, _float64(mean), scale, shift, route)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, eps, route = inputs
        ctx.save_for_backward(x, mean, var, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        ctx.route = route

    @staticmethod
    def backward(ctx, dy):
        x, mean, var, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        shape = _stages.broadcast_shape(x)
        if _needs_composite(dy):
            acc = _stages.accumulate_dtype(x)
            invstd = torch.rsqrt(var.to(acc) + ctx.eps)
            xmu = x.to(acc) - mean.to(acc).reshape(shape)
            w = 1.0 if weight is None else weight.to(acc)
            axes = _stages.reduce_dims(x)
            dy_acc = dy.to(acc)
            sum_dy = dy_acc.sum(dim=axes)
            sum_dy_xmu = (dy_acc * xmu).sum(dim=axes)
            dx = (dy_acc * (w * invstd).reshape(shape)).to(x.dtype)
        else:
            invstd_a = 1.0 / np.sqrt(_float64(var) + ctx.eps)
            w_a = np.ones_like(invstd_a) if weight is None else _float64(weight)
            sum_dy_a, sum_dy_xmu_a = _stages.backward_sums(dy, x, _float64(mean), ctx.route)
            dx = None
            if need[0]:
                zeros = np.zeros_like(invstd_a)
                dx = _stages.backward_apply(
                    dy, x, _float64(mean), w_a * invstd_a, zeros, zeros, ctx.route
                )
            invstd, w, sum_dy, sum_dy_xmu = (
                torch.from_numpy(a).to(x.device) for a in (invstd_a, w_a, sum_dy_a, sum_dy_xmu_a)
            )
        grads = [dx if need[0] else None, None, None, None, None]
        if need[1]:
            grads[1] = (-(w * invstd) * sum_dy).to(mean.dtype)
        if need[2]:
            grads[2] = (-0.5 * w * invstd**3 * sum_dy_xmu).to(var.dtype)
        if need[3]:
            grads[3] = (invstd * sum_dy_xmu).to(weight.dtype)
        if need[4]:
            grads[4] = sum_dy.to(ctx.bias_dtype)
        return (*grads, None, None)


def _float64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (or view) of a ``(C,)`` tensor, from any device."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()
