r"""``InPlaceABN1d/2d/3d``: activated BatchNorm that overwrites its input and keeps only its output.

In-place activated batch norm (Rota Bulò, Porzi & Kontschieder, CVPR 2018) computes what
:class:`batchnorm.BatchNormAct2d` computes,

.. math::
    \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad z = \gamma\hat{x} + \beta,
    \qquad y = a(z),

but writes :math:`y` over the input and saves only :math:`y` for the backward pass. The backward
recovers what it needs by inverting the activation and the affine transform (paper, Sec. 3.2):

.. math::
    z = a^{-1}(y), \qquad \hat{x} = \frac{z - \beta}{\gamma}, \qquad
    \delta_z = \delta\,a'(z),

then batch norm's backward in terms of :math:`\hat{x}` (training; :math:`m` values per channel,
:math:`\sigma^{-1} = 1/\sqrt{\sigma^2 + \epsilon}`):

.. math::
    dx = \gamma\sigma^{-1}\Big(\delta_z - \tfrac{1}{m}\textstyle\sum\delta_z
         - \hat{x}\,\tfrac{1}{m}\sum\delta_z\hat{x}\Big), \quad
    d\gamma = \textstyle\sum\delta_z\hat{x}, \quad d\beta = \sum\delta_z ;

in evaluation the statistics are constants and :math:`dx = \gamma\sigma^{-1}\delta_z`. Only the
invertible activations qualify: identity, LeakyReLU with a slope > 0 and ELU with alpha > 0.

**Checkpoints.** The paper makes :math:`\hat{x}` recoverable by training :math:`|\gamma| +
\epsilon` instead of :math:`\gamma`, which changes what the weights mean. Here the weights are
BatchNorm's, unchanged: each class subclasses this package's ``BatchNorm*d`` (so a
``torch.nn.BatchNorm*d``) and its ``state_dict`` loads into ``torch.nn.BatchNorm*d`` and back
(strict). Channels whose :math:`\hat{x}` cannot be recovered accurately take a fallback instead
(below).

**What is recoverable.** The output is rounded to the input's dtype (unit roundoff :math:`u`),
so the recovered :math:`z` carries an error of about :math:`u|z|`, and :math:`\hat{x} = (z -
\beta)/\gamma` one of about :math:`u(|\hat{x}| + |\beta|/|\gamma|)`. The layer accepts a
recovered :math:`\hat{x}` off by at most about :math:`K = 64` units of :math:`u` relative to
:math:`\max(1, |\hat{x}|)` (float32: a few 1e-6; float64: ~1e-14; a few times inside the test
suite's tolerances). A channel is *unrecoverable* when

.. math::
    K|\gamma| < |\beta| \quad\text{or}\quad |\gamma| < \frac{\text{tiny}}{\min(1, p)}

(``tiny`` the dtype's smallest normal number, :math:`p` the activation's parameter: below that
:math:`z` or :math:`a(z)` is subnormal and has lost its relative precision; so are
:math:`\gamma = 0` and a NaN :math:`\gamma`). ELU also loses precision element by
element where it saturates: :math:`z = \log(1 + y/\alpha)` amplifies the error of
:math:`y` by :math:`e^{-z}` (and :math:`y = -\alpha` exactly, :math:`z = -\infty`, once
:math:`e^z < u`), so an ELU value with :math:`z < 0` is unrecoverable when
:math:`2(e^{-z} - 1) > K\max(|\gamma|, |z - \beta|)`.

**The fallback.** When the backward will need :math:`\hat{x}` (training with an input that
requires grad, or ``weight`` requiring grad), the forward saves :math:`\hat{x}` itself, computed
in float64 from the input before it is overwritten and stored in the input's dtype, for exactly
the unrecoverable part: the ``(N, k, *)`` slice of the ``k`` unrecoverable channels, and for
ELU the flat indices (int64) and values of the unrecoverable elements. The backward uses those
values and recovers the rest. The extra memory is zero for a healthy layer, a slice for
channels with :math:`\gamma \approx 0` (all of them for a zero-initialized :math:`\gamma`: then
as much as BatchNorm keeps), and 8 bytes plus one value per saturated ELU element.

**Arithmetic.** The forward is BatchNorm's stages (``normalize_batch`` and ``update_running``,
or ``normalize`` with the running statistics, of :mod:`batchnorm.functional`): outputs, running
statistics and ``num_batches_tracked`` are BatchNorm's. The backward runs in torch ops in float64
over chunks of at most ``2**20`` values (or one sample): besides the gradient it returns, it
allocates only chunk-sized buffers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _stages
from ._autograd import records_graph
from ._errors import with_torch_words
from ._inplace_backward import affine, backward, chunks
from ._stages import broadcast_shape
from ._validate import (
    caller_name,
    check_batch_norm_args,
    check_layer_input,
    check_nonfinite_policy,
    layer_name,
)
from .activated import BatchNormActBase
from .activations import ACTIVATIONS, Activation, resolve_param
from .functional import batch_moments, normalize, normalize_batch, update_running
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .routing import choose, transformed

__all__ = [
    "INVERTIBLE",
    "RECOVERY_ULPS",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "InPlaceABNBase",
    "unrecoverable_channels",
]

# The activations whose input the backward can recover from their output.
INVERTIBLE = tuple(name for name, spec in ACTIVATIONS.items() if spec.invertible)

# K of the module docstring: how many units of roundoff (relative to max(1, |x_hat|)) the
# recovered x_hat may be off before the forward saves the exact value instead.
RECOVERY_ULPS = 64.0


def unrecoverable_channels(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    channels: int,
    dtype: torch.dtype,
    activation_param: float | None,
) -> torch.Tensor:
    r"""The channels whose :math:`\hat{x}` the backward cannot recover from the output.

    A channel is unrecoverable when :math:`K|\gamma| < |\beta|` or :math:`|\gamma| <
    \text{tiny}/\min(1, p)` (:data:`RECOVERY_ULPS` is :math:`K`; see the module docstring),
    or when :math:`\gamma` is NaN.

    Args:
        weight, bias: The layer's :math:`\gamma` and :math:`\beta` (``(C,)``) or ``None``
            (1 and 0).
        channels: :math:`C`.
        dtype: The dtype the output is stored in.
        activation_param: LeakyReLU's slope or ELU's alpha, ``None`` for identity.

    Returns:
        A boolean ``(C,)`` tensor on the CPU, True for an unrecoverable channel.
    """
    gamma, beta = affine(weight, bias, channels)
    scale = 1.0 if activation_param is None else min(1.0, activation_param)
    floor = torch.finfo(dtype).tiny / scale
    magnitude = gamma.abs()
    # Written as "not recoverable" so that a NaN weight (every comparison False) falls back.
    return ~((magnitude * RECOVERY_ULPS >= beta.abs()) & (magnitude >= floor))


def _check_invertible(where, out_of_place: str, activation, activation_param):
    """The activation's table entry and parameter, if the backward can invert it.

    ``where`` is the caller's name, or a callable returning it (formatted only for an error).

    Raises:
        ValueError: Not one of :data:`INVERTIBLE`, or a slope/alpha that is not > 0.
        TypeError: A parameter that is not a finite number (:func:`resolve_param`).
    """
    spec = ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    if spec is not None and spec.invertible:
        param = activation_param
        # A layer's own attributes (as resolved by the constructor) need no second look.
        takes_param = spec.default_param is not None
        resolved = type(param) is float and math.isfinite(param) if takes_param else param is None
        if not resolved:
            param = resolve_param(caller_name(where), spec, param)
        if param is None or param > 0:
            return spec, param
    where = caller_name(where)
    if spec is None or not spec.invertible:
        hint = (
            f" {activation!r} cannot be recovered from its output; use {out_of_place}, which "
            "keeps its input for the backward instead."
            if spec is not None
            else ""
        )
        raise ValueError(
            f"{where}: expected activation in {INVERTIBLE!r} (invertible, so that the backward "
            f"can recover its input from the output), got {activation!r}.{hint}"
        )
    name = "negative slope" if spec.name == "leaky_relu" else "alpha"
    raise ValueError(
        f"{where}: expected activation_param > 0 for {spec.name!r} (its {name}; only then "
        f"is it invertible), got {param!r}. Use {out_of_place} for "
        f"{spec.name!r} with activation_param={param!r}."
    )


class InPlaceABNBase(BatchNormActBase):
    """What the ``InPlaceABN*d`` classes add to their BatchNorm class: the in-place forward.

    See :mod:`batchnorm.inplace` for the math, the recovery and its fallback.

    Attributes:
        activation: ``"identity"``, ``"leaky_relu"`` or ``"elu"``.
        activation_param: LeakyReLU's negative slope or ELU's alpha (> 0), ``None`` for
            identity.
    """

    activation: str = "leaky_relu"
    activation_param: float | None = 0.01
    # The class to point to for what this one refuses (set per class).
    out_of_place: str = "BatchNormAct2d"

    def __init__(
        self,
        num_features: int,
        activation: str = "leaky_relu",
        activation_param: float | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        # The activation first: it decides whether this class is the right one at all.
        spec, param = _check_invertible(
            f"{type(self).__name__}()", self.out_of_place, activation, activation_param
        )
        super().__init__(
            num_features,
            spec.name,
            param,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            **kwargs,
        )

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize, activate and write the result over ``input``; return ``input``.

        See the class docstring for the contract. In training, the running statistics and
        ``num_batches_tracked`` are updated as :meth:`batchnorm.BatchNorm2d.forward` updates
        them (``single_value`` and ``nonfinite`` policies included), after every check.

        Args:
            input: ``(N, C, *)`` of the layer's rank; overwritten (see the class docstring).
            mask: Must be ``None``.

        Returns:
            ``input`` itself, holding the output; on the composite path a new tensor.

        Raises:
            NotImplementedError: A mask was given.
            RuntimeError: ``input`` cannot be overwritten (see the class docstring).
            ValueError: The activation attributes were changed to a non-invertible one (and
                every input error of BatchNorm's forward).
        """
        if isinstance(input, torch.fx.Proxy):
            # torch.fx: one call_module node inside a model, which runs this forward; traced as
            # the root, whose mask argument is a placeholder, BatchNorm then the activation.
            return BatchNormActBase.forward(self, input, mask)
        where = functools.partial(layer_name, self)
        if mask is not None:
            raise NotImplementedError(
                f"{where()}: expected mask=None, got a mask: padding left out of the "
                f"statistics cannot be recovered from the output. Use {self.out_of_place} "
                "for masked batches."
            )
        spec, param = _check_invertible(
            where, self.out_of_place, self.activation, self.activation_param
        )
        if not _in_place_applies(input):
            return BatchNormActBase.forward(self, input)
        return _forward_in_place(self, input, spec, param, where)


def _in_place_applies(input) -> bool:
    """Whether the call takes the in-place path (else: BatchNorm, then the activation)."""
    return (
        isinstance(input, torch.Tensor)
        and input.is_cpu
        and input.dtype in (torch.float32, torch.float64)
        and input.layout == torch.strided
        and input.dim() >= 2
        and input.numel() > 0
        and not torch.compiler.is_compiling()
        and not transformed()
    )


def _forward_in_place(layer, input, spec: Activation, param, where) -> torch.Tensor:
    """Every check (as BatchNorm's forward makes them, and the in-place ones), then the stages,
    the fallback values and the write over ``input``."""
    weight, bias = layer.weight, layer.bias
    running_mean, running_var = layer.running_mean, layer.running_var
    state_dtype = next((t.dtype for t in (weight, running_mean) if t is not None), None)
    check_layer_input(where, layer, input, state_dtype)
    training = layer.training
    # torch.nn's choices (as batchnorm._route.forward_layer makes them): batch statistics in
    # training, and in evaluation too without running estimates; running buffers read in
    # evaluation even with track_running_stats switched off.
    use_batch_stats = training or (running_mean is None and running_var is None)
    if training and not layer.track_running_stats:
        running_mean = running_var = None
    counter = layer.num_batches_tracked if training and layer.track_running_stats else None
    if (
        training
        and input.numel() == input.shape[1]
        and layer.single_value == "use_running"
        and running_mean is not None
        and running_var is not None
    ):
        # One value per channel under single_value="use_running": the running statistics
        # normalize it (as in evaluation), and nothing is updated or counted.
        use_batch_stats, counter = False, None
    check_nonfinite_policy(where, layer.nonfinite)
    check_batch_norm_args(
        where,
        input,
        running_mean,
        running_var,
        weight,
        bias,
        use_batch_stats,
        layer.momentum,
        layer.eps,
        counter,
    )
    recording = records_graph(input, weight, bias)
    _check_overwritable(where, input, recording, layer.out_of_place)
    eps = float(layer.eps)
    if _kernels_write(input, spec, use_batch_stats, recording):
        return _forward_on_kernels(
            layer, input, spec, param, where, use_batch_stats, running_mean, running_var,
            counter, recording,
        )  # fmt: skip
    with torch.no_grad():
        if use_batch_stats:
            z, moments = normalize_batch(input, weight, bias, eps, where=where)
            mean = torch.from_numpy(np.asarray(moments.mean, dtype=np.float64))
            m2 = torch.from_numpy(np.asarray(moments.m2, dtype=np.float64))
            var = m2 / torch.as_tensor(moments.count)
            if running_mean is not None:
                _update_running(layer, running_mean, running_var, moments, counter, where)
        else:
            z = normalize(input, running_mean, running_var, weight, bias, eps, where=where)
            mean = running_mean.detach().to(torch.float64)
            var = running_var.detach().to(torch.float64)
        invstd = torch.rsqrt(var + eps)
        fallback = (None, None, None, None)
        if recording and (
            (weight is not None and weight.requires_grad)
            or (use_batch_stats and input.requires_grad)
        ):
            fallback = _save_fallback(input, z, mean, invstd, weight, bias, spec, param)
        _activate_(spec, z, param)
        if not recording:
            return input.copy_(z)
    return _InPlaceABNFn.apply(
        input, weight, bias, z, invstd, fallback, spec, param, use_batch_stats
    )


def _kernels_write(input, spec: Activation, use_batch_stats: bool, recording: bool) -> bool:
    """Whether the kernels normalize and activate straight over the input: the parallel route
    (as BatchNormAct's fused kernels), and no ELU value to check for saturation (which needs
    ``z`` before the write) unless nothing will be differentiated."""
    route = choose(input, "train" if use_batch_stats else "eval")
    return route == "parallel" and (spec.name != "elu" or not recording)


def _forward_on_kernels(
    layer, input, spec, param, where, use_batch_stats, running_mean, running_var, counter,
    recording,
):  # fmt: skip
    """:func:`_forward_in_place` in two passes over the input: the batch's moments (and the
    running update), then normalization and activation written over it by one kernel call."""
    weight, bias, eps = layer.weight, layer.bias, float(layer.eps)
    with torch.no_grad():
        if use_batch_stats:
            moments = batch_moments(input)
            if running_mean is not None:
                _update_running(layer, running_mean, running_var, moments, counter, where)
            mean = np.asarray(moments.mean, dtype=np.float64)
            var = np.asarray(moments.m2, dtype=np.float64) / moments.count
        else:
            mean = running_mean.detach().to(torch.float64).numpy()
            var = running_var.detach().to(torch.float64).numpy()
        invstd = torch.from_numpy(1.0 / np.sqrt(var + eps))
        fallback = (None, None, None, None)
        if recording and (
            (weight is not None and weight.requires_grad)
            or (use_batch_stats and input.requires_grad)
        ):
            # Read from the input before it is overwritten (z is needed for ELU only).
            fallback = _save_fallback(
                input, None, torch.from_numpy(mean), invstd, weight, bias, spec, param
            )
        write = functools.partial(
            _stages.act_normalize_, mean=mean, var=var, weight=weight, bias=bias, eps=eps,
            code=spec.code, param=param,
        )  # fmt: skip
        if not recording:
            write(input)
            return input
    return _InPlaceABNFn.apply(
        input, weight, bias, write, invstd, fallback, spec, param, use_batch_stats
    )


def _update_running(layer, running_mean, running_var, moments, counter, where) -> None:
    """The layer's one running update from the batch's moments (its momentum and policies)."""
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


def _count_skipped(layer) -> None:
    layer.nonfinite_batches_skipped += 1


def _activate_(spec: Activation, z: torch.Tensor, param) -> None:
    """:math:`a(z)` in place, with torch's own in-place functions (values as ``spec.forward``)."""
    if spec.name == "leaky_relu":
        torch.nn.functional.leaky_relu_(z, param)
    elif spec.name == "elu":
        torch.nn.functional.elu_(z, param)
    elif spec.name != "identity":
        raise AssertionError(f"not an invertible activation: {spec.name!r}")


# torch's words for the in-place mistakes this module refuses before writing.
_INFERENCE_WORDS = "Inplace update to inference tensor outside InferenceMode is not allowed."
_LEAF_WORDS = "a leaf Variable that requires grad is being used in an in-place operation."
_OVERLAP_WORDS = (
    "unsupported operation: more than one element of the written-to tensor refers to a single "
    "memory location. Please clone() the tensor before performing the operation."
)


def _check_overwritable(where, input: torch.Tensor, recording: bool, out_of_place: str) -> None:
    """The input can be overwritten here, and autograd can follow it: checked before any state
    changes (torch's in-place ops find out only when they write)."""
    fix = f"Pass a clone, or use {out_of_place}, which leaves its input alone."
    if input.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            with_torch_words(
                f"{where()}: expected an input that can be overwritten in place, got a tensor "
                f"made under torch.inference_mode(); nothing was changed. {fix}",
                _INFERENCE_WORDS,
            )
        )
    if _may_overlap(input):
        raise RuntimeError(
            with_torch_words(
                f"{where()}: expected an input whose elements have memory of their own, got "
                f"strides {input.stride()} for shape {tuple(input.shape)} (an expanded or "
                f"overlapping tensor); nothing was changed. {fix}",
                _OVERLAP_WORDS,
            )
        )
    if not recording:
        return
    if input.is_leaf and input.requires_grad:
        raise RuntimeError(
            with_torch_words(
                f"{where()}: expected an input that can be overwritten in place, got a leaf "
                "tensor that requires grad (its value is what its gradient is taken at); "
                f"nothing was changed. {fix}",
                _LEAF_WORDS,
            )
        )
    base = input._base
    if input._is_view() and base is not None:
        raise RuntimeError(
            f"{where()}: expected an input that is not a view of another tensor while autograd "
            f"records, got a view of a tensor of shape {tuple(base.shape)}; writing "
            f"over it would rewrite that tensor's history too. Nothing was changed. {fix}"
        )


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (sufficient test for the contrary: each
    stride, in increasing order, clears the extent of the smaller ones)."""
    extent = 0
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def _save_fallback(input, z, mean, invstd, weight, bias, spec: Activation, param):
    """:math:`\\hat{x}` for the unrecoverable channels and (ELU) elements: read from ``input``
    before it is overwritten. ``z`` is the output before the activation.

    Returns:
        ``(channel_index, channel_x_hat, element_index, element_x_hat)``: the int64 indices of
        the unrecoverable channels and their ``(N, k, *)`` slice of :math:`\\hat{x}`; the
        sorted flat (row-major) int64 indices of the unrecoverable ELU elements outside those
        channels and their values. ``None`` for a part that is empty.
    """
    channels = input.shape[1]
    shape = broadcast_shape(input)
    small = unrecoverable_channels(weight, bias, channels, input.dtype, param)
    channel_index = small.nonzero().squeeze(1) if bool(small.any()) else None
    by_element = spec.name == "elu"
    if channel_index is None and not by_element:
        return None, None, None, None
    mean_b, invstd_b = mean.reshape(shape), invstd.reshape(shape)
    gamma, beta = affine(weight, bias, channels)
    limit = (RECOVERY_ULPS * gamma.abs()).reshape(shape)
    beta_b, small_b = beta.reshape(shape), small.reshape(shape)
    channel_x_hat = None
    if channel_index is not None:
        channel_x_hat = torch.empty(
            (input.shape[0], channel_index.numel(), *input.shape[2:]), dtype=input.dtype
        )
    per_sample = input[0].numel()
    indices, values = [], []
    for start, stop in chunks(input.shape[0], per_sample):
        x_hat = None
        if channel_index is not None and channel_x_hat is not None:  # set together above
            x_hat = (input[start:stop].to(torch.float64) - mean_b) * invstd_b
            channel_x_hat[start:stop] = x_hat.index_select(1, channel_index)
        if by_element:
            zc = z[start:stop].to(torch.float64)
            # 2 (e^-z - 1): the roundoff of y amplified by log1p's condition (module docstring).
            flagged = (zc < 0) & (
                2.0 * torch.expm1(-zc) > torch.maximum(limit, RECOVERY_ULPS * (zc - beta_b).abs())
            )
            flagged &= ~small_b
            flat = flagged.reshape(-1).nonzero().squeeze(1)
            if flat.numel():
                if x_hat is None:
                    x_hat = (input[start:stop].to(torch.float64) - mean_b) * invstd_b
                indices.append(flat + start * per_sample)
                values.append(x_hat[flagged].to(input.dtype))
    if not indices:
        return channel_index, channel_x_hat, None, None
    return channel_index, channel_x_hat, torch.cat(indices), torch.cat(values)


class _InPlaceABNFn(torch.autograd.Function):
    """The write over the input, and the backward from the output alone.

    ``(input, weight, bias, y, invstd, fallback, spec, param, training) -> input`` holding
    ``y`` (a tensor, or a function writing it over ``input``). The classic
    ``forward(ctx, ...)`` form: ``mark_dirty`` belongs with the write, and
    the layer never calls this under torch.func transforms (they take the composite path).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, y, invstd, fallback, spec, param, training):
        # y: the output to copy, or a function that writes it over the input (the kernels).
        if callable(y):
            y(input)
        else:
            input.copy_(y)
        ctx.mark_dirty(input)
        ctx.save_for_backward(input, weight, bias, invstd, *fallback)
        ctx.spec, ctx.param, ctx.training = spec, param, training
        return input

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        need = ctx.needs_input_grad[:3]
        grads = backward(grad_output, ctx.saved_tensors, ctx.spec, ctx.param, ctx.training, need)
        return *grads, None, None, None, None, None, None


def _doc(name: str, bn: str, act: str, example: str) -> str:
    return rf"""In-place activated {bn}: {bn} and an invertible activation, written over the input.

    Computes what :class:`batchnorm.{act}` computes (see :mod:`batchnorm.inplace` for the math),
    but keeps only its output for the backward, which recovers the rest by inverting the
    activation and the affine transform: autograd holds the output (which is the input's
    memory) and a few ``(C,)`` tensors, where BatchNorm followed by an activation holds two
    tensors of the input's size. The ``state_dict`` is {bn}'s and loads into
    ``torch.nn.{bn}`` and back.

    **The in-place contract.** ``layer(x)`` overwrites ``x`` with the output and returns ``x``
    itself. After the call ``x`` holds the output, not the input: do not use it as the input
    again (a residual ``x + layer(x)`` would add the output to itself). No other autograd node
    may need ``x`` as it was: after a convolution or a linear layer this holds (they save their
    *input*, not their output), after an op that saves its output (ReLU, sigmoid, tanh, another
    InPlaceABN) it does not, and torch's version counter then makes ``backward()`` raise
    "one of the variables needed for gradient computation has been modified by an inplace
    operation" rather than compute a wrong gradient. Forward hooks see ``x`` overwritten (read
    the input in a forward pre-hook). Refused before anything changes, with
    ``RuntimeError`` (torch's class for in-place mistakes):

    * a leaf tensor that requires grad while autograd records (torch's own in-place rule);
    * a view of another tensor while autograd records (``x[:, :3]``, ``x.view(...)``,
      ``chunk``): writing over it would rewrite its base's history; outside autograd
      (``torch.no_grad()``, ``torch.inference_mode()``, nothing requiring grad) a view is
      overwritten like any tensor, and so is its base's memory;
    * an expanded or overlapping tensor (elements sharing memory), and a tensor made under
      ``torch.inference_mode()`` when called outside it.

    **Where it is not in place.** A mask is refused (``NotImplementedError``). Inputs the
    in-place path does not take (other devices or dtypes than CPU float32/float64, an empty
    batch, ``torch.compile``, ``torch.func`` transforms and forward-mode AD, the graph of the
    layer traced by ``torch.fx`` as the root) get {act}'s computation instead: the same
    values, in a new tensor, ``x`` left alone. Traced inside a model, the layer is one node
    that runs it, in place. Double backward is not supported (the backward is not
    differentiable).

    **Training and evaluation.** As {bn}: batch statistics (biased variance) in training, with
    ``running_mean``, ``running_var`` (unbiased) and ``num_batches_tracked`` updated in place as
    {bn} updates them, after every check (a rejected call changes no buffer and not the
    input); the running statistics in evaluation. The ``nonfinite`` and ``single_value``
    policies are {bn}'s.

    Dtypes: CPU float32 and float64. Statistics and normalization in float64, rounded to the
    input's dtype, then the activation in that dtype (as {bn} followed by the activation
    computes it); the backward's arithmetic in float64.

    Args:
        num_features: Channels ``C``.
        activation: ``"leaky_relu"`` (default), ``"elu"`` or ``"identity"``; checked before any
            other argument. ``"relu"``, ``"silu"``, ``"gelu"`` (not invertible) raise
            ``ValueError`` pointing to :class:`batchnorm.{act}`.
        activation_param: LeakyReLU's negative slope (default 0.01) or ELU's alpha (default
            1.0); must be > 0. ``None`` for the default, and for identity.
        eps, momentum, affine, track_running_stats, device, dtype: as {bn}'s.

    Shape:
        As {bn}'s; the output is the input tensor (its shape, dtype and memory format).

    Example:
        >>> layer = {name}(4, activation="leaky_relu", activation_param=0.1)
        >>> x = torch.randn{example}
        >>> layer(x) is x
        True
    """


class InPlaceABN1d(InPlaceABNBase, BatchNorm1d):
    out_of_place = "BatchNormAct1d"
    __doc__ = _doc("InPlaceABN1d", "BatchNorm1d", "BatchNormAct1d", "(8, 4)")


class InPlaceABN2d(InPlaceABNBase, BatchNorm2d):
    out_of_place = "BatchNormAct2d"
    __doc__ = _doc("InPlaceABN2d", "BatchNorm2d", "BatchNormAct2d", "(8, 4, 3, 3)")


class InPlaceABN3d(InPlaceABNBase, BatchNorm3d):
    out_of_place = "BatchNormAct3d"
    __doc__ = _doc("InPlaceABN3d", "BatchNorm3d", "BatchNormAct3d", "(8, 4, 2, 3, 3)")


# The tools (convert, freeze, fold, the monitor) know in-place layers through the family table.
from .families import add_activated  # noqa: E402  (registration stays at the end, in one place)

for _inplace in (InPlaceABN1d, InPlaceABN2d, InPlaceABN3d):
    add_activated(_inplace.__name__.replace("InPlaceABN", "BatchNorm"), _inplace)
