r"""Batch norm as functions: the drop-in op, and the stages every layer and variant composes.

The op, :func:`batch_norm`, is a drop-in for :func:`torch.nn.functional.batch_norm`. The
stages are the pieces it is made of, public so that a variant (ghost batches, batch
renormalization, masks, SyncBatchNorm, a population pass) is a short composition rather than a
copy:

.. code-block:: text

    batch_moments(x, mask)        -> Moments(count, mean, M2)          statistics (float64)
    merge_moments / merge_all     -> Moments                          (batchnorm.stats)
    update_running(buffers, moments, momentum)                        the one running update
    normalize(x, mean, var, weight, bias, eps)                        given statistics
    normalize_batch(x, weight, bias, eps, mask) -> (y, Moments)       the batch's own
    backward_sums(dy, x, mean)    -> (sum dy, sum dy (x - mean))      backward, stage 1
    backward_input(dy, x, mean, invstd, weight, sums, count) -> dx    backward, stage 2

With :math:`\mu_B, \sigma_B^2` the batch's per-channel mean and *biased* variance over every
axis but the channel axis 1 (:math:`m` values per channel),

.. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta ,

with :math:`(\mu, \sigma^2) = (\mu_B, \sigma_B^2)` in training (Ioffe & Szegedy 2015, Alg. 1;
gradients flow through them) and the running or population statistics in evaluation (Alg. 2,
constants). :func:`batch_norm` in training is ``normalize_batch`` followed by
``update_running``; the fused kernels compute that composition in one pass and agree with the
staged composition to float64 rounding (``tests/test_stages.py``).

Where each call runs (Numba kernels, serial or parallel, or torch's op) is decided once per
call by :func:`batchnorm.routing.choose`; :func:`forward_layer` is the whole forward pass of a
layer of this package, the one call its ``forward`` makes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from . import _running, _stages
from ._autograd import NormalizeFn, TrainFn, apply, records_graph
from ._route import forward_layer, run, warn_fallback_once
from ._running import Guard
from ._validate import (
    Where,
    caller_name,
    check_batch_norm_args,
    check_input,
    check_mask,
    check_nonfinite_policy,
    check_normalize_args,
    check_update_args,
)
from .routing import choose, kernels_take, transformed
from .stats import Moments, finalize

__all__ = [
    "ACTIVATIONS",
    "backend_for",
    "backward_input",
    "backward_sums",
    "batch_moments",
    "batch_norm",
    "forward_layer",
    "normalize",
    "normalize_batch",
    "update_running",
]

# Pointwise activations the normalization can apply to its output. Identity only, for now: the
# seam the fused BatchNorm+activation layers plug into.
ACTIVATIONS = ("identity",)


def backend_for(input: torch.Tensor, training: bool = True) -> str:
    """Say which implementation serves ``input``: ``"numba"`` or ``"torch"``.

    The Numba kernels take CPU float32/float64 tensors that are contiguous or channels-last
    (channel axis innermost in memory). Everything else, including every non-CPU device,
    float16, bfloat16 and other strides, is served by torch's native ``batch_norm``. In
    evaluation mode (``training=False``), inputs of fewer than
    ``routing_policy().eval_native_bytes`` bytes (32 MiB) go to torch's op too, because it is
    measured faster there (see :mod:`batchnorm.routing`).

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
    return "torch" if choose(input, "train" if training else "eval") == "torch" else "numba"


# --------------------------------------------------------------------------------------------
# The op
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
    torch's native op (see :func:`backend_for` and :mod:`batchnorm.routing`).

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
            channel in training, ``eps <= 0`` in training (``< 0`` otherwise), ``momentum``
            outside [0, 1] or NaN when the running statistics are updated, or an unknown
            ``nonfinite`` policy. Where torch raises another class for the same mistake, the
            exception is also of that class (:class:`~batchnorm.ShapeError` is a
            ``RuntimeError`` too, and so on) and the message ends with torch's own words.
        RuntimeError: Running statistics made under ``torch.inference_mode()`` and updated
            outside it.
        NonFiniteStatisticsError: ``nonfinite="raise"`` and the batch's statistics are not
            finite.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
        >>> batch_norm(x, None, None, training=True)
        tensor([[-1.0000, -1.0000],
                [ 1.0000,  1.0000]])
    """
    where = "batch_norm()"
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
    return run(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        float(eps),
        num_batches_tracked,
        Guard(nonfinite, where, None),
    )


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


def batch_moments(
    input: torch.Tensor, mask: torch.Tensor | None = None, *, where: Where | None = None
) -> Moments:
    r"""Per-channel count, mean and M2 of a batch: the statistics stage.

    .. math::
        m = \#\{\text{values of a channel}\}, \quad
        \mu_c = \frac{1}{m}\sum x_{\cdot c \cdot}, \quad
        M2_c = \sum (x_{\cdot c \cdot} - \mu_c)^2

    over every axis but the channel axis 1. The result merges exactly with others
    (:func:`batchnorm.stats.merge_moments`), across processes, ghost batches or the batches of
    a population pass, and :func:`batchnorm.stats.finalize` turns it into the mean, the biased
    variance (what batch norm normalizes with) and the unbiased one (what ``running_var``
    holds). Statistics, not a differentiable function: to normalize with a batch's own
    statistics and get gradients through them, use :func:`normalize_batch`.

    Dtypes: float64 whatever the input's dtype. CPU float32/float64 inputs in a kernel layout
    run on the Numba moments kernel (the same code the layers' training forward runs); other
    inputs on ``torch.var_mean`` on their device (float32 off the CPU), 2C numbers travelling
    to the host.

    Args:
        input: ``(N, C, *)`` floating-point tensor; ``N = 0`` gives the empty summary.
        mask: Optional boolean tensor of shape ``(N, *)`` (the input's shape without the
            channel axis), on the input's device; ``True`` marks a real value, ``False`` a
            position to leave out (such as padding), as the layers' ``forward(input, mask)``
            reads it. The count is then the number of real positions; the values left out
            never enter the arithmetic, so NaN or infinite padding is harmless.
        where: The caller's name for error messages (a string or a callable returning one);
            default ``"batch_moments()"``.

    Returns:
        A :class:`batchnorm.stats.Moments` with ``count`` a Python int and float64 NumPy
        ``mean`` and ``m2`` of shape ``(C,)``.

    Raises:
        TypeError: A non-tensor or non-floating input, a non-boolean mask.
        ValueError: Fewer than 2 dims; a mask of the wrong shape or device.

    Example:
        >>> moments = batch_moments(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))
        >>> moments.count, moments.mean, moments.m2
        (2, array([ 2., 20.]), array([  2., 200.]))
    """
    where = "batch_moments()" if where is None else where
    check_input(where, input)
    _refuse_transforms(where)
    channels = input.shape[1]
    if mask is not None:
        check_mask(where, input, mask)
        excluded = ~mask
        count, mean_t, m2_t = _stages.masked_moments(
            _zero_excluded(input.detach(), excluded), excluded
        )
        stats = torch.stack([mean_t, m2_t]).double().cpu().numpy()
        return Moments(count, stats[0].copy(), stats[1].copy())
    count = input.numel() // channels
    if count == 0:
        return Moments.empty(channels)
    mean, m2 = _stages.moments(input, choose(input, "stage"))
    return Moments(count, mean, m2)


def normalize(
    input: torch.Tensor,
    mean: torch.Tensor | np.ndarray,
    var: torch.Tensor | np.ndarray,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str = "identity",
    where: Where | None = None,
) -> torch.Tensor:
    r"""Normalize with given statistics: the transform stage.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    per channel (axis 1), :math:`\mu` = ``mean``, :math:`\sigma^2` = ``var``. With the running
    statistics this is batch norm's evaluation transform (Alg. 2, step 11), and it is exactly
    ``batch_norm(input, mean, var, weight, bias, training=False, eps=eps)``, routing included.
    Statistics of another dtype (float64 statistics from :func:`batch_moments` and
    :func:`batchnorm.stats.finalize`, for a float32 input) are applied in float64, rounded once
    to the input's dtype.

    Gradients flow to ``input``, ``weight`` and ``bias``, and to ``mean`` and ``var`` when they
    are tensors that require grad (:math:`\partial y/\partial\mu = -\gamma/\sigma`,
    :math:`\partial y/\partial\sigma^2 = -\tfrac{1}{2}\gamma(x - \mu)/\sigma^3`); running
    statistics that do not require grad are constants. Nothing is mutated.

    Args:
        input: ``(N, C, *)``.
        mean: ``(C,)`` tensor (on the input's device) or NumPy array, any float dtype.
        var: ``(C,)``, like ``mean``; the (biased or population) variance to divide by.
        weight: ``(C,)`` scale :math:`\gamma` or ``None`` (1).
        bias: ``(C,)`` shift :math:`\beta` or ``None`` (0).
        eps: Added to ``var`` before the square root.
        activation: A pointwise function applied to ``y``; one of :data:`ACTIVATIONS`
            (``"identity"`` only, today).
        where: The caller's name for error messages; default ``"normalize()"``.

    Returns:
        The shape, dtype and memory format of ``input``.

    Raises:
        TypeError: Non-floating input or statistics; parameters of another dtype than the
            input's; a non-numeric ``eps``.
        ValueError: Wrong shapes or devices; an unknown ``activation``.

    Example:
        >>> x = torch.tensor([[1.0], [3.0]])
        >>> normalize(x, torch.tensor([2.0]), torch.tensor([1.0]), eps=0.0)
        tensor([[-1.],
                [ 1.]])
    """
    where = "normalize()" if where is None else where
    _check_activation(where, activation)
    if isinstance(input, torch.Tensor):
        mean, var = (
            torch.from_numpy(np.asarray(t)).to(input.device) if isinstance(t, np.ndarray) else t
            for t in (mean, var)
        )
    check_normalize_args(where, input, mean, var, weight, bias, eps)
    eps = float(eps)
    # Statistics batch_norm would take: the input's dtype (float32 for a half input), shared
    # with the parameters given.
    dtype = mean.dtype
    same = (
        var.dtype == dtype
        and (dtype == input.dtype or (input.dtype.itemsize == 2 and dtype == torch.float32))
        and all(t is None or t.dtype == dtype for t in (weight, bias))
    )
    if same and not (mean.requires_grad or var.requires_grad):
        # The evaluation transform, exactly as batch_norm(training=False) runs it.
        return run(input, mean, var, weight, bias, False, 0.0, eps, None, Guard(where=where))
    if transformed():
        return _normalize_composite(input, mean, var, weight, bias, eps)
    route = choose(input, "stage")
    if torch.is_grad_enabled() and (
        records_graph(input, weight, bias) or mean.requires_grad or var.requires_grad
    ):
        return apply(NormalizeFn, input, mean, var, weight, bias, eps, route)
    return NormalizeFn.forward(input, mean, var, weight, bias, eps, route)


def normalize_batch(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
    where: Where | None = None,
) -> tuple[torch.Tensor, Moments]:
    r"""Normalize with the batch's own statistics, and return them: Algorithm 1.

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta

    with :math:`\mu_B` and the *biased* :math:`\sigma_B^2` of the batch per channel (over the
    positions ``mask`` keeps). Gradients flow through the statistics as the math says
    (Ioffe & Szegedy 2015, Sec. 3):

    .. math::
        \frac{\partial\ell}{\partial x} = \frac{\gamma}{\sigma_B}\Big(\delta
            - \frac{1}{m}\sum\delta - \frac{\hat{x}}{m}\sum\delta\,\hat{x}\Big).

    This is :func:`batch_norm` in training mode without the running update; with the statistics
    returned, a caller composes the rest (:func:`update_running`, a merge across ghost batches
    or processes). Without a mask, the fused kernels (or torch's op) compute it in one pass;
    with one, torch ops in float64 on the CPU (float32 elsewhere) do, and positions left out
    are normalized with the statistics of the others; their values never enter the statistics
    (NaN or infinite padding leaves them finite), and their gradient is only that of their own
    output.

    Args:
        input: ``(N, C, *)``; more than one value (kept) per channel.
        weight: ``(C,)`` scale or ``None``.
        bias: ``(C,)`` shift or ``None``.
        eps: Added to the variance before the square root.
        mask: Optional boolean ``(N, *)`` tensor; ``True`` marks real values, ``False``
            positions left out of the statistics (see :func:`batch_moments`).
        where: The caller's name for error messages; default ``"normalize_batch()"``.

    Returns:
        ``(y, moments)``: the output (shape, dtype and memory format of ``input``) and the
        batch's :class:`batchnorm.stats.Moments` (float64; ``m2 = m * var``).

    Raises:
        TypeError, ValueError: As :func:`batch_norm` in training mode; a bad mask.

    Example:
        >>> y, moments = normalize_batch(torch.tensor([[1.0], [3.0]]), eps=1e-12)
        >>> y.flatten().tolist(), moments.mean.tolist()
        ([-1.0, 1.0], [2.0])
    """
    where = "normalize_batch()" if where is None else where
    check_batch_norm_args(where, input, None, None, weight, bias, True, 0.1, eps, None)
    _refuse_transforms(where)
    eps = float(eps)
    channels = input.shape[1]
    if mask is not None:
        check_mask(where, input, mask)
        return _normalize_masked(where, input, weight, bias, eps, ~mask)
    count = input.numel() // channels
    if count == 0:
        return _stages.native_batch_norm(
            input, None, None, weight, bias, True, 0.0, eps
        ), Moments.empty(channels)
    route = choose(input, "train")
    if route == "torch":
        if not kernels_take(input):
            warn_fallback_once(input)
        dtype = weight.dtype if weight is not None else input.dtype
        y, mean, var = _stages.native_train(input, weight, bias, eps, dtype, input.device)
    elif records_graph(input, weight, bias):
        y, (mean, var, _) = apply(TrainFn, input, weight, bias, None, None, 0.0, eps, route)
    else:
        y, mean, var, _ = _stages.train_forward(input, weight, bias, None, None, 0.0, eps, route)
    return y, Moments(count, mean, var * count)


def _normalize_composite(input, mean, var, weight, bias, eps):
    """:func:`normalize` in torch ops, which torch.func transforms can batch and differentiate."""
    shape = _stages.broadcast_shape(input)
    acc = _stages.accumulate_dtype(input)
    scale = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (input.to(acc) - mean.to(acc).reshape(shape)) * scale.reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    return y.to(input.dtype)


def _refuse_transforms(where) -> None:
    # Statistics are NumPy Moments: they leave autograd and cannot be batched by vmap.
    if transformed():
        raise NotImplementedError(
            f"{caller_name(where)}: expected a call outside torch.func transforms and "
            "forward-mode AD, got one inside: the statistics it returns are NumPy arrays, "
            "outside autograd and vmap. Use batch_norm() or a layer there, or normalize() with "
            "statistics computed in torch ops."
        )


def _normalize_masked(where, input, weight, bias, eps, excluded):
    """:func:`normalize_batch` with a mask (``excluded``: True where left out): torch ops,
    differentiated by autograd."""
    count, mean, m2 = _stages.masked_moments(_zero_excluded(input, excluded), excluded)
    if count <= 1:
        raise ValueError(
            f"{caller_name(where)}: expected more than 1 value per channel when using batch "
            f"statistics (training), got {count} unmasked position(s) in input of shape "
            f"{tuple(input.shape)}."
        )
    shape = _stages.broadcast_shape(input)
    acc = mean.dtype
    scale = torch.rsqrt(m2 / count + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y = (input.to(acc) - mean.reshape(shape)) * scale.reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    y = y.to(input.dtype)
    if input.dim() > 2 and not input.is_contiguous():
        y = y.contiguous(memory_format=_memory_format(input))
    stats = torch.stack([mean.detach(), m2.detach()]).double().cpu().numpy()
    return y, Moments(count, stats[0].copy(), stats[1].copy())


def _zero_excluded(input: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``input`` with zeros where ``excluded`` is True: the statistics sum ``value * keep``, and
    ``NaN * 0`` is NaN, so padding must be replaced, not weighted out (no gradient flows to it)."""
    return input.masked_fill(excluded.unsqueeze(1), 0)


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    moments: Moments,
    momentum: float | None = 0.1,
    *,
    num_batches_tracked: torch.Tensor | None = None,
    nonfinite: str = "skip",
    where: Where | None = None,
    on_skip: Callable[[], None] | None = None,
) -> bool:
    r"""Fold a batch's statistics into running averages, in place: the one running update.

    .. math::
        \hat{\mu} \leftarrow (1 - \alpha)\hat{\mu} + \alpha\mu_B, \qquad
        \hat{\sigma}^2 \leftarrow (1 - \alpha)\hat{\sigma}^2 + \alpha\,\tfrac{m}{m-1}\sigma_B^2

    :math:`\alpha` is ``momentum``, the weight of the new batch (torch's meaning, the opposite of
    flax's and equinox's decay), or for ``momentum=None`` the cumulative average
    ``1 / (num_batches_tracked + 1)``. The variance folded in is the *unbiased* one, as torch
    stores. The arithmetic is float64, rounded once to the buffers' dtype; every path of the
    package (the kernels, torch's op, the compiled graph, SyncBatchNorm, the population pass)
    updates through it. ``num_batches_tracked``, when given, is incremented.

    A batch whose mean or unbiased variance is NaN or infinite (or too large for the buffers'
    dtype) changes nothing (see :func:`batch_norm`): ``nonfinite="skip"`` warns with
    :class:`~batchnorm.NonFiniteStatisticsWarning` and calls ``on_skip``, ``"raise"`` raises
    :class:`~batchnorm.NonFiniteStatisticsError`.

    Args:
        running_mean: ``(C,)`` buffer, updated in place.
        running_var: ``(C,)`` buffer (unbiased variance), updated in place.
        moments: The batch's :class:`batchnorm.stats.Moments` (a single count for all channels;
            0 changes nothing).
        momentum: Weight of the batch in ``[0, 1]``, or ``None``.
        num_batches_tracked: 1-element integer tensor, or ``None`` (needed for
            ``momentum=None``).
        nonfinite: ``"skip"`` or ``"raise"``.
        where: The caller's name for messages; default ``"update_running()"``.
        on_skip: Called with no arguments when a batch is skipped.

    Returns:
        Whether the buffers were updated.

    Raises:
        TypeError, ValueError: Buffers of the wrong shape or kind, a count of 1, a bad
            ``momentum`` or ``nonfinite``.
        NonFiniteStatisticsError: ``nonfinite="raise"`` and the statistics are not finite.

    Example:
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> update_running(rm, rv, batch_moments(torch.tensor([[1.0], [3.0]])), momentum=0.5)
        True
        >>> rm, rv
        (tensor([1.]), tensor([1.5000]))
    """
    where = "update_running()" if where is None else where
    check_nonfinite_policy(where, nonfinite)
    check_update_args(where, running_mean, running_var, moments, momentum, num_batches_tracked)
    if moments.count == 0:
        return False
    mean, var, _ = finalize(moments)
    factor = _running.batch_weight(num_batches_tracked, momentum)
    updated = _running.update(running_mean, running_var, mean, var, int(moments.count), factor)
    _running.settle(updated, mean, var, num_batches_tracked, Guard(nonfinite, where, on_skip))
    return updated


def backward_sums(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The backward's first stage: the per-channel sums it needs.

    .. math::
        S_1 = \sum \delta, \qquad S_2 = \sum \delta\,(x - \mu)

    with :math:`\delta` = ``grad_output``. They are additive over disjoint parts of a batch, so
    a SyncBatchNorm adds them over processes (one ``all_reduce``) before the second stage.
    :math:`\partial\ell/\partial\beta = S_1` and :math:`\partial\ell/\partial\gamma =
    S_2/\sqrt{\sigma^2 + \epsilon}`.

    Args:
        grad_output: ``(N, C, *)``, the gradient of the output.
        input: The forward's input, same shape.
        mean: ``(C,)`` tensor or array, the mean the forward subtracted.

    Returns:
        ``(S_1, S_2)``: float64 ``(C,)`` tensors on the input's device (zeros for ``N = 0``).
    """
    route = choose(input, "stage")
    sum_dy, sum_dy_xmu = _stages.backward_sums(grad_output, input, _float64_array(mean), route)
    return (
        torch.from_numpy(sum_dy).to(input.device),
        torch.from_numpy(sum_dy_xmu).to(input.device),
    )


def backward_input(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor | np.ndarray,
    invstd: torch.Tensor | np.ndarray,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor | np.ndarray,
    sum_dy_xmu: torch.Tensor | np.ndarray,
    count: int,
) -> torch.Tensor:
    r"""The backward's second stage: the input gradient of training-mode batch norm.

    .. math::
        dx = \gamma\sigma^{-1}\Big(\delta - \frac{S_1}{m} - (x - \mu)\,\frac{\sigma^{-2}S_2}{m}
        \Big)

    with :math:`\sigma^{-1}` = ``invstd``, the sums of :func:`backward_sums` over the whole
    batch (all processes, for SyncBatchNorm) and :math:`m` = ``count``, its values per channel.

    Args:
        grad_output: ``(N, C, *)``.
        input: The forward's input.
        mean, invstd: ``(C,)`` tensors or arrays: the statistics the forward used.
        weight: ``(C,)`` or ``None``.
        sum_dy, sum_dy_xmu: ``(C,)`` tensors or arrays, :math:`S_1` and :math:`S_2`.
        count: :math:`m`.

    Returns:
        ``dx`` in the input's dtype and memory layout.
    """
    invstd_a = _float64_array(invstd)
    k_dy = invstd_a if weight is None else invstd_a * _float64_array(weight)
    k_xmu = -k_dy * invstd_a**2 * _float64_array(sum_dy_xmu) / count
    k_const = -k_dy * _float64_array(sum_dy) / count
    route = choose(input, "stage")
    return _stages.backward_apply(
        grad_output, input, _float64_array(mean), k_dy, k_xmu, k_const, route
    )


def _float64_array(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _check_activation(where, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{caller_name(where)}: expected activation in {ACTIVATIONS!r}, got {activation!r}."
        )
