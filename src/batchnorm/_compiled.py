"""The op under ``torch.compile`` and ``torch.export``: custom ops with fake implementations.

Graphs hold the kernels as opaque nodes ``torch.ops.batchnorm.*``, each with a fake (meta)
implementation for tracing and, for the forwards, an autograd formula in ``setup_context``
form. Eager mode does not use them: an eager call to a custom op with autograd costs ~80 us,
more than torch's whole BatchNorm1d on a small batch. The ops run the same stages as the eager
path (:mod:`._stages`, :mod:`._running`), so compiled and eager results agree.
"""

from __future__ import annotations

import torch

from . import _running, _stages
from ._autograd import select_grads
from ._validate import caller_name
from .routing import choose

__all__ = ["compiled_batch_norm"]


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
) -> torch.Tensor:
    """A checked batch-norm call on the kernels while torch.compile traces: graph nodes only."""
    if not training:
        return torch.ops.batchnorm.batch_norm_eval(
            input, running_mean, running_var, weight, bias, eps
        )
    y, mean, var = torch.ops.batchnorm.batch_norm_train(input, weight, bias, eps)
    if running_mean is not None:
        torch.ops.batchnorm.update_running_stats(
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
