"""The layer inside graphs: torch ops the compiler fuses, or custom ops for ``torch.export``.

* **torch.compile**: the normalization is written in torch ops (:func:`traced_train`,
  :func:`traced_eval`), which the compiler fuses with the convolutions, activations and
  additions around it, forward and backward, as it fuses torch.nn's own layer. An opaque call
  into the Numba kernels would stop that fusion at every BatchNorm: measured on this project's
  machine, a compiled training step of a 4 x (Linear 512 + BatchNorm1d + ReLU) MLP then ran at
  0.84x the compiled torch.nn model's, ResNet-18 at 0.93x. The eager guarantees are kept: the
  statistics are taken about each channel's own first value, so a mean large next to the spread
  cannot cancel the variance, and the running update is the eager path's own (the
  ``update_running_stats`` op), which leaves the buffers and the counter untouched on a batch
  whose statistics are not finite.
* **torch.export**: graphs hold the kernels as opaque nodes ``torch.ops.batchnorm.*``, each
  with a fake (meta) implementation for tracing and, for the forwards, an autograd formula in
  ``setup_context`` form, so that an exported program computes exactly what eager mode does.

Eager mode uses none of this: an eager call to a custom op with autograd costs ~80 us, more
than torch's whole BatchNorm1d on a small batch.
"""

from __future__ import annotations

import torch

from . import _running, _stages
from ._autograd import select_grads, training_grads
from ._validate import caller_name, report_nonfinite
from .routing import choose

__all__ = ["compiled_batch_norm", "traced_eval", "traced_train", "traced_update"]


def _kernel_route(x: torch.Tensor, op: str) -> str:
    # The caller sends only inputs the kernels take; the thresholds pick serial or parallel.
    return "serial" if choose(x, op) == "serial" else "parallel"


@torch.library.custom_op("batchnorm::batch_norm_train", mutates_args=())
def _train_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, var, _ = _stages.train_forward(
        x, weight, bias, None, None, 0.0, eps, _kernel_route(x, "train")
    )
    return y, torch.from_numpy(mean), torch.from_numpy(var)


@_train_op.register_fake
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
    mean_a, var_a = mean.numpy(), var.numpy()
    factor = _running.batch_weight(num_batches_tracked, momentum)
    updated = _running.update(running_mean, running_var, mean_a, var_a, count, factor)
    # In a graph there is no layer to count a skipped batch; the warning (or error) remains.
    _running.settle(updated, mean_a, var_a, num_batches_tracked, _running.Guard(nonfinite, where))


@_update_running_op.register_fake
def _(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, where):
    return None


@torch.library.custom_op("batchnorm::batch_norm_eval", mutates_args=())
def _eval_op(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    # No evaluation routing to torch's op inside a graph: the kernels split serial/parallel
    # by size as the backward does.
    return _stages.eval_forward(
        x, running_mean, running_var, weight, bias, eps, _kernel_route(x, "backward")
    )


@_eval_op.register_fake
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
    return _stages.backward(dy, x, weight, mean, var, eps, training, _kernel_route(x, "backward"))


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
    return (*select_grads(ctx, dx, dw, db), None)


def _eval_setup_context(ctx, inputs, output):
    x, running_mean, running_var, weight, _bias, eps = inputs
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.eps = eps


def _eval_backward(ctx, dy):
    x, weight, running_mean, running_var = ctx.saved_tensors
    dx, dw, db = torch.ops.batchnorm.batch_norm_backward(
        dy, x, weight, running_mean, running_var, ctx.eps, False
    )
    dx, dw, db = select_grads(ctx, dx, dw, db, offset=3)
    return dx, None, None, dw, db, None


_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)
_eval_op.register_autograd(_eval_backward, setup_context=_eval_setup_context)


def _centred_moments(input):
    """The channels' pivots (their first values), ``input - pivot``, and the biased variance
    and mean of that difference.

    A pivot that is not finite is used as it is (the kernels use 0 there): the channel then
    holds that value, so its statistics are not finite either way and the batch is left out,
    and its output is NaN either way. Replacing it (``where(isfinite(p), p, 0)``) cost more
    than the rest of the layer: the compiler recomputed the choice for every element, and a
    4-layer MLP's compiled forward took 57 ms per 100 steps instead of 37 (torch.nn: 33).
    """
    pivot = input.detach()[0].reshape(input.shape[1], -1)[:, 0]
    centred = input - pivot.reshape(_stages.broadcast_shape(input))
    var, mean_centred = torch.var_mean(centred, dim=_stages.reduce_dims(input), correction=0)
    return pivot, centred, var, mean_centred


class _TracedTrain(torch.autograd.Function):
    """:func:`traced_train` with its backward in closed form (two channel sums and one
    elementwise pass, :func:`._autograd.training_grads`), which the compiler fuses as it fuses
    torch.nn's; differentiating the forward's ops one by one instead gave a longer backward
    graph."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        shape = _stages.broadcast_shape(input)
        pivot, centred, var, mean_centred = _centred_moments(input)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        y = (centred - mean_centred.reshape(shape)) * scale.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        mean = mean_centred.double() + pivot.double()
        var64 = var.double()
        ctx.save_for_backward(input, weight, pivot, mean_centred, invstd)
        ctx.mark_non_differentiable(mean, var64)
        return y, mean, var64

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        input, weight, pivot, mean_centred, invstd = ctx.saved_tensors
        shape = _stages.broadcast_shape(input)
        invstd = invstd.reshape(shape)
        # Centred as in the forward: x - p_c is exact, x - mean would not be in float32.
        x_hat = ((input - pivot.reshape(shape)) - mean_centred.reshape(shape)) * invstd
        dx, dweight, dbias = training_grads(dy, x_hat, invstd, weight)
        return (*select_grads(ctx, dx, dweight, dbias), None)


def traced_train(input, weight, bias, eps: float):
    r"""The training forward in torch ops, for a graph compiler to fuse and differentiate.

    With :math:`p_c` the channel's first value and :math:`d = x - p_c`:

    .. math::
        \mu_d, \sigma^2 = \mathrm{mean}(d), \mathrm{var}(d) \text{ (biased)}, \quad
        \hat{x} = (d - \mu_d) / \sqrt{\sigma^2 + \epsilon}, \quad
        y = \gamma\hat{x} + \beta, \quad \mu = \mu_d + p_c

        dx = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}\Big(\delta - \tfrac{1}{m}\textstyle\sum
        \delta - \hat{x}\,\tfrac{1}{m}\sum\delta\hat{x}\Big), \quad
        d\gamma = \textstyle\sum\delta\hat{x}, \quad d\beta = \sum\delta

    The variance of :math:`d` is that of :math:`x`, but :math:`d` is of the size of the spread
    rather than of the mean, so a mean of 1e4 over a spread of 1e-2 in float32 keeps its
    variance; and :math:`x - p_c` is exact when the two are within a factor of two
    (Sterbenz). The pivot is a constant: :math:`y` does not depend on it.

    Returns:
        ``(y, mean, var)``: the output, and the batch's mean and biased variance as float64
        ``(C,)`` tensors outside the graph of ``y`` (what the running update takes).
    """
    return _TracedTrain.apply(input, weight, bias, eps)


def traced_eval(input, running_mean, running_var, weight, bias, eps: float) -> torch.Tensor:
    r"""The evaluation forward in torch ops: :math:`y = (x - \mu)\,\gamma / \sqrt{\sigma^2 +
    \epsilon} + \beta` with the given statistics, centred before scaling (as the kernels do) so
    that a large mean costs no accuracy. The scale is formed in float64, then rounded once."""
    shape = _stages.broadcast_shape(input)
    scale = torch.rsqrt(running_var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    y = (input - running_mean.reshape(shape)) * scale.to(input.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@torch.library.custom_op("batchnorm::batch_verdict", mutates_args=())
def _verdict_op(
    ok: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, nonfinite: str, where: str
) -> torch.Tensor:
    """Report a batch left out (warn, or raise by ``nonfinite``); return the verdict ``ok``.

    The one step of the traced update that is not a torch op: warnings and exceptions are
    effects a graph cannot hold. The update reads the verdict from this op's output, so the op
    stays in the graph and runs before anything is written.
    """
    if not bool(ok):
        report_nonfinite(nonfinite, where, mean.numpy(), var.numpy())
    return ok.clone()


@_verdict_op.register_fake
def _(ok, mean, var, nonfinite, where):
    return torch.empty_like(ok)


def traced_update(
    running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, where
) -> None:
    r"""The running update of :mod:`._running` in torch ops, for a graph compiler to fuse.

    The arithmetic of :func:`batchnorm.kernels.update_running` (float64, rounded once to the
    buffers' dtype; a batch of weight 1 replaces the old values) and its guard: a batch whose
    mean or unbiased variance is not finite, or too large for the buffers' dtype, writes
    nothing, is not counted, and is reported by ``nonfinite`` (:func:`_verdict_op`). Measured
    against the ``update_running_stats`` custom op it replaces under torch.compile (the op
    mutates its arguments, so the compiled graph clones and copies them back around a Python
    call): ~250 us a layer and step less.
    """
    limit = torch.finfo(running_mean.dtype).max
    unbiased = var * (count / (count - 1.0))
    ok = ((mean.abs() <= limit) & (unbiased <= limit)).all()  # NaN fails both comparisons

    def report(ok, mean, unbiased):
        return torch.ops.batchnorm.batch_verdict(ok, mean, unbiased, nonfinite, where)

    def quiet(ok, mean, unbiased):
        return ok.clone()

    # The report (an opaque call, ~40 us inside a training step) only for a batch left out.
    reported = torch.cond(ok, quiet, report, (ok, mean, unbiased))
    if num_batches_tracked is None:
        ok = reported  # nothing else would keep the report in the graph
    old_mean, old_var = running_mean.double(), running_var.double()
    if momentum is None and num_batches_tracked is not None:
        factor = 1.0 / (num_batches_tracked.double() + 1.0)
        keep = 1.0 - factor
        new_mean = torch.where(keep == 0.0, factor * mean, keep * old_mean + factor * mean)
        new_var = torch.where(keep == 0.0, factor * unbiased, keep * old_var + factor * unbiased)
    else:
        factor = float(momentum)
        keep = 1.0 - factor
        if keep == 0.0:
            new_mean, new_var = factor * mean, factor * unbiased
        else:
            new_mean = keep * old_mean + factor * mean
            new_var = keep * old_var + factor * unbiased
    with torch.no_grad():
        running_mean.copy_(torch.where(ok, new_mean, old_mean))
        running_var.copy_(torch.where(ok, new_var, old_var))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(reported.to(num_batches_tracked.dtype))


def compiled_batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum,
    eps: float,
    num_batches_tracked,
    nonfinite: str,
    where,
    *,
    kernels: bool,
) -> torch.Tensor:
    """A checked batch-norm call while torch.compile or torch.export traces: graph nodes only.

    With ``kernels`` (torch.export, kernels enabled) the kernels' custom ops, which an exported
    program runs as eager mode does; otherwise torch ops for the compiler to fuse
    (:func:`traced_train`, :func:`traced_eval`, :func:`traced_update`).
    """
    if not training:
        if kernels:
            return torch.ops.batchnorm.batch_norm_eval(
                input, running_mean, running_var, weight, bias, eps
            )
        return traced_eval(input, running_mean, running_var, weight, bias, eps)
    if kernels:
        y, mean, var = torch.ops.batchnorm.batch_norm_train(input, weight, bias, eps)
    else:
        y, mean, var = traced_train(input, weight, bias, eps)
    if running_mean is not None:
        update = torch.ops.batchnorm.update_running_stats if kernels else traced_update
        update(
            running_mean,
            running_var,
            num_batches_tracked,
            mean,
            var,
            input.numel() // input.shape[1],
            momentum,
            nonfinite,
            caller_name(where),
        )
    return y
