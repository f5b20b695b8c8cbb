"""Watch how the activations of chosen layers are distributed while a model trains.

:class:`ActivationMonitor` puts forward hooks on the layers you name (by type or by module
name) and, when asked to record, summarises the layer's input or output: the requested
quantiles, the mean, the standard deviation and, for a sigmoid or tanh, the fraction of values
in the flat tails. Records are plain NumPy arrays, ready for :mod:`batchnorm.lab.plots` or for
JSON. This is the measuring tool behind the lab's reproduction of Ioffe & Szegedy (2015),
Figure 1(b, c): the 15th/50th/85th percentiles of one sigmoid's input over training.

Two ways to decide what is recorded:

- a schedule, ``every=k``: the first forward pass of each hooked layer in every k-th step is
  recorded, where a step is one call of :meth:`ActivationMonitor.step` (put it after
  ``optimizer.step()``);
- :meth:`ActivationMonitor.capture`, a block whose forward passes are recorded together, e.g. a
  pass over a fixed probe set, whatever the schedule says.

Outside those, a hook only checks a flag and returns, so an attached monitor costs one Python
call per hooked layer and forward pass.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .families import activated_family_of

__all__ = ["ActivationMonitor", "ActivationRecord", "ActivationTrace"]

logger = logging.getLogger(__name__)

# Activations whose saturation is measured, by module type. A value counts as saturated when
# the activation's output is within 1 - saturation_level of an asymptote (sigmoid: outside
# [1 - level, level]; tanh: outside [-level, level]), i.e. where the derivative has fallen to a
# few per cent of its peak and little gradient passes (Ioffe & Szegedy 2015, Sec. 2).
_SATURATING = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_WHERE = ("input", "output")
_PER = ("unit", "layer")


@dataclass(frozen=True)
class ActivationRecord:
    """The distribution of one layer's input or output at one step.

    Units are the entries of axis 1 (features of a ``Linear``, channels of a conv); with
    ``per="unit"`` each unit is summarised over every other axis (batch and spatial), with
    ``per="layer"`` all values form one distribution and the unit axis has length 1.

    Attributes:
        step: The monitor's step counter when the record was taken, or the ``step`` given to
            :meth:`ActivationMonitor.capture`.
        layer: The module's name in the model (``""`` for the root).
        where: ``"input"`` or ``"output"``.
        per: ``"unit"`` or ``"layer"``.
        count: Values summarised per unit.
        quantile_levels: The quantile levels, in ``[0, 1]``.
        quantiles: float64 array ``(U, Q)``, linear interpolation (NumPy's default method,
            the same as ``torch.quantile``).
        mean: float64 array ``(U,)``.
        std: float64 array ``(U,)``, the biased (population) standard deviation.
        saturated: float64 array ``(U,)``, fraction of saturated values, or ``None`` for a
            layer that is not a sigmoid or tanh.
    """

    step: int
    layer: str
    where: str
    per: str
    count: int
    quantile_levels: tuple[float, ...]
    quantiles: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    saturated: np.ndarray | None


@dataclass(frozen=True)
class ActivationTrace:
    """The records of one layer stacked over steps: what the plot functions take.

    Attributes:
        layer: The module's name in the model.
        where: ``"input"`` or ``"output"``.
        per: ``"unit"`` or ``"layer"``.
        quantile_levels: The quantile levels.
        steps: int64 array ``(T,)``.
        count: int64 array ``(T,)``, values summarised per unit at each step.
        quantiles: float64 array ``(T, U, Q)``.
        mean: float64 array ``(T, U)``.
        std: float64 array ``(T, U)``, biased.
        saturated: float64 array ``(T, U)``, or ``None`` if the layer does not saturate.
    """

    layer: str
    where: str
    per: str
    quantile_levels: tuple[float, ...]
    steps: np.ndarray
    count: np.ndarray
    quantiles: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    saturated: np.ndarray | None

    @classmethod
    def from_records(cls, records: Sequence[ActivationRecord]) -> ActivationTrace:
        """Stack records of one layer (same ``where``, ``per`` and levels) in the given order.

        Raises:
            ValueError: If ``records`` is empty or mixes layers, settings or unit counts.
        """
        if not records:
            raise ValueError("ActivationTrace.from_records(): expected at least 1 record, got 0.")
        first = records[0]
        keys = {(r.layer, r.where, r.per, r.quantile_levels, r.quantiles.shape) for r in records}
        if len(keys) != 1:
            raise ValueError(
                "ActivationTrace.from_records(): expected records of one layer with one "
                f"setting and unit count, got {len(keys)} different ones: {sorted(keys)!r}."
            )
        saturated = None
        if first.saturated is not None:
            saturated = np.stack([np.asarray(r.saturated) for r in records])
        return cls(
            layer=first.layer,
            where=first.where,
            per=first.per,
            quantile_levels=first.quantile_levels,
            steps=np.array([r.step for r in records], dtype=np.int64),
            count=np.array([r.count for r in records], dtype=np.int64),
            quantiles=np.stack([r.quantiles for r in records]),
            mean=np.stack([r.mean for r in records]),
            std=np.stack([r.std for r in records]),
            saturated=saturated,
        )

    def records(self) -> list[ActivationRecord]:
        """Split the trace back into one :class:`ActivationRecord` per step."""
        return [
            ActivationRecord(
                step=int(self.steps[t]),
                layer=self.layer,
                where=self.where,
                per=self.per,
                count=int(self.count[t]),
                quantile_levels=self.quantile_levels,
                quantiles=self.quantiles[t],
                mean=self.mean[t],
                std=self.std[t],
                saturated=None if self.saturated is None else self.saturated[t],
            )
            for t in range(len(self.steps))
        ]

    def to_dict(self, decimals: int | None = None) -> dict[str, Any]:
        """A JSON-serialisable dict (lists of floats); :meth:`from_dict` reverses it.

        Args:
            decimals: Round the float arrays to this many decimals (smaller files); ``None``
                keeps full float64 precision.
        """

        def floats(a: np.ndarray | None) -> list | None:
            if a is None:
                return None
            return (a if decimals is None else np.round(a, decimals)).tolist()

        return {
            "layer": self.layer,
            "where": self.where,
            "per": self.per,
            "quantile_levels": list(self.quantile_levels),
            "steps": self.steps.tolist(),
            "count": self.count.tolist(),
            "quantiles": floats(self.quantiles),
            "mean": floats(self.mean),
            "std": floats(self.std),
            "saturated": floats(self.saturated),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationTrace:
        """Rebuild a trace from :meth:`to_dict`'s output (e.g. read back from JSON)."""
        saturated = data.get("saturated")
        return cls(
            layer=data["layer"],
            where=data["where"],
            per=data["per"],
            quantile_levels=tuple(float(q) for q in data["quantile_levels"]),
            steps=np.asarray(data["steps"], dtype=np.int64),
            count=np.asarray(data["count"], dtype=np.int64),
            quantiles=np.asarray(data["quantiles"], dtype=np.float64),
            mean=np.asarray(data["mean"], dtype=np.float64),
            std=np.asarray(data["std"], dtype=np.float64),
            saturated=None if saturated is None else np.asarray(saturated, dtype=np.float64),
        )


class ActivationMonitor:
    """Record the distribution of chosen layers' inputs or outputs while a model runs.

    Hooks are attached by :meth:`attach` or by entering the monitor as a context manager, and
    removed by :meth:`detach` or on leaving it; the model's outputs are never changed. Records
    are summarised on the CPU in float64 from a detached copy, so recording neither joins the
    autograd graph nor changes any tensor of the model.

    Args:
        model: The model to watch.
        layers: Which submodules: a module type or tuple of types (every submodule that is an
            instance), or a module name or list of names as in ``model.named_modules()``.
        where: ``"input"`` (the first positional argument of the layer's forward) or
            ``"output"``. A BatchNorm layer with an activation (``batchnorm.BatchNormAct2d``,
            any activated layer of :mod:`batchnorm.families`) is watched as the BatchNorm it
            is (``layers=torch.nn.BatchNorm2d`` selects it): its input is read before its
            forward runs, since such a layer may compute in place, and its output is the
            activation's.
        per: ``"unit"``: one distribution per entry of axis 1, over all other axes;
            ``"layer"``: one distribution over every value.
        every: Record the first forward pass of each layer in every ``every``-th step (steps
            counted by :meth:`step`, starting at 0, so step 0 is recorded); ``None`` records
            only inside :meth:`capture`.
        quantiles: Quantile levels in ``[0, 1]``; the paper's Figure 1 uses
            ``(0.15, 0.5, 0.85)``.
        saturation_level: For ``nn.Sigmoid``/``nn.Tanh`` layers, a value is saturated when the
            activation's output lies outside ``[1 - level, level]`` (sigmoid) or
            ``[-level, level]`` (tanh); with ``where="input"`` the activation is applied
            first. Must be in ``(0.5, 1)``.
        log_dir: If given, each record is also written to TensorBoard there: a histogram of
            the values and scalars for the unit-averaged quantiles, mean, std and saturation.
            Needs the ``tensorboard`` package (the ``tensorboard`` extra).

    Raises:
        ValueError: If a name does not exist in ``model``, no submodule has a requested type,
            or an argument is outside the range given above.
        TypeError: If ``model`` is not an ``nn.Module`` or ``layers`` is neither types nor
            names.
        ModuleNotFoundError: If ``log_dir`` is given and tensorboard is not installed.

    Example:
        >>> import torch
        >>> from batchnorm.monitor import ActivationMonitor
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid())
        >>> with ActivationMonitor(net, torch.nn.Sigmoid, every=None) as monitor:
        ...     with monitor.capture(step=0):
        ...         _ = net(torch.randn(32, 3))
        >>> monitor.trace("1").quantiles.shape  # (steps, units, quantiles)
        (1, 4, 3)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: type | tuple[type, ...] | str | Iterable[str],
        *,
        where: str = "input",
        per: str = "unit",
        every: int | None = 1,
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        saturation_level: float = 0.99,
        log_dir: str | None = None,
    ) -> None:
        where_ = "ActivationMonitor()"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where_}: expected a torch.nn.Module, got {type(model).__name__}.")
        if where not in _WHERE:
            raise ValueError(f"{where_}: expected where in {_WHERE!r}, got {where!r}.")
        if per not in _PER:
            raise ValueError(f"{where_}: expected per in {_PER!r}, got {per!r}.")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
            raise TypeError(f"{where_}: expected every to be an int >= 1 or None, got {every!r}.")
        if every is not None and every < 1:
            raise ValueError(f"{where_}: expected every to be an int >= 1 or None, got {every!r}.")
        levels = tuple(float(q) for q in quantiles)
        if not levels or not all(0.0 <= q <= 1.0 for q in levels):
            raise ValueError(
                f"{where_}: expected a non-empty sequence of quantile levels in [0, 1], "
                f"got {tuple(quantiles)!r}."
            )
        if not 0.5 < saturation_level < 1.0:
            raise ValueError(
                f"{where_}: expected saturation_level in (0.5, 1), got {saturation_level!r}."
            )
        self.model = model
        self.where = where
        self.per = per
        self.every = every
        self.quantile_levels = levels
        self.saturation_level = float(saturation_level)
        self.log_dir = None if log_dir is None else str(log_dir)
        self._modules = _select_layers(model, layers)
        self.records: list[ActivationRecord] = []
        self.step_count = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._recorded_this_step: set[str] = set()
        self._captured: dict[str, list[torch.Tensor]] | None = None
        self._writer = None
        if self.log_dir is not None:
            _summary_writer_class()  # fail now, not at the first record

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the watched layers, in the model's order."""
        return tuple(self._modules)

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently attached."""
        return bool(self._handles)

    def attach(self) -> ActivationMonitor:
        """Register the forward hooks (a no-op if already attached) and return ``self``."""
        if self._handles:
            return self
        if self.log_dir is not None and self._writer is None:
            self._writer = _summary_writer_class()(log_dir=self.log_dir)
        for name, module in self._modules.items():
            hook = self._make_hook(name)
            if self.where == "input" and activated_family_of(type(module)) is not None:
                # Before the forward: an activated layer may overwrite its input (InPlaceABN).
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(hook, with_kwargs=True)
            self._handles.append(handle)
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered and close its TensorBoard writer.

        The records stay available. Safe to call twice.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ActivationMonitor:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def step(self, n: int = 1) -> None:
        """Advance the step counter by ``n`` (call once per optimiser step)."""
        self.step_count += n
        self._recorded_this_step.clear()

    @contextlib.contextmanager
    def capture(self, step: int | None = None) -> Iterator[ActivationMonitor]:
        """Record the forward passes inside the block, together, as one record per layer.

        The values of every forward pass of a watched layer inside the block are pooled (e.g.
        several batches of a probe set) and summarised when the block ends; the schedule is
        suspended meanwhile. Layers that ran no forward pass inside the block get no record.

        Args:
            step: The step to file the records under; ``None`` means the current
                :attr:`step_count`.

        Raises:
            RuntimeError: If the monitor is not attached, or captures are nested.
        """
        if not self._handles:
            raise RuntimeError(
                "ActivationMonitor.capture(): expected an attached monitor, got a detached one."
                " Use it inside `with monitor:` or call monitor.attach() first."
            )
        if self._captured is not None:
            raise RuntimeError(
                "ActivationMonitor.capture(): expected no capture in progress, got a nested one."
            )
        self._captured = {}
        try:
            yield self
            captured = self._captured
        finally:
            self._captured = None
        label = self.step_count if step is None else int(step)
        for name in self._modules:
            if captured.get(name):
                self._add_record(name, torch.cat(captured[name], dim=0), label)

    def trace(self, layer: str) -> ActivationTrace:
        """The records of one layer stacked over steps.

        Raises:
            ValueError: If ``layer`` is not watched or has no record yet.
        """
        if layer not in self._modules:
            raise ValueError(
                f"ActivationMonitor.trace(): expected one of the watched layers "
                f"{list(self._modules)!r}, got {layer!r}."
            )
        records = [r for r in self.records if r.layer == layer]
        if not records:
            raise ValueError(
                f"ActivationMonitor.trace(): expected records of layer {layer!r}, got none yet."
            )
        return ActivationTrace.from_records(records)

    def traces(self) -> dict[str, ActivationTrace]:
        """:meth:`trace` for every watched layer that has records."""
        names = {r.layer for r in self.records}
        return {name: self.trace(name) for name in self._modules if name in names}

    def clear(self) -> None:
        """Forget all records (the step counter is kept)."""
        self.records.clear()

    # --- internals ----------------------------------------------------------------------------

    def _make_hook(self, name: str):
        # A forward hook, or a forward pre-hook (called without ``output``).
        def hook(module, args, kwargs, output=None):
            captured = self._captured
            if captured is None:
                # The common case when not recording: two comparisons and out.
                if self.every is None or self.step_count % self.every:
                    return None
                if name in self._recorded_this_step:
                    return None
            value = _pick_tensor(args, kwargs) if self.where == "input" else output
            if not isinstance(value, torch.Tensor):
                logger.warning(
                    "ActivationMonitor: layer %r has no tensor %s; not recorded.", name, self.where
                )
                return None
            if captured is not None:
                # A copy: the block may run further code (in-place ops) before it ends.
                captured.setdefault(name, []).append(value.detach().to("cpu", copy=True))
            else:
                self._recorded_this_step.add(name)
                self._add_record(name, value.detach(), self.step_count)
            return None

        return hook

    def _add_record(self, name: str, value: torch.Tensor, step: int) -> None:
        activation = _SATURATING.get(type(self._modules[name]))
        if value.numel() == 0:
            logger.warning("ActivationMonitor: layer %r saw an empty tensor; not recorded.", name)
            return
        if self.per == "unit":
            if value.dim() < 2:
                raise ValueError(
                    f"ActivationMonitor(per='unit'): expected the {self.where} of layer {name!r} "
                    f"to have a unit axis 1 (at least 2 dims), got shape {tuple(value.shape)}. "
                    "Use per='layer'."
                )
            units = value.shape[1]
            table = value.detach().transpose(0, 1).reshape(units, -1)
        else:
            table = value.detach().reshape(1, -1)
        values = table.to("cpu", torch.float64).numpy()
        record = ActivationRecord(
            step=int(step),
            layer=name,
            where=self.where,
            per=self.per,
            count=int(values.shape[1]),
            quantile_levels=self.quantile_levels,
            quantiles=np.quantile(values, self.quantile_levels, axis=1).T.copy(),
            mean=values.mean(axis=1),
            std=values.std(axis=1),
            saturated=self._saturation(values, activation),
        )
        self.records.append(record)
        if self._writer is not None:
            self._write_tensorboard(record, values)

    def _saturation(self, values: np.ndarray, activation: str | None) -> np.ndarray | None:
        if activation is None:
            return None
        level = self.saturation_level
        if activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-values)) if self.where == "input" else values
            return ((out < 1.0 - level) | (out > level)).mean(axis=1)
        out = np.tanh(values) if self.where == "input" else values
        return (np.abs(out) > level).mean(axis=1)

    def _write_tensorboard(self, record: ActivationRecord, values: np.ndarray) -> None:
        writer = self._writer
        if writer is None:  # called only with a log_dir, which opens the writer
            return
        tag = f"{record.layer or 'model'}/{record.where}"
        writer.add_histogram(tag, values.ravel(), record.step)
        for level, column in zip(record.quantile_levels, record.quantiles.T, strict=True):
            writer.add_scalar(f"{tag}/q{100 * level:g}", column.mean(), record.step)
        writer.add_scalar(f"{tag}/mean", record.mean.mean(), record.step)
        writer.add_scalar(f"{tag}/std", record.std.mean(), record.step)
        if record.saturated is not None:
            writer.add_scalar(f"{tag}/saturated", record.saturated.mean(), record.step)


def _pick_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The layer's input: the first positional argument, else the first tensor keyword."""
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _select_layers(
    model: nn.Module, layers: type | tuple[type, ...] | str | Iterable[str]
) -> dict[str, nn.Module]:
    """Resolve ``layers`` (types or names) to ``{name: module}`` in the model's order."""
    where = "ActivationMonitor(layers=...)"
    named = dict(model.named_modules())
    if isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        types = (
            (layers,)
            if isinstance(layers, type)
            else tuple(t for t in layers if isinstance(t, type))  # all are: checked above
        )
        chosen = {name: m for name, m in named.items() if any(isinstance(m, t) for t in types)}
        if not chosen:
            present = sorted({type(m).__name__ for m in named.values()})
            wanted = ", ".join(t.__name__ for t in types)
            raise ValueError(
                f"{where}: expected at least one submodule of type {wanted}, got none; the "
                f"model holds: {', '.join(present)}."
            )
        return chosen
    names = [layers] if isinstance(layers, str) else list(layers) if layers is not None else []
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"{where}: expected a module type, a tuple of types, a name or a list of names, "
            f"got {layers!r}."
        )
    missing = [n for n in names if n not in named]
    if missing:
        shown = list(named)[:20]
        close = difflib.get_close_matches(missing[0], list(named), n=1)
        raise ValueError(
            f"{where}: expected names from model.named_modules(), got {missing!r}; choose from: "
            f"{', '.join(repr(n) for n in shown)}{', ...' if len(named) > 20 else ''}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )
    wanted_names = set(names)
    return {name: module for name, module in named.items() if name in wanted_names}


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ModuleNotFoundError(
            "ActivationMonitor(log_dir=...): expected the tensorboard package to be installed, "
            'got none. Install the extra: pip install "batchnorm[tensorboard]", or leave '
            "log_dir unset."
        ) from err
    return SummaryWriter
