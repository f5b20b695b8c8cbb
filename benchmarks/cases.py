"""Benchmark cases: module kind x shape x dtype x memory format x mode.

A :class:`Case` is pure data; the harness turns it into tensors and modules. The two sets,
``quick`` and ``full``, are listed explicitly by :data:`CASE_SETS` so that a figure quoted from
a run can always be traced back to one named case.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

__all__ = ["CASE_SETS", "Case", "MODES", "TRAFFIC", "full_cases", "quick_cases"]

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


@dataclass(frozen=True)
class Case:
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
    def num_features(self) -> int:
        """Channel count ``C``."""
        return self.shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return getattr(torch, self.dtype)

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


#: Named case sets for ``--shapes``.
CASE_SETS = {"quick": quick_cases, "full": full_cases}
