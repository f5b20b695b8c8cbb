"""The route of a checked call: from arguments to an implementation, and the layers' forward.

:func:`run` is the one path every batch-norm call of the package takes once its arguments are
checked: ``torch.compile`` (graph nodes), torch's op (with this package's running update), or
the kernels (with autograd when a graph is recorded). Where it goes is decided by
:func:`batchnorm.routing.choose`. :func:`forward_layer` is a layer's whole forward pass: the
cheap test of the common call, then the full checks and :func:`run`.
"""

from __future__ import annotations

import functools
import warnings
from typing import cast

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import _running, _stages
from ._autograd import ActEvalFn, ActTrainFn, EvalFn, TrainFn, apply, records_graph
from ._compiled import compiled_batch_norm
from ._interop import traced_call
from ._running import Guard
from ._validate import (
    NONFINITE_POLICIES,
    check_batch_norm_args,
    check_layer_input,
    check_nonfinite_policy,
    layer_name,
)
from .routing import choose, kernels_enabled, kernels_take, transformed

__all__ = ["evaluate", "forward_layer", "run", "train", "warn_fallback_once"]


def run(
    input, running_mean, running_var, weight, bias, training, momentum, eps, counter, guard,
    activation=None,
):  # fmt: skip
    """A checked batch-norm call: the one route from arguments to an implementation.

    ``activation``: ``None``, or ``(spec, param)`` (a :class:`batchnorm.activations.Activation`
    and its parameter) applied to the output: inside the kernels on the parallel route, in
    torch ops after the normalization on every other.
    """
    output, activated = _dispatch(
        input, running_mean, running_var, weight, bias, training, momentum, eps, counter, guard,
        activation,
    )  # fmt: skip
    return output if activation is None or activated else _activate(output, activation)


def _activate(output: torch.Tensor, activation) -> torch.Tensor:
    """``activation = (spec, param)`` applied to a normalized output in torch ops."""
    spec, param = activation
    return spec.forward(output, param)


def _dispatch(
    input, running_mean, running_var, weight, bias, training, momentum, eps, counter, guard,
    activation,
):  # fmt: skip
    """:func:`run`'s route: ``(output, whether the kernels applied the activation)``."""
    if not training or running_mean is None:
        counter = None  # counted only when running statistics are updated
    if input.numel() == 0:
        # No values, no statistics: normalize nothing and leave every buffer as it was.
        output = _stages.native_batch_norm(
            input,
            None if training else running_mean,
            None if training else running_var,
            weight,
            bias,
            training,
            0.0,
            eps,
        )
        return output, False
    stats_require_grad = running_mean is not None and (
        running_mean.requires_grad or running_var.requires_grad
    )
    if torch.compiler.is_compiling() and kernels_take(input) and not stats_require_grad:
        # torch ops for torch.compile; the kernels' custom ops for torch.export, unless the
        # policy turned the kernels off (read only then: torch.compile needs no policy).
        exporting = torch.compiler.is_exporting()
        output = compiled_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            counter,
            guard.nonfinite,
            guard.where if guard.layer is None else layer_name(guard.layer),
            kernels=exporting and kernels_enabled(),
        )
        return output, False
    route = choose(
        input, "train" if training else "eval", statistics_require_grad=stats_require_grad
    )
    if route == "torch":
        if transformed():
            output = _as_torch_nn(
                input, running_mean, running_var, weight, bias, training, momentum, eps, counter
            )
            return output, False
        if not kernels_take(input):
            warn_fallback_once(input)
        if not training or running_mean is None:
            output = _stages.native_batch_norm(
                input, running_mean, running_var, weight, bias, training, 0.0, eps
            )
            return output, False
        output, mean, var = _stages.native_train(
            input, weight, bias, eps, running_mean.dtype, running_mean.device
        )
        factor = _running.batch_weight(counter, momentum)
        updated = _running.update(
            running_mean, running_var, mean, var, input.numel() // input.shape[1], factor
        )
        _running.settle(updated, mean, var, counter, guard)
        return output, False
    # The fused kernels apply an activation on the parallel route; the serial route (small
    # inputs, forked children, which must not start the parallel thread pool) leaves it to run.
    fused = activation if route == "parallel" else None
    if training:
        output = train(
            input, weight, bias, running_mean, running_var, counter, momentum, eps, route, guard,
            fused,
        )  # fmt: skip
    else:
        output = evaluate(input, running_mean, running_var, weight, bias, eps, route, fused)
    return output, fused is not None


def _as_torch_nn(input, running_mean, running_var, weight, bias, training, momentum, eps, counter):
    """The call exactly as torch.nn's layer makes it, for torch.func transforms and forward AD.

    Under ``vmap``, ``grad``, ``jvp`` or a forward-AD context the call means what it means for
    torch.nn, whose op has the rules those transforms need: the counter is advanced first and
    the running statistics are updated by torch's op (the non-finite guard does not apply).
    """
    factor = 0.0 if momentum is None else momentum
    if training and counter is not None:
        counter.add_(1)
        if momentum is None:
            factor = 1.0 / float(counter)
    return _stages.native_batch_norm(
        input, running_mean, running_var, weight, bias, training, factor, eps
    )


def train(
    input, weight, bias, running_mean, running_var, counter, momentum, eps, route, guard,
    activation=None,
):  # fmt: skip
    """A checked training call on the kernels: with autograd when a graph will be recorded.

    ``guard`` is a :class:`batchnorm._running.Guard` or the calling layer (see
    :func:`batchnorm._running.settle`). ``activation``: ``None`` or ``(spec, param)``, for the
    parallel route only (the fused kernels of :mod:`batchnorm.kernels.activated`).
    """
    factor = 0.0 if running_mean is None else _running.batch_weight(counter, momentum)
    # autograd.Function costs ~6 us a call, a fifth of torch's whole op on a small batch:
    # skip it when nothing will be differentiated.
    if activation is not None:
        spec, param = activation
        if records_graph(input, weight, bias):
            output, (mean, var, updated) = apply(
                ActTrainFn, input, weight, bias, running_mean, running_var, factor, eps, spec,
                param,
            )  # fmt: skip
        else:
            output, mean, var, updated = _stages.act_train_forward(
                input, weight, bias, running_mean, running_var, factor, eps, spec.code, param
            )
    elif records_graph(input, weight, bias):
        output, (mean, var, updated) = apply(
            TrainFn, input, weight, bias, running_mean, running_var, factor, eps, route
        )
    else:
        output, mean, var, updated = _stages.train_forward(
            input, weight, bias, running_mean, running_var, factor, eps, route
        )
    if running_mean is not None:
        if updated:
            _running.count_batch(counter)
        else:
            _running.settle(updated, mean, var, counter, guard)
    return output


def evaluate(input, running_mean, running_var, weight, bias, eps, route, activation=None):
    """A checked evaluation call on the kernels: with autograd when a graph will be recorded.

    ``activation``: as in :func:`train` (the parallel route only).
    """
    if activation is not None:
        spec, param = activation
        if records_graph(input, weight, bias):
            return apply(
                ActEvalFn, input, running_mean, running_var, weight, bias, eps, spec, param
            )
        return _stages.act_eval_forward(
            input, running_mean, running_var, weight, bias, eps, spec.code, param
        )
    if records_graph(input, weight, bias):
        return apply(EvalFn, input, running_mean, running_var, weight, bias, eps, route)
    return _stages.eval_forward(input, running_mean, running_var, weight, bias, eps, route)


_warned: set[str] = set()


def warn_fallback_once(input: torch.Tensor) -> None:
    # Non-CPU devices are served by torch by design; only a CPU input we could have served
    # faster is worth a (single) warning.
    if not input.is_cpu or torch.compiler.is_compiling():
        return
    if input.dtype not in (torch.float32, torch.float64):
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


# --------------------------------------------------------------------------------------------
# The layers' forward pass
# --------------------------------------------------------------------------------------------


def forward_layer(layer: _BatchNorm, input: torch.Tensor, activation=None) -> torch.Tensor:
    """The forward pass of a BatchNorm layer of this package: the one call its ``forward`` makes.

    ``layer`` is a :class:`batchnorm.modules.BatchNormBase` (or any ``torch.nn`` BatchNorm with
    that class's attributes): ``num_features``, ``eps``, ``momentum``, ``training``,
    ``track_running_stats``, ``nonfinite``, ``input_ranks``, ``input_shape`` and its parameters
    and buffers under torch.nn's names. The choices are torch.nn's: batch statistics in
    training, and in evaluation too when there are no running estimates; running buffers are
    read in evaluation even if ``track_running_stats`` was switched off after construction.

    The common call (a CPU float32/float64 input of the right rank and channels, parameters
    and buffers of its dtype and shape, float ``eps`` and ``momentum``) is recognised with
    cheap tests on the layer's own dicts and served at once: on a small batch the full path's
    checks (~6 us) and each ``nn.Module.__getattr__`` (~0.7 us) are a good part of the call,
    where torch's whole ``BatchNorm1d`` on (60, 100) takes ~32 us. Every other call, and every
    error, takes the full path, which validates everything before any state changes.

    Args:
        layer: The layer.
        input: Its input.
        activation: ``None``, or ``(spec, param)`` applied to the output (the fused layers of
            :mod:`batchnorm.activated`; see :func:`run`).

    Returns:
        The normalized input (shape, dtype and memory format of ``input``).
    """
    output = _plain_case(layer, input, activation)
    if output is not None:
        return output
    if isinstance(input, torch.fx.Proxy):  # symbolic tracing: one node, as torch.nn's layer
        return traced_call(layer, input, torch.nn.modules.batchnorm._BatchNorm.forward)
    where = functools.partial(layer_name, layer)
    check_layer_input(where, layer, input, _state_dtype(layer.weight, layer.running_mean))
    running_mean, running_var = layer.running_mean, layer.running_var
    training = layer.training
    use_batch_stats = training or (running_mean is None and running_var is None)
    use_buffers = not training or layer.track_running_stats
    counter = layer.num_batches_tracked if training and layer.track_running_stats else None
    # Every layer here is this package's (a BatchNormBase, whose policy is a str); modules
    # cannot be imported here (it imports this module).
    nonfinite = cast(str, layer.nonfinite)
    check_nonfinite_policy(where, nonfinite)
    running_mean = running_mean if use_buffers else None
    running_var = running_var if use_buffers else None
    momentum, eps = layer.momentum, layer.eps
    check_batch_norm_args(
        where,
        input,
        running_mean,
        running_var,
        layer.weight,
        layer.bias,
        use_batch_stats,
        momentum,
        eps,
        counter,
    )
    return run(
        input,
        running_mean,
        running_var,
        layer.weight,
        layer.bias,
        use_batch_stats,
        momentum,
        float(eps),
        counter,
        Guard(nonfinite, layer=layer),
        activation,
    )


def _state_dtype(weight, running_mean) -> torch.dtype | None:
    for t in (weight, running_mean):
        if t is not None:
            return t.dtype
    return None


def _plain_case(layer, input, activation=None) -> torch.Tensor | None:
    """:func:`forward_layer` for the common call, in the fewest steps; None for anything else.

    * Training: the same kernels and autograd function as the full path, minus its checks.
    * Evaluation routed to torch's op: torch's op is called directly, and if it raises the full
      path runs (nothing is mutated in evaluation); the rank and channel count are checked
      first because torch's op would not object to them.
    """
    if not isinstance(input, torch.Tensor):
        return None
    ranks = layer.input_ranks
    if (
        (input.dim() < 2 if ranks is None else input.dim() not in ranks)
        or input.shape[1] != layer.num_features
        or torch.compiler.is_compiling()
    ):
        return None
    # The dicts behind nn.Module.__getattr__. A name missing from them (a parametrization, a
    # plain attribute set in its place) leaves the call to the full path.
    parameters, buffers = layer._parameters, layer._buffers
    try:
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        counter = buffers["num_batches_tracked"]
    except KeyError:
        return None
    eps = layer.eps
    if type(eps) is not float or not eps >= 0.0:
        return None
    if layer.training:
        return _plain_train(
            layer, input, weight, bias, running_mean, running_var, counter, eps, activation
        )
    if running_mean is None or running_var is None:
        return None
    route = choose(input, "eval")
    if activation is not None and route != "parallel":
        # Normalized as BatchNorm's plain call is, then the activation in torch ops.
        output = _plain_case(layer, input)
        return None if output is None else _activate(output, activation)
    if route == "torch":
        if not kernels_take(input):
            return None
        try:
            return torch.batch_norm(
                input, weight, bias, running_mean, running_var, False, 0.0, eps, False
            )
        except (RuntimeError, TypeError, ValueError):
            return None
    if input.numel() == 0 or not _plain_per_channel(input, weight, bias, running_mean, running_var):
        return None
    return evaluate(input, running_mean, running_var, weight, bias, eps, route, activation)


def _plain_train(
    layer, input, weight, bias, running_mean, running_var, counter, eps, activation=None
):  # fmt: skip
    """The training half of :func:`_plain_case`: what ``check_batch_norm_args`` would accept,
    established with the fewest tests (on failure: None, the full path)."""
    momentum, nonfinite = layer.momentum, layer.nonfinite
    if (momentum is not None and (type(momentum) is not float or not 0.0 <= momentum <= 1.0)) or (
        nonfinite not in NONFINITE_POLICIES
    ):
        return None
    if not eps > 0.0 or input.numel() <= input.shape[1]:  # also empty, one value per channel
        return None
    if layer.track_running_stats:
        if (
            running_mean is None
            or running_var is None
            or (momentum is None and counter is None)
            or (counter is not None and (counter.numel() != 1 or not counter.is_cpu))
            # Buffers made under inference_mode cannot be written here: the full checks say so.
            or running_mean.is_inference()
        ):
            return None
    else:
        running_mean = running_var = counter = None
    if not _plain_per_channel(input, weight, bias, running_mean, running_var):
        return None
    route = choose(input, "train")
    if route == "torch":
        return None
    if activation is not None and route != "parallel":
        # The serial kernels (small inputs, forked children), then the activation in torch ops.
        output = train(
            input, weight, bias, running_mean, running_var, counter, momentum, eps, route, layer
        )
        return _activate(output, activation)
    # The layer stands for its guard: one is built only if a batch is left out.
    return train(
        input, weight, bias, running_mean, running_var, counter, momentum, eps, route, layer,
        activation,
    )  # fmt: skip


def _plain_per_channel(input, weight, bias, running_mean, running_var) -> bool:
    """Whether the per-channel tensors given (None = absent) are what the kernels take without
    the full check: ``(C,)`` tensors on the CPU in the input's dtype, running statistics that
    do not require grad (those take torch's op, outside the graph)."""
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
