"""Benchmark cases: module kind x shape x dtype x memory format x mode.

A :class:`Case` is pure data; the harness turns it into tensors and modules. The two sets,
``quick`` and ``full``, are listed explicitly by :data:`CASE_SETS` so that a figure quoted from
a run can always be traced back to one named case.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

__all__ = [
    "CASE_SETS",
    "KERNEL_CASE_SETS",
    "KERNEL_OPS",
    "KERNEL_TRAFFIC",
    "SWEEP_FAMILIES",
    "Case",
    "KernelCase",
    "MODES",
    "TRAFFIC",
    "full_cases",
    "kernel_cases",
    "quick_cases",
    "smoke_cases",
    "sweep_cases",
    "sweep_sizes",
]

#: The timed operations. ``train_fwd`` is the forward half of ``fwd_bwd`` (input and parameters
#: require grad, so autograd records the graph as in a training step); ``eval_fwd`` runs under
#: ``torch.no_grad()`` as inference does.
MODES = ("train_fwd", "eval_fwd", "fwd_bwd")

#: Minimum memory traffic of each mode, as (reads, writes) of x-sized tensors. Per-channel
#: vectors are negligible next to these.
#: - train_fwd: one read for the statistics, one read + one write to normalize -> 2R + 1W.
#: - eval_fwd: statistics are known, so normalize only -> 1R + 1W.
#: - fwd_bwd: forward (2R + 1W); backward reduces sum(dy) and sum(dy * x_hat), reading dy and x
#:   (2R), then applies dx from dy and x (2R + 1W) -> 6R + 2W in total.
TRAFFIC = {"train_fwd": (2, 1), "eval_fwd": (1, 1), "fwd_bwd": (6, 2)}

_KIND_BY_NDIM = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
_SHORT_FORMAT = {"contiguous": "nc", "channels_last": "cl"}


class _TensorSpec:
    """What both case kinds derive from their ``shape`` and ``dtype`` fields."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def num_features(self) -> int:
        """Channel count ``C``."""
        return self.shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Case(_TensorSpec):
    """One benchmark case.

    Attributes:
        name: Stable identifier, e.g. ``"bn2d-64x64x56x56-f32-cl-fwd_bwd"``; used as the JSON key
            and by ``--filter``.
        kind: Module class name, the same in ``torch.nn`` and ``batchnorm``: ``"BatchNorm1d"``,
            ``"BatchNorm2d"`` or ``"BatchNorm3d"``.
        shape: Input shape ``(N, C, *)``.
        dtype: ``"float32"`` or ``"float64"``.
        memory_format: ``"contiguous"`` or ``"channels_last"`` (``channels_last_3d`` for 5-D).
        mode: One of :data:`MODES`.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    memory_format: str
    mode: str

    @property
    def torch_memory_format(self) -> torch.memory_format:
        """The memory format to pass to ``Tensor.contiguous``."""
        if self.memory_format == "contiguous":
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d

    @property
    def numel(self) -> int:
        """Number of elements of the input."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def traffic_bytes(self) -> int:
        """Minimum bytes moved to and from memory by one call of this mode (see TRAFFIC)."""
        reads, writes = TRAFFIC[self.mode]
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return (reads + writes) * self.numel * itemsize

    def to_dict(self) -> dict:
        """JSON-ready description, including the traffic figure the roofline uses."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["traffic_bytes"] = self.traffic_bytes
        return d


def make_case(
    shape: tuple[int, ...], mode: str, memory_format: str = "contiguous", dtype: str = "float32"
) -> Case:
    """Build a case with its canonical name; the module kind follows from the rank."""
    if mode not in MODES:
        raise ValueError(f"make_case(): expected mode in {MODES}, got {mode!r}.")
    if memory_format not in _SHORT_FORMAT:
        raise ValueError(
            f"make_case(): expected memory_format in {tuple(_SHORT_FORMAT)}, got {memory_format!r}."
        )
    if memory_format == "channels_last" and len(shape) not in (4, 5):
        raise ValueError(
            f"make_case(): expected a 4-D or 5-D shape for channels_last, got {tuple(shape)}."
        )
    kind = _KIND_BY_NDIM[len(shape)]
    name = "-".join(
        [
            "bn" + kind[-2:],
            "x".join(map(str, shape)),
            {"float32": "f32", "float64": "f64"}[dtype],
            _SHORT_FORMAT[memory_format],
            mode,
        ]
    )
    return Case(name, kind, tuple(shape), dtype, memory_format, mode)


def _grid(shapes, formats, modes=MODES, dtype="float32") -> list[Case]:
    return [make_case(s, m, f, dtype) for s, f, m in itertools.product(shapes, formats, modes)]


def quick_cases() -> list[Case]:
    """About a minute on 2 cores: the headline shape, a mid-size one in both layouts, both 1-D."""
    return (
        _grid([(64, 64, 56, 56)], ["contiguous"])
        + _grid([(32, 128, 28, 28)], ["contiguous", "channels_last"])
        + _grid([(4096, 256), (60, 100)], ["contiguous"])
    )


def full_cases() -> list[Case]:
    """Every required shape in every layout and mode, plus 3-D, (N, C, L) and float64 cases."""
    conv2d = [(64, 64, 56, 56), (32, 128, 28, 28), (128, 256, 14, 14)]
    return (
        _grid(conv2d, ["contiguous", "channels_last"])
        + _grid([(16, 32, 16, 28, 28)], ["contiguous", "channels_last"])
        + _grid([(4096, 256), (60, 100), (64, 128, 512)], ["contiguous"])
        + _grid([(32, 128, 28, 28)], ["contiguous"], dtype="float64")
    )


def smoke_cases() -> list[Case]:
    """Seconds, for the tests and ``run_all --suite smoke``: tiny shapes, numbers mean nothing."""
    return _grid([(6, 3)], ["contiguous"]) + _grid(
        [(4, 3, 5, 5)], ["channels_last"], ["train_fwd", "fwd_bwd"]
    )


#: Named case sets for ``--shapes``.
CASE_SETS = {"quick": quick_cases, "full": full_cases, "smoke": smoke_cases}


# --------------------------------------------------------------------------- kernel level

#: The timed kernel sequences of ``bench_kernels``, all writing into preallocated outputs:
#: ``train_fwd`` = moments + normalize, ``eval_fwd`` = normalize, ``backward`` =
#: backward_reduce + backward_apply (the training backward).
KERNEL_OPS = ("train_fwd", "eval_fwd", "backward")

#: Memory traffic of each kernel sequence as (reads, writes) of x-sized arrays, from the
#: "Memory passes" paragraph of each kernel module's header: moments 1R, normalize 1R + 1W,
#: backward_reduce 2R (dy, x), backward_apply 2R + 1W (dy, x -> dx).
KERNEL_TRAFFIC = {"train_fwd": (2, 1), "eval_fwd": (1, 1), "backward": (4, 1)}


@dataclass(frozen=True)
class KernelCase(_TensorSpec):
    """One kernel-level case: a kernel sequence on one shape in one kernel layout.

    Attributes:
        name: Stable identifier, e.g. ``"k-64x64x56x56-f32-nhwc-backward"``.
        shape: The logical ``(N, C, *)`` shape of the tensor (as torch sees it).
        layout: ``"nchw"`` (contiguous tensor, kernel view ``(N, C, S)``) or ``"nhwc"``
            (channels-last tensor or a 2-D ``(N, C)`` matrix, kernel view ``(M, C)``).
        dtype: ``"float32"`` or ``"float64"``.
        op: One of :data:`KERNEL_OPS`.
    """

    name: str
    shape: tuple[int, ...]
    layout: str
    dtype: str
    op: str

    @property
    def torch_memory_format(self) -> torch.memory_format:
        """The memory format of the torch tensor whose kernel view is ``layout``."""
        if self.layout == "nchw" or len(self.shape) == 2:
            return torch.contiguous_format
        return torch.channels_last if len(self.shape) == 4 else torch.channels_last_3d

    @property
    def numel(self) -> int:
        """Number of elements of ``x``."""
        return math.prod(self.shape)

    @property
    def traffic_bytes(self) -> int:
        """Bytes the kernel sequence moves (see :data:`KERNEL_TRAFFIC`)."""
        reads, writes = KERNEL_TRAFFIC[self.op]
        return (
            (reads + writes) * self.numel * torch.empty((), dtype=self.torch_dtype).element_size()
        )

    def to_dict(self) -> dict:
        """JSON-ready description, including the traffic figure the roofline uses."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["traffic_bytes"] = self.traffic_bytes
        return d


def make_kernel_case(
    shape: tuple[int, ...], layout: str, op: str, dtype: str = "float32"
) -> KernelCase:
    """Build a kernel case with its canonical name."""
    if op not in KERNEL_OPS:
        raise ValueError(f"make_kernel_case(): expected op in {KERNEL_OPS}, got {op!r}.")
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"make_kernel_case(): expected layout nchw or nhwc, got {layout!r}.")
    if len(shape) == 2 and layout != "nhwc":
        raise ValueError(f"make_kernel_case(): a 2-D shape is the nhwc layout, got {layout!r}.")
    dt = {"float32": "f32", "float64": "f64"}[dtype]
    name = f"k-{'x'.join(map(str, shape))}-{dt}-{layout}-{op}"
    return KernelCase(name, tuple(shape), layout, dtype, op)


def kernel_cases(which: str) -> list[KernelCase]:
    """Kernel case sets: ``quick`` (headline shape both layouts, (4096, 256)), ``full`` (every
    shape of the issue in both layouts), ``smoke`` (tiny, for tests)."""
    if which == "smoke":
        shapes = [((4, 3, 5, 5), "nchw"), ((4, 3, 5, 5), "nhwc"), ((16, 8), "nhwc")]
    else:
        conv = [(64, 64, 56, 56)]
        if which == "full":
            conv += [(32, 128, 28, 28), (128, 256, 14, 14)]
        elif which != "quick":
            raise ValueError(f"kernel_cases(): expected quick, full or smoke, got {which!r}.")
        shapes = [(s, lay) for s in conv for lay in ("nchw", "nhwc")] + [((4096, 256), "nhwc")]
    return [make_kernel_case(s, lay, op) for s, lay in shapes for op in KERNEL_OPS]


#: Named kernel case sets for ``bench_kernels --shapes``.
KERNEL_CASE_SETS = ("quick", "full", "smoke")


# --------------------------------------------------------------------------- size sweep


def _family_c64(numel: float) -> tuple[int, ...]:
    # (N, 64, H, W): N doubles from 1 up to 256 as the size grows, the map stays square.
    per_channel = max(4.0, numel / 64)
    n = 2 ** max(0, min(8, round(math.log2(max(1.0, per_channel / 3136)))))
    side = max(2, round(math.sqrt(per_channel / n)))
    return (n, 64, side, side)


def _family_c256(numel: float) -> tuple[int, ...]:
    # (N, 256) BatchNorm1d input: a classifier head or MLP.
    return (max(2, round(numel / 256)), 256)


#: Shape families of the sweep: name -> (shape for a target element count, memory format).
SWEEP_FAMILIES = {
    "c64-nc": (_family_c64, "contiguous"),
    "c64-cl": (_family_c64, "channels_last"),
    "c256-2d": (_family_c256, "contiguous"),
}


def sweep_sizes(points: int, lo: float = 1e3, hi: float = 6e7) -> list[float]:
    """``points`` log-spaced target element counts from ``lo`` to ``hi`` (both included)."""
    if points < 2:
        return [lo]
    step = (math.log(hi) - math.log(lo)) / (points - 1)
    return [math.exp(math.log(lo) + i * step) for i in range(points)]


def sweep_cases(
    families: list[str], sizes: list[float], modes: tuple[str, ...] = ("train_fwd", "fwd_bwd")
) -> list[tuple[str, Case]]:
    """``(family, case)`` pairs, smallest size first within each family and mode."""
    out = []
    for fam in families:
        shape_of, fmt = SWEEP_FAMILIES[fam]
        shapes = list(dict.fromkeys(shape_of(n) for n in sizes))  # drop duplicates, keep order
        out += [(fam, make_case(s, m, fmt)) for m in modes for s in shapes]
    return out
