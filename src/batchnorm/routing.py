r"""Where each batch-norm call runs: the Numba kernels (serial or parallel) or torch's op.

One frozen :class:`RoutingPolicy` holds every threshold, and one function, :func:`choose`,
turns a policy and an input into a :data:`Route`. Nothing else in the package compares sizes
against a threshold. The policy in force is per context (a :class:`contextvars.ContextVar`):
:func:`use_routing` changes it for a ``with`` block in the current thread or asyncio task only,
so a test, a benchmark or one part of a program can change it without touching any other.

The routes:

* ``"torch"``: torch's own ``batch_norm`` op, wrapped so that this package's running-average
  arithmetic, counter and non-finite guard still apply. Always for inputs the kernels do not
  take (non-CPU devices, float16/bfloat16, strides that are neither contiguous nor
  channels-last, fewer than 2 dims); for evaluation-mode inputs smaller than
  ``eval_native_bytes``, where torch's op is measured faster; and for everything when
  ``kernels=False``.
* ``"serial"``: the fused single-thread kernels (:mod:`batchnorm.kernels.serial`), for inputs
  of at most ``serial_max_elements`` values (``serial_max_elements * nhwc_train_serial_scale``
  for a channels-last training forward), where starting threads costs more than it saves.
* ``"parallel"``: the fused multi-thread kernels (:mod:`batchnorm.kernels.fused`), above that.

Two conditions of the process override the thresholds:

* **torch.func transforms and forward-mode AD** (``vmap``, ``grad``, ``jvp``, ``jacfwd``,
  ``torch.autograd.forward_ad``): every call runs on torch's op, whose rules for them are
  torch.nn's; see :func:`transformed`.
* **A child made by fork** never runs the parallel kernels. GNU OpenMP, the runtime of Numba's
  ``omp`` threading layer here, cannot start a thread pool in a child forked from a process
  that used it ("fork() called from a process already using GNU OpenMP" kills the child), and
  torch shares that runtime. Such a child runs the serial kernels at any size (and torch's op
  for the stages, which only have parallel kernels), as torch itself runs single-threaded in a
  forked child. Processes made by spawn or forkserver start afresh and use every route.

Example:
    >>> import torch
    >>> from batchnorm.routing import choose, routing_policy, use_routing
    >>> choose(torch.zeros(60, 100), "train")
    'serial'
    >>> choose(torch.zeros(60, 100), "eval")
    'torch'
    >>> with use_routing(eval_native_bytes=0):
    ...     choose(torch.zeros(60, 100), "eval")
    'serial'
    >>> routing_policy().eval_native_bytes == 32 << 20
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import numbers
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ._process import FORKED, forked

__all__ = [
    "OPS",
    "ROUTES",
    "Route",
    "RoutingPolicy",
    "choose",
    "format_bytes",
    "kernel_layout",
    "kernels_enabled",
    "kernels_take",
    "in_forked_child",
    "routing_policy",
    "transformed",
    "use_routing",
]

Route = Literal["torch", "serial", "parallel"]
ROUTES: tuple[str, ...] = ("torch", "serial", "parallel")
# What a call does: a training forward (batch statistics), an evaluation forward (given
# statistics), a backward of either, or one stage of the staged API (moments, normalize, the
# backward's sums or its input gradient), which has parallel kernels only.
OPS: tuple[str, ...] = ("train", "eval", "backward", "stage")
_OP_SET = frozenset(OPS)

KERNEL_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class RoutingPolicy:
    r"""The thresholds that decide where a call runs (see the module docstring).

    Attributes:
        kernels: Use the Numba kernels at all. ``False`` sends every call to torch's op (still
            with this package's running update, counter and non-finite guard): a switch for
            comparisons, not for speed.
        serial_max_elements: Inputs with at most this many values run on the serial kernels.
            Measured kernel to kernel (float32, 2 threads), serial / parallel in us, training
            forward then backward: ``(N, 256)`` at 32K values 25/33 and 24/37, 65K 38/36 and
            42/54, 98K 62/41 and 63/56; ``(N, 64, 256)`` at 32K 16/23 and 17/27, 65K 28/32 and
            30/38, 98K 41/41 and 57/54.
        nhwc_train_serial_scale: A channels-last training forward stays serial up to this
            multiple of ``serial_max_elements``: its serial kernel sums blocks like the parallel
            one and measured faster up to ~1.2e5 values (module level, float32, parallel /
            serial: ``(300, 256)`` 1.18, ``(391, 256)`` 1.10, ``(24, 64, 8, 8)`` channels-last
            1.11; at 131072 values 0.94-1.02).
        eval_native_bytes: Evaluation-mode inputs of fewer bytes run on torch's op. The bound
            is glibc's largest mmap threshold (32 MiB): below it torch's output comes from
            malloc's warm heap and its eval kernel (float32, folded ``x * scale + shift``) runs
            at 82-109 % of the copy roofline, ours at 28-82 %; above it torch's output is mapped
            afresh on every call and ours (from :mod:`batchnorm.outputs`) is not. Measured
            (eval size sweep, module level, float32, 2 threads): torch/ours 0.33-0.93 from 1e5
            to 7.6e6 values, 2.8-3.3 at 1.6e7 and 3.3e7. Training is never routed to torch's
            op: in float32 it loses the variance to cancellation when the mean is large next to
            the spread (normalized output vs the float64 reference, ``(256, 100)``, mean 1e4 /
            std 0.01: error 0.22; the kernels 1.2e-7). Its evaluation op has the same weakness
            to a lesser degree (4e-2 at 1e4 / 0.01); ``eval_native_bytes=0`` keeps evaluation
            on the kernels, at 0.45-0.9x torch's speed for those sizes.

    Raises:
        TypeError: A field of the wrong type.
        ValueError: A negative threshold, or a scale below 1.
    """

    kernels: bool = True
    serial_max_elements: int = 1 << 16
    nhwc_train_serial_scale: float = 15 / 8
    eval_native_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.kernels, bool):
            raise TypeError(
                f"RoutingPolicy(): expected kernels to be a bool, got {self.kernels!r}."
            )
        for name in ("serial_max_elements", "eval_native_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"RoutingPolicy(): expected {name} to be a non-negative int, got {value!r}."
                )
            if value < 0:
                raise ValueError(
                    f"RoutingPolicy(): expected {name} to be a non-negative int, got {value!r}."
                )
        scale = self.nhwc_train_serial_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(
                f"RoutingPolicy(): expected nhwc_train_serial_scale to be a number >= 1, "
                f"got {scale!r}."
            )
        if not scale >= 1:
            raise ValueError(
                f"RoutingPolicy(): expected nhwc_train_serial_scale to be a number >= 1, "
                f"got {scale!r}."
            )

    def describe(self) -> list[str]:
        """The policy in words, one line per decision (``batchnorm info`` prints them)."""
        if not self.kernels:
            return ["kernels: off (every call runs on torch's op)"]
        nhwc = int(self.serial_max_elements * self.nhwc_train_serial_scale)
        return [
            f"training: serial kernels up to {self.serial_max_elements:,} values ({nhwc:,} for "
            "a channels-last forward), parallel above",
            f"evaluation: inputs under {format_bytes(self.eval_native_bytes)} run on torch's op "
            "(measured faster there), larger ones on the kernels",
            "torch's op always: other devices, float16/bfloat16, strides that are neither "
            "contiguous nor channels-last",
        ]


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1 (``32 MiB``)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# The default is shared by every context, which is safe because a RoutingPolicy is frozen.
_POLICY: contextvars.ContextVar[RoutingPolicy] = contextvars.ContextVar(
    "batchnorm_routing_policy",
    default=RoutingPolicy(),  # noqa: B039
)


def kernels_enabled() -> bool:
    """Whether the policy in force uses the kernels at all (``RoutingPolicy.kernels``)."""
    return _POLICY.get().kernels


# A strict torch.export (Dynamo) cannot trace ContextVar.get: marked as having a constant result,
# the call is made once while tracing and its answer baked into the graph. The mark is what
# torch.compiler.assume_constant_result sets, set here directly because that function imports
# torch._dynamo, which added ~1 s to importing this package (tests/test_compile.py checks that
# the decorator still sets exactly this).
kernels_enabled._dynamo_marked_constant = True  # type: ignore[attr-defined]


def routing_policy() -> RoutingPolicy:
    """The routing policy in force in the current context (thread or asyncio task).

    Returns:
        The :class:`RoutingPolicy`; the shipped defaults unless :func:`use_routing` changed it.
    """
    return _POLICY.get()


@contextlib.contextmanager
def use_routing(policy: RoutingPolicy | None = None, **changes: Any) -> Iterator[RoutingPolicy]:
    """Change the routing policy for the body of a ``with`` block, in this context only.

    Other threads and asyncio tasks keep theirs; the previous policy is back when the block
    ends, however it ends. A training step records the policy of its forward, so its backward
    routes the same way even if it runs outside the block.

    Args:
        policy: A whole policy to use, or ``None`` to start from the current one.
        **changes: Fields of :class:`RoutingPolicy` to change, e.g. ``eval_native_bytes=0``.

    Yields:
        The policy in force inside the block.

    Raises:
        TypeError: ``policy`` is not a :class:`RoutingPolicy`, or a change has the wrong type.
        ValueError: An unknown field name, or an invalid value.

    Example:
        >>> with use_routing(kernels=False) as policy:
        ...     policy.kernels
        False
    """
    if policy is None:
        policy = _POLICY.get()
    elif not isinstance(policy, RoutingPolicy):
        raise TypeError(
            f"use_routing(): expected a RoutingPolicy or None, got {type(policy).__name__}."
        )
    fields = {f.name for f in dataclasses.fields(RoutingPolicy)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(
            f"use_routing(): expected fields among {sorted(fields)}, got {', '.join(unknown)}."
        )
    new = dataclasses.replace(policy, **changes)
    token = _POLICY.set(new)
    try:
        yield new
    finally:
        _POLICY.reset(token)


def in_forked_child() -> bool:
    """Whether this process was made by ``fork`` from one that had imported this package.

    Process state, not a threshold, so it is no field of the policy.
    """
    return forked()


# Private entry points of torch: whether a torch.func transform is active, and the level of the
# innermost forward-AD context (-1 outside any). Should a release drop either, its check is off.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
# The module, or a stand-in with the one attribute read from it.
_forward_ad: Any = torch.autograd.forward_ad
if not hasattr(_forward_ad, "_current_level"):
    _forward_ad = type("_NoForwardAD", (), {"_current_level": -1})


def transformed() -> bool:
    """Whether a call now runs under a torch.func transform or in a forward-mode AD context.

    Those calls go to torch's op: its batch norm has the ``vmap``, ``jvp`` and forward-AD rules
    the transforms need, and the call then means exactly what it means for torch.nn.
    """
    return _functorch_active() or _forward_ad._current_level >= 0


def kernel_layout(x: torch.Tensor) -> str | None:
    """Which kernel layout views ``x`` without a copy: ``"nchw"``, ``"nhwc"`` or ``None``.

    ``"nchw"``: contiguous ``(N, C, *)``, viewed as ``(N, C, S)``. ``"nhwc"``: the channel axis
    innermost (channels_last / channels_last_3d, or any contiguous ``(N, C)`` matrix), viewed as
    ``(M, C)`` with ``M = N * S``.
    """
    if x.is_contiguous():
        return "nhwc" if x.dim() == 2 else "nchw"
    rank = x.dim()
    # torch's own memory-format flags where it has them: ~0.15 us, where building the permuted
    # view and asking it took ~1.5 us a call (tests/test_routing.py checks they agree).
    if rank == 4:
        return "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else None
    if rank == 5:
        return "nhwc" if x.is_contiguous(memory_format=torch.channels_last_3d) else None
    if rank == 2:
        return None
    return "nhwc" if x.permute(0, *range(2, rank), 1).is_contiguous() else None


def _kernel_layout_if_taken(x: torch.Tensor) -> str | None:
    """:func:`kernel_layout` of an input the kernels take; ``None`` for any other input."""
    dtype = x.dtype
    if (
        not x.is_cpu
        or (dtype is not torch.float32 and dtype is not torch.float64)
        or x.dim() < 2
        or x.layout != torch.strided
    ):
        return None
    return kernel_layout(x)


def kernels_take(x: torch.Tensor) -> bool:
    """Whether the kernels can serve ``x`` at all: CPU, float32/64, dense, a kernel layout."""
    return _kernel_layout_if_taken(x) is not None


def choose(
    input: torch.Tensor,
    op: str,
    policy: RoutingPolicy | None = None,
    *,
    statistics_require_grad: bool = False,
) -> Route:
    """The one routing decision of the package.

    Args:
        input: The ``(N, C, *)`` input of the call (for ``"backward"``: the forward's input).
        op: ``"train"``, ``"eval"``, ``"backward"`` or ``"stage"`` (see :data:`OPS`).
        policy: The policy to apply; ``None`` for the one in force (:func:`routing_policy`).
        statistics_require_grad: The call's running statistics require grad. torch.nn updates
            such buffers outside the graph and refuses to differentiate through them; only
            torch's op reproduces both, so the call goes there.

    Returns:
        ``"torch"``, ``"serial"`` or ``"parallel"``. A ``"stage"`` is never ``"serial"``.

    Raises:
        ValueError: ``op`` is not one of :data:`OPS`.
    """
    if policy is None:
        policy = _POLICY.get()
    if op not in _OP_SET:
        raise ValueError(f"choose(): expected op in {OPS!r}, got {op!r}.")
    # transformed(), inlined: this runs on every call.
    if (
        not policy.kernels
        or statistics_require_grad
        or _functorch_active()
        or _forward_ad._current_level >= 0
    ):
        return "torch"
    layout = _kernel_layout_if_taken(input)
    if layout is None:
        return "torch"
    numel = input.numel()
    if op == "eval" and numel * input.element_size() < policy.eval_native_bytes:
        return "torch"
    if op == "stage":
        return "torch" if FORKED[0] else "parallel"
    if FORKED[0]:
        return "serial"
    serial_max: float = policy.serial_max_elements
    if op == "train" and layout == "nhwc":
        serial_max = serial_max * policy.nhwc_train_serial_scale
    return "serial" if numel <= serial_max else "parallel"
