"""Every argument, shape and dtype check of the package, and its one error-message format.

Messages name the caller as the user wrote it (``BatchNorm2d(num_features=3)`` or
``batch_norm()``) and say what was expected and what was given. Where torch rejects the same
call, the exception is also of torch's class and the message ends with torch's own words
(:mod:`._errors`), so code written against torch.nn keeps catching and matching it. All checks
run before any state is touched: a rejected call changes nothing, ``num_batches_tracked``
included (stricter than torch 2.13, which increments the counter before it validates the batch
size). Values are checked where they are used: ``momentum`` only when running statistics are
updated, as torch.nn's layers accept any momentum in evaluation mode.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from ._errors import (
    MixedDtypeError,
    MomentumTypeError,
    NonFiniteStatisticsError,
    NonFiniteStatisticsWarning,
    NotATensorError,
    RankError,
    ShapeError,
    UnsupportedDtypeError,
    torch_dtype_name,
    with_torch_words,
)
from ._policies import (
    NONFINITE_POLICIES,
    SINGLE_VALUE_POLICIES,
    caller_name,
    check_nonfinite_policy,
    check_single_value_policy,
    layer_name,
    report_nonfinite,
    single_value_error,
)

__all__ = [
    "NONFINITE_POLICIES",
    "SINGLE_VALUE_POLICIES",
    "NonFiniteStatisticsError",
    "Where",
    "NonFiniteStatisticsWarning",
    "caller_name",
    "check_batch_norm_args",
    "check_constructor_args",
    "check_input",
    "check_layer_input",
    "check_mask",
    "check_module_input",
    "check_nonfinite_policy",
    "check_normalize_args",
    "check_single_value_policy",
    "check_update_args",
    "check_writable",
    "layer_name",
    "report_nonfinite",
    "single_value_error",
]

_name = caller_name

# Where a check is made, as the user sees it: the text, or a callable that builds it only when
# an error is raised.
Where = str | Callable[[], str]

_ALLOWED_PARAM_DTYPES = {
    torch.float16: (torch.float16, torch.float32),
    torch.bfloat16: (torch.bfloat16, torch.float32),
}


def _floating_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_constructor_args(cls_name: str, num_features, eps, momentum) -> None:
    """Reject constructor arguments torch would silently accept and later misuse.

    ``num_features=None`` skips its check (a lazy layer learns it from its first input).

    Raises:
        TypeError: ``num_features`` is not an integer, or ``eps``/``momentum`` not a number.
        ValueError: ``num_features < 1``, ``eps < 0`` or ``momentum`` outside ``[0, 1]``.
    """
    where = f"{cls_name}()"
    if num_features is None:
        pass
    elif isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(
            f"{_name(where)}: expected num_features to be a positive int, got {num_features!r}."
        )
    elif num_features < 1:
        raise ValueError(
            f"{_name(where)}: expected num_features to be a positive int, got {num_features!r}."
        )
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"{_name(where)}: expected eps to be a non-negative float, got {eps!r}.")
    if not float(eps) >= 0:  # also rejects NaN
        raise ValueError(f"{_name(where)}: expected eps to be a non-negative float, got {eps!r}.")
    if momentum is not None:
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(
                f"{_name(where)}: expected momentum in [0, 1] or None, got {momentum!r}."
            )
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(
                f"{_name(where)}: expected momentum in [0, 1] or None, got {momentum!r}."
            )


def _not_a_tensor(where, input) -> NotATensorError:
    return NotATensorError(
        with_torch_words(
            f"{_name(where)}: expected a torch.Tensor input, got {type(input).__name__}.",
            f"{type(input).__name__!r} object has no attribute 'dim'",
        )
    )


def _not_floating(where, input) -> UnsupportedDtypeError:
    return UnsupportedDtypeError(
        with_torch_words(
            f"{_name(where)}: expected a floating-point input, "
            f"got {_floating_dtype_name(input.dtype)}.",
            f"\"batch_norm\" not implemented for '{torch_dtype_name(input.dtype)}'",
        )
    )


def _mixed_dtype_words(input_dtype: torch.dtype, state_dtype: torch.dtype) -> str:
    # torch 2.13's CPU kernel says one thing when the input is the wider type, another when the
    # parameters are.
    if input_dtype.itemsize > state_dtype.itemsize:
        return "mixed dtype (CPU): all inputs must share same datatype."
    # A half or bfloat16 input computes in float32, which its parameters may also have.
    expected = torch_dtype_name(torch.float32 if input_dtype.itemsize == 2 else input_dtype)
    return f"mixed dtype (CPU): expect parameter to have scalar type of {expected}"


def check_module_input(
    where,
    input,
    num_features: int,
    ranks: tuple[int, ...],
    shape_hint,
    state_dtype: torch.dtype | None,
    *,
    torch_ranks: str | None = None,
    first_tensor: str | None = None,
) -> None:
    """Check what only a module knows: the input's rank and its channel count.

    Args:
        where: The caller as the user sees it, e.g. ``"BatchNorm2d(num_features=3)"``, or a
            callable returning it (formatted only if there is an error).
        input: The forward argument.
        num_features: The module's channel count.
        ranks: Accepted numbers of dimensions.
        shape_hint: Human-readable accepted shape(s), e.g. ``"(N, 3, H, W)"``, or a callable
            returning it.
        state_dtype: Dtype of the module's parameters and buffers (``None`` if it has none).
        torch_ranks: torch's words for the accepted ranks (``"2D or 3D"``), or ``None`` where
            torch's layer does not check the rank.
        first_tensor: The name of the first per-channel tensor torch's op checks against the
            channel count (``"running_mean"``, ``"weight"``...), or ``None`` if the layer has
            none (torch then accepts any channel count).

    Raises:
        NotATensorError: Not a tensor.
        ValueError: Another rank (torch's words when ``torch_ranks`` is given).
        ShapeError: Another channel count.
        UnsupportedDtypeError: A non-floating input.
        MixedDtypeError: A float32/float64 input of another dtype than the layer's.
    """
    if not isinstance(input, torch.Tensor):
        raise _not_a_tensor(where, input)
    if input.dim() not in ranks:
        accepted = " or ".join(f"{r}-D" for r in ranks)
        message = (
            f"{_name(where)}: expected {accepted} input of shape {_name(shape_hint)}, "
            f"got {input.dim()}-D input of shape {tuple(input.shape)}."
        )
        if torch_ranks is not None:
            message = with_torch_words(
                message, f"expected {torch_ranks} input (got {input.dim()}D input)"
            )
        raise ValueError(message)
    if input.shape[1] != num_features:
        message = (
            f"{_name(where)}: expected input with {num_features} channels, "
            f"shape {_name(shape_hint)}, got shape {tuple(input.shape)}."
        )
        if first_tensor is not None:
            message = with_torch_words(
                message,
                f"{first_tensor} should contain {input.shape[1]} elements not {num_features}",
            )
        raise ShapeError(message)
    if not input.dtype.is_floating_point:
        raise _not_floating(where, input)
    if (
        state_dtype is not None
        and input.dtype in (torch.float32, torch.float64)
        and input.dtype != state_dtype
    ):
        raise MixedDtypeError(
            with_torch_words(
                f"{_name(where)}: expected input of the layer's dtype "
                f"{_floating_dtype_name(state_dtype)}, got {_floating_dtype_name(input.dtype)}; "
                f"cast the input or convert the layer with .to({input.dtype}).",
                _mixed_dtype_words(input.dtype, state_dtype),
            )
        )


def check_layer_input(where, layer, input, state_dtype: torch.dtype | None) -> None:
    """:func:`check_module_input` with the rank rule and shape hint the layer's class declares.

    ``layer.input_ranks`` is a tuple of accepted ranks, or ``None`` for any rank >= 2
    (SyncBatchNorm); ``layer.input_shape`` a hint such as ``"(N, {C}, H, W)"``.
    """
    ranks = layer.input_ranks

    def shape_hint() -> str:
        return layer.input_shape.format(C=layer.num_features)

    if ranks is None:
        if isinstance(input, torch.Tensor) and input.dim() < 2:
            raise ValueError(
                with_torch_words(
                    f"{_name(where)}: expected input of shape {shape_hint()} with at least 2 "
                    f"dims, got {input.dim()}-D input of shape {tuple(input.shape)}.",
                    f"expected at least 2D input (got {input.dim()}D input)",
                )
            )
        ranks = (input.dim(),) if isinstance(input, torch.Tensor) else (2,)
        torch_ranks = None
    else:
        torch_ranks = " or ".join(f"{r}D" for r in ranks)
    first_tensor = next(
        (
            name
            for name in ("running_mean", "running_var", "weight", "bias")
            if getattr(layer, name, None) is not None
        ),
        None,
    )
    check_module_input(
        where,
        input,
        layer.num_features,
        ranks,
        shape_hint,
        state_dtype,
        torch_ranks=torch_ranks,
        first_tensor=first_tensor,
    )


def check_mask(where, input, mask) -> None:
    """A mask (of left-out or of real positions): boolean, the input's shape without axis 1.

    Raises:
        TypeError: ``mask`` is not a boolean tensor.
        ValueError: Its shape or device does not match the input's.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        given = type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype
        raise TypeError(f"{_name(where)}: expected mask to be a boolean tensor, got {given}.")
    expected = (input.shape[0], *input.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"{_name(where)}: expected mask of shape {expected} (the input's shape without "
            f"the channel axis), got {tuple(mask.shape)}."
        )
    if mask.device != input.device:
        raise ValueError(
            f"{_name(where)}: expected mask on the input's device {input.device}, "
            f"got {mask.device}."
        )


def check_update_args(where, running_mean, running_var, moments, momentum, counter) -> None:
    """The arguments of a running-statistics update (:func:`batchnorm.functional.update_running`).

    Raises:
        TypeError: Buffers that are not floating-point tensors, a per-channel count, a
            non-numeric ``momentum``, a counter that is not a 1-element tensor.
        ValueError: Buffers of another shape or device than each other or the statistics, a
            count of 1, ``momentum`` outside ``[0, 1]``, ``momentum=None`` without a counter.
    """
    channels = moments.mean.shape[0]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            given = type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype
            raise TypeError(
                f"{_name(where)}: expected {name} to be a floating-point tensor, got {given}."
            )
        if t.shape != (channels,):
            raise ValueError(
                f"{_name(where)}: expected {name} of shape ({channels},) to match the "
                f"statistics' {channels} channels, got shape {tuple(t.shape)}."
            )
    if running_var.device != running_mean.device:
        raise ValueError(
            f"{_name(where)}: expected running_var on running_mean's device "
            f"{running_mean.device}, got {running_var.device}."
        )
    count = moments.count
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(
            f"{_name(where)}: expected statistics with one count for all channels (an int), "
            f"got {type(count).__name__}."
        )
    if count == 1:
        raise ValueError(
            f"{_name(where)}: expected more than 1 value per channel (the unbiased variance of "
            "one value is undefined), got 1."
        )
    if momentum is None:
        if counter is None:
            raise ValueError(
                f"{_name(where)}: momentum=None (cumulative average) needs "
                "num_batches_tracked, got None."
            )
    elif isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{_name(where)}: expected momentum in [0, 1] or None, got {momentum!r}.")
    elif not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{_name(where)}: expected momentum in [0, 1] or None, got {momentum!r}.")
    if counter is not None and (not isinstance(counter, torch.Tensor) or counter.numel() != 1):
        raise TypeError(
            f"{_name(where)}: expected num_batches_tracked to be a 1-element tensor or None, "
            f"got {counter!r}."
        )


def _elsewhere(t: torch.Tensor, on_cpu: bool, device: torch.device | None) -> bool:
    """Whether ``t`` is not on the input's device (``on_cpu``, or ``device`` when not on CPU)."""
    return not t.is_cpu if on_cpu else t.device != device


def check_input(where, input) -> None:
    """The input of a functional call: a floating-point tensor of shape ``(N, C, *)``."""
    if not isinstance(input, torch.Tensor):
        raise _not_a_tensor(where, input)
    if input.dim() < 2:
        # torch's op indexes the channel axis of what it was given.
        words = (
            "tuple index out of range"
            if input.dim() == 0
            else "Dimension out of range (expected to be in range of [-1, 0], but got 1)"
        )
        raise RankError(
            with_torch_words(
                f"{_name(where)}: expected input of shape (N, C, *) with at least 2 dims, "
                f"got shape {tuple(input.shape)}.",
                words,
            )
        )
    if not input.dtype.is_floating_point:
        raise _not_floating(where, input)


def _check_per_channel(where, input, named, allowed) -> None:
    """Each ``(name, tensor or None)`` of ``named``: a ``(C,)`` tensor on the input's device
    with a dtype in ``allowed`` (``None``: any floating dtype); those checked with ``allowed``
    must share one dtype."""
    channels = input.shape[1]
    # ``tensor.device`` builds a new object each time (~0.4 us; this check runs on every batch):
    # compare the cheap ``is_cpu`` flags when the input is on the CPU, devices otherwise.
    on_cpu = input.is_cpu
    device = None if on_cpu else input.device
    shared_dtype = None
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{_name(where)}: expected {name} to be a tensor or None, got {type(t).__name__}."
            )
        if t.shape != (channels,):
            raise ShapeError(
                with_torch_words(
                    f"{_name(where)}: expected {name} of shape ({channels},) to match the "
                    f"input's {channels} channels, got shape {tuple(t.shape)}.",
                    f"{name} should contain {channels} elements not {t.numel()}",
                )
            )
        if _elsewhere(t, on_cpu, device):
            raise ShapeError(
                with_torch_words(
                    f"{_name(where)}: expected {name} on the input's device {input.device}, "
                    f"got {t.device}.",
                    f"Tensor on device {t.device} is not on the expected device {input.device}!",
                )
            )
        if allowed is None:
            if not t.dtype.is_floating_point:
                raise TypeError(
                    f"{_name(where)}: expected {name} with a floating-point dtype, "
                    f"got {_floating_dtype_name(t.dtype)}."
                )
            continue
        if t.dtype not in allowed:
            raise MixedDtypeError(
                with_torch_words(
                    f"{_name(where)}: expected {name} with dtype "
                    f"{' or '.join(_floating_dtype_name(d) for d in allowed)} to go with a "
                    f"{_floating_dtype_name(input.dtype)} input, got "
                    f"{_floating_dtype_name(t.dtype)}.",
                    _mixed_dtype_words(input.dtype, t.dtype),
                )
            )
        if shared_dtype is None:
            shared_dtype = t.dtype
        elif t.dtype != shared_dtype:
            given = [f"{n} {_floating_dtype_name(u.dtype)}" for n, u in named if u is not None]
            raise MixedDtypeError(
                f"{_name(where)}: expected {', '.join(n for n, _ in named)} to share one dtype, "
                f"got {', '.join(given)}."
            )


def _check_eps(where, eps, training: bool) -> None:
    """``eps`` is a number, positive in training and non-negative otherwise (torch's rule)."""
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"{_name(where)}: expected eps to be a float, got {eps!r}.")
    if training and not float(eps) > 0:  # NaN fails too
        raise ValueError(
            with_torch_words(
                f"{_name(where)}: expected a positive eps when using batch statistics "
                f"(training), got {eps!r}.",
                f"batch_norm eps must be positive during training, but got {eps}",
            )
        )
    if not float(eps) >= 0:
        raise ValueError(
            with_torch_words(
                f"{_name(where)}: expected a non-negative eps, got {eps!r}.",
                f"batch_norm eps must be non-negative, but got {eps}",
            )
        )


def check_normalize_args(where, input, mean, var, weight, bias, eps) -> None:
    """Validate a normalization with given statistics (:func:`batchnorm.functional.normalize`).

    ``mean`` and ``var`` may have any floating dtype (float64 statistics normalize a float32
    input in float64); ``weight`` and ``bias`` follow :func:`check_batch_norm_args`.

    Raises:
        TypeError: Non-tensor or non-floating input or statistics, parameters of the wrong
            dtype, a non-numeric ``eps``.
        ValueError: Fewer than 2 dims, a per-channel tensor of the wrong shape or device, a
            missing ``mean`` or ``var``.
    """
    check_input(where, input)
    for name, t in (("mean", mean), ("var", var)):
        if t is None:
            raise ValueError(f"{_name(where)}: expected {name} to be a (C,) tensor, got None.")
    _check_per_channel(where, input, (("mean", mean), ("var", var)), None)
    allowed = _ALLOWED_PARAM_DTYPES.get(input.dtype, (input.dtype,))
    _check_per_channel(where, input, (("weight", weight), ("bias", bias)), allowed)
    _check_eps(where, eps, False)


def check_batch_norm_args(
    where: Where,
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum,
    eps,
    num_batches_tracked,
) -> None:
    """Validate the arguments of one batch-norm call (functional or module) before any work.

    Raises:
        TypeError: Non-tensor or non-floating input, a float32/float64 input whose parameters
            or running statistics have another dtype, or a non-numeric ``eps``/``momentum``.
        ValueError: Fewer than 2 dims, a per-channel tensor of the wrong shape or device,
            only one of the running statistics given, evaluation without running statistics,
            ``momentum=None`` without ``num_batches_tracked``, or a single value per channel
            when batch statistics are used.
    """
    check_input(where, input)
    channels = input.shape[1]
    on_cpu = input.is_cpu
    device = None if on_cpu else input.device
    # torch accepts one mixed-precision combination: a half/bfloat16 input with float32
    # parameters and statistics. Everything else must share the input's dtype; checking here
    # keeps torch's own error (raised after the counter moved) from being reached.
    allowed = _ALLOWED_PARAM_DTYPES.get(input.dtype, (input.dtype,))
    _check_per_channel(
        where,
        input,
        (
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ),
        allowed,
    )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            with_torch_words(
                f"{_name(where)}: expected running_mean and running_var both given or both "
                f"None, got only {'running_mean' if running_var is None else 'running_var'}.",
                "running_mean and running_var must either both be None or neither be None",
            )
        )
    if not training and running_mean is None:
        raise ShapeError(
            with_torch_words(
                f"{_name(where)}: expected running_mean and running_var in evaluation mode "
                "(training=False normalizes with them), got None.",
                "running_mean must be defined in evaluation mode",
            )
        )
    _check_eps(where, eps, training)
    updates = training and running_mean is not None
    if updates:
        # momentum is used only here: torch.nn's layers take any momentum in evaluation mode.
        _check_momentum(where, momentum, num_batches_tracked)
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.numel() != 1:
            raise TypeError(
                f"{_name(where)}: expected num_batches_tracked to be a 1-element tensor or None, "
                f"got {num_batches_tracked!r}."
            )
        if _elsewhere(num_batches_tracked, on_cpu, device):
            raise ShapeError(
                f"{_name(where)}: expected num_batches_tracked on the input's device "
                f"{input.device}, got {num_batches_tracked.device}."
            )
    if updates:
        check_writable(where, running_mean, running_var, num_batches_tracked)
    if training and input.numel() > 0 and input.numel() // channels == 1:
        raise single_value_error(where, input)


def _check_momentum(where, momentum, num_batches_tracked) -> None:
    """``momentum`` where it is used: a number in [0, 1], or None with a counter."""
    if momentum is None:
        if num_batches_tracked is None:
            raise MomentumTypeError(
                with_torch_words(
                    f"{_name(where)}: momentum=None (cumulative average) needs "
                    "num_batches_tracked, got None.",
                    "batch_norm(): argument 'momentum' (position 7) must be float, not NoneType",
                )
            )
        return
    if isinstance(momentum, torch.Tensor):
        raise TypeError(
            f"{_name(where)}: expected momentum to be a float or None, got a tensor "
            f"({momentum!r}); pass float(momentum)."
        )
    if type(momentum) is not float and (
        not isinstance(momentum, numbers.Real) or isinstance(momentum, bool)
    ):
        raise TypeError(
            f"{_name(where)}: expected momentum to be a float or None, got {momentum!r}."
        )
    if not 0.0 <= float(momentum) <= 1.0:  # NaN fails too
        raise ValueError(
            f"{_name(where)}: expected momentum in [0, 1] or None when updating running "
            f"statistics, got {momentum!r}."
        )


_INFERENCE_WORDS = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a "
    "clone to get a normal tensor before doing inplace update.See "
    "https://github.com/pytorch/rfcs/pull/17 for more details."
)


def check_writable(where, running_mean, running_var, num_batches_tracked) -> None:
    """The running statistics and the counter can be updated in place here.

    Tensors made under ``torch.inference_mode()`` cannot be written outside it; torch.nn finds
    out when it increments the counter, this package before anything is written.

    Raises:
        RuntimeError: An inference tensor outside inference mode (torch's words).
    """
    # Dynamo cannot trace either question; a compiled graph's update is torch's in-place op,
    # which makes the same check itself.
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("num_batches_tracked", num_batches_tracked),
    ):
        if t is not None and t.is_inference():
            raise RuntimeError(
                with_torch_words(
                    f"{_name(where)}: expected {name} that can be updated in place, got a "
                    "tensor made under torch.inference_mode(); nothing was changed. Clone the "
                    "buffers, or run the call under torch.inference_mode().",
                    _INFERENCE_WORDS,
                )
            )
