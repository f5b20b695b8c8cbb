"""One pass of :func:`batchnorm.recompute_statistics` over the data, and what it accumulates.

During a pass every BatchNorm layer normalizes each batch with that batch's own statistics, as
in training, and its per-channel summary (:class:`batchnorm.stats.Moments`) is folded into the
layer's :class:`Accumulator`. This package's layers compute the summary once, with the stages
the layers run (:func:`make_pass_forward`); other layers run their own forward, watched by a
hook that summarizes their input with the same moments code (:func:`make_hook`).
"""

from __future__ import annotations

import functools
import itertools
import types

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validate import NonFiniteStatisticsError, check_batch_norm_args, layer_name
from ..families import families, family_of
from ..functional import batch_moments, normalize
from ..modules import BatchNormBase
from ..stats import Moments, finalize, merge_moments
from ._activated import activated_family, apply_activation

__all__ = ["LAYER_HEAD", "Accumulator", "PassState", "run_pass"]

WHERE = "recompute_statistics()"
# Per-layer block of the collective: [batches, skipped, count] then two (C,) vectors.
LAYER_HEAD = 3


class Accumulator:
    """The running summary of one layer's inputs over the batches of a pass.

    ``pooled`` keeps one Moments of everything seen; ``paper`` keeps the sums of the batch means
    and of the batches' unbiased variances. Either way the state packs into ``3 + 2C`` floats
    for the collective: ``[batches, skipped, count]``, then two ``(C,)`` vectors.
    """

    def __init__(self, name: str, module: torch.nn.Module, method: str) -> None:
        self.name = name
        self.module = module
        self.method = method
        running_mean = module.running_mean
        assert isinstance(running_mean, torch.Tensor)  # only layers with statistics take part
        self.num_features: int = running_mean.shape[0]
        self.batches = 0
        self.skipped = 0
        self.count = 0
        self.moments = Moments.empty(self.num_features)
        self.sum_mean = np.zeros(self.num_features)
        self.sum_var_unbiased = np.zeros(self.num_features)

    def add(self, count: int, mean: np.ndarray, m2: np.ndarray) -> bool:
        """Fold in one batch; return False (and change nothing) if its statistics are not finite."""
        if self.method == "pooled":
            if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
                return False
            self.moments = merge_moments(self.moments, Moments(count, mean, m2))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                # m_b / (m_b - 1) * sigma_b^2 = M2 / (m_b - 1), the batch's unbiased variance.
                var_unbiased = m2 / (count - 1)
            if not (np.isfinite(mean).all() and np.isfinite(var_unbiased).all()):
                return False
            self.sum_mean += mean
            self.sum_var_unbiased += var_unbiased
        self.batches += 1
        self.count += count
        return True

    def pack(self) -> np.ndarray:
        if self.method == "pooled":
            first, second = self.moments.mean, self.moments.m2
        else:
            first, second = self.sum_mean, self.sum_var_unbiased
        head = np.array([self.batches, self.skipped, self.count], dtype=np.float64)
        return np.concatenate([head, first, second])

    def absorb(self, block: np.ndarray) -> None:
        """Merge another process's packed state (the caller goes through ranks in order)."""
        c = self.num_features
        batches, skipped, count = (int(round(v)) for v in block[:LAYER_HEAD])
        first = block[LAYER_HEAD : LAYER_HEAD + c].copy()
        second = block[LAYER_HEAD + c : LAYER_HEAD + 2 * c].copy()
        self.batches += batches
        self.skipped += skipped
        self.count += count
        if self.method == "pooled":
            self.moments = merge_moments(self.moments, Moments(count, first, second))
        else:
            self.sum_mean += first
            self.sum_var_unbiased += second

    def result(self) -> tuple[int, int, int, np.ndarray, np.ndarray]:
        """``(batches, count, skipped, mean, var_unbiased)``: a LayerStatistics' fields."""
        if self.method == "pooled":
            mean, _, var_unbiased = finalize(self.moments)
        else:
            mean = self.sum_mean / self.batches
            var_unbiased = self.sum_var_unbiased / self.batches
        return self.batches, self.count, self.skipped, mean, var_unbiased


class PassState:
    """State shared by the hooks of one pass: the batch being run and the non-finite policy."""

    def __init__(self, nonfinite: str) -> None:
        self.nonfinite = nonfinite
        self.batch_index = 0
        self.batches_drawn = 0
        # Layer name -> position of its first call in the pass: the order layers run in.
        self.first_call: dict[str, int] = {}


def record(acc: Accumulator, state: PassState, moments: Moments) -> None:
    """Fold one batch's statistics at one layer into the pass, under the non-finite policy."""
    if moments.count == 0:
        return
    count = moments.count
    assert not isinstance(count, np.ndarray)  # unmasked batches: one count for every channel
    if acc.add(count, moments.mean, moments.m2):
        return
    if state.nonfinite == "raise":
        raise NonFiniteStatisticsError(
            f"{WHERE}: expected finite statistics at every BatchNorm layer, got NaN or "
            f"infinite ones at layer {acc.name!r} in batch {state.batch_index}; no running "
            "statistics were changed. Pass nonfinite='skip' to leave such batches out."
        )
    acc.skipped += 1


def make_hook(acc: Accumulator, state: PassState):
    """For a layer with a forward of its own: record the statistics of what it was given.

    A forward hook, not a pre-hook: it runs only once the layer has accepted the input, so a
    malformed batch fails with the layer's own error message and contributes nothing.
    """

    def hook(module, args, kwargs, output):
        state.first_call.setdefault(acc.name, len(state.first_call))
        record(acc, state, batch_moments(args[0] if args else kwargs["input"]))

    return hook


def make_pass_forward(acc: Accumulator, state: PassState, activated: bool = False):
    """For a layer of this package with a stock forward: the pass's forward, statistics once.

    The layer's training-mode transform as its stages: the batch's moments (the kernels the
    layer runs, or float64 torch ops off the kernels' inputs), then the normalization with
    them, so the statistics recorded are exactly the ones the layer normalized with. The checks
    are the layer's own. It is local: a synchronizing layer's own forward would exchange
    statistics every batch, which deadlocks when processes hold different numbers of batches
    (the processes' statistics are reduced once, at the end of the pass). With ``activated``
    (an activated layer of the family table), the layer's activation follows, out of place: the
    statistics are of the input as given, even for a layer that overwrites its input.
    """
    module = acc.module

    def forward(input):
        where = functools.partial(layer_name, module)
        module._check_input_dim(input)
        check_batch_norm_args(
            where, input, None, None, module.weight, module.bias, True, 0.1, module.eps, None
        )
        state.first_call.setdefault(acc.name, len(state.first_call))
        moments = batch_moments(input, where=where)
        record(acc, state, moments)
        if moments.count == 0:
            return torch.empty_like(input)
        mean, var, _ = finalize(moments)
        output = normalize(input, mean, var, module.weight, module.bias, module.eps, where=where)
        return apply_activation(module, output) if activated else output

    return forward


def pass_forward(acc: Accumulator, state: PassState):
    """How a layer runs during the pass: ``(forward or None, records its own statistics)``.

    This package's layers with a stock forward, its variants (ghost batches, batch
    renormalization: the pass normalizes them as BatchNorm, their evaluation transform) and its
    activated layers (BatchNorm, then the activation) compute their statistics once
    (:func:`make_pass_forward`). A synchronizing layer of
    another class runs torch's unsynchronized BatchNorm forward (its own syncs every batch
    when distributed, and torch's refuses CPU input then). Every other layer runs its own
    forward. Those two are watched by a hook (:func:`make_hook`).
    """
    module = acc.module
    family = family_of(type(module))
    if family is not None and (type(module) is family.ours or type(module) in family.variants):
        return make_pass_forward(acc, state), True
    if activated_family(module) is not None:  # the table's: its family's BatchNorm, activated
        return make_pass_forward(acc, state, activated=True), True
    if isinstance(module, BatchNormBase) and isinstance(module, SYNC_CLASSES):
        return make_pass_forward(acc, state), True
    if isinstance(module, SYNC_CLASSES):
        return types.MethodType(torch.nn.modules.batchnorm._BatchNorm.forward, module), False
    return None, False


# The synchronizing families' classes, whose layers always run locally in a pass. (The family
# table is complete: batchnorm.tools imports every layer module first.)
SYNC_CLASSES = tuple(
    cls for family in families() if family.ranks is None for cls in (family.ours, family.torch)
)


def progress_total(data, max_batches) -> int | None:
    try:
        total = len(data)
    except TypeError:  # generators, iterable-style DataLoaders
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def run_pass(data, accs, state, call, max_batches, show_progress, label="") -> None:
    """Run the batches with every layer in batch-statistics mode; restore everything after."""
    saved = []
    handles = []
    batches = data if max_batches is None else itertools.islice(data, max_batches)
    bar = tqdm(
        total=progress_total(data, max_batches),
        disable=not show_progress,
        desc="recompute_statistics" + (f" {label}" if label else ""),
        unit="batch",
    )
    try:
        for acc in accs:
            module = acc.module
            forward, records_itself = pass_forward(acc, state)
            saved.append(
                (
                    module,
                    module.training,
                    module.track_running_stats,
                    forward is not None,
                    module.__dict__.get("forward"),
                )
            )
            module.training = True
            module.track_running_stats = False
            if forward is not None:
                # An instance attribute shadows the class's method for this pass only.
                module.forward = forward
            if not records_itself:
                handles.append(
                    module.register_forward_hook(make_hook(acc, state), with_kwargs=True)
                )
        with torch.no_grad():
            for index, batch in enumerate(batches):
                state.batch_index = index
                call(batch)
                state.batches_drawn += 1
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
        for module, training, tracking, replaced, own_forward in saved:
            module.training = training
            module.track_running_stats = tracking
            if replaced:
                if own_forward is None:
                    del module.forward
                else:
                    module.forward = own_forward
        bar.close()
