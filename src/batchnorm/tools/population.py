r"""Exact population statistics: recompute every BatchNorm layer's running estimates from data.

The running averages a BatchNorm layer keeps during training are an exponential average of
batch statistics taken while the weights were still moving, so after training (or after
averaging weights, as in SWA) they describe a network that no longer exists.
:func:`recompute_statistics` replaces them with statistics of the final network over a pass
through the data: Algorithm 2 of Ioffe & Szegedy (2015), steps 8-10, with the weights fixed.

How a pass works. Every BatchNorm layer is put in training mode with ``track_running_stats``
off, so that it normalises each batch with that batch's own statistics and touches no buffer
(the paper runs the *training* network over the batches). A forward hook summarises each
layer's input per channel as a :class:`~batchnorm.stats.Moments` (count, mean, M2) in float64;
the summaries of all batches (and all processes) are merged, and only at the end are the running
buffers written. Modes, flags and hooks are restored whatever happens, so a failed pass leaves
the model exactly as it was.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._validate import NonFiniteStatisticsError, NonFiniteStatisticsWarning, check_nonfinite_policy
from ..functional import update_running
from ..stats import Moments
from ._activated import activated_family
from ._population_pass import LAYER_HEAD, Accumulator, PassState, run_pass

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


__all__ = ["LayerStatistics", "recompute_statistics"]

logger = logging.getLogger(__name__)

_WHERE = "recompute_statistics()"
_METHODS = ("pooled", "paper", "sequential")
# Per-process header of the one collective: [this process failed, batches it drew].
_HEADER = 2


@dataclass(frozen=True, eq=False)
class LayerStatistics:
    """What :func:`recompute_statistics` wrote into one layer, for comparison with the old EMA.

    Attributes:
        batches: Number of forward calls of the layer that contributed (over all processes);
            also the value written to ``num_batches_tracked``.
        count: Number of values per channel that contributed, :math:`m` (over all processes).
        skipped: Number of forward calls left out because their statistics were not finite.
        mean: float64 array of shape ``(C,)``, the value written to ``running_mean``.
        var_unbiased: float64 array of shape ``(C,)``, the value written to ``running_var``.
    """

    batches: int
    count: int
    skipped: int
    mean: np.ndarray
    var_unbiased: np.ndarray


def _check_arguments(model, data, method, max_batches, nonfinite, forward, device, progress):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_WHERE}: expected a torch.nn.Module, got {type(model).__name__}.")
    if method not in _METHODS:
        raise ValueError(
            f"{_WHERE}: expected method='pooled', 'paper' or 'sequential', got {method!r}."
        )
    check_nonfinite_policy(_WHERE, nonfinite)
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
            raise TypeError(
                f"{_WHERE}: expected max_batches to be a positive int or None, got {max_batches!r}."
            )
        if max_batches < 1:
            raise ValueError(
                f"{_WHERE}: expected max_batches to be a positive int or None, got {max_batches!r}."
            )
    if forward is not None and not callable(forward):
        raise TypeError(
            f"{_WHERE}: expected forward to be a callable(model, batch) or None, got "
            f"{type(forward).__name__}."
        )
    if not isinstance(progress, bool):
        raise TypeError(f"{_WHERE}: expected progress to be a bool, got {progress!r}.")
    if isinstance(data, torch.Tensor):
        # Iterating a tensor yields its rows: one big tensor would silently become N batches
        # of single examples, which BatchNorm cannot normalise.
        raise TypeError(
            f"{_WHERE}: expected an iterable of batches, got a single Tensor of shape "
            f"{tuple(data.shape)}. Pass [tensor] for one batch, or a DataLoader."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{_WHERE}: expected an iterable of batches (a DataLoader, a list of tensors or of "
            f"(input, target) tuples), got {type(data).__name__}."
        )
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{_WHERE}: expected device to be a torch.device, got {device!r}."
        ) from err


def _find_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        batchnorm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        if not (batchnorm or activated_family(module) is not None):
            continue
        if module.running_mean is None or module.running_var is None:
            continue
        if torch.nn.parameter.is_lazy(module.running_mean):
            raise ValueError(
                f"{_WHERE}: expected initialized BatchNorm layers, got an uninitialized "
                f"{type(module).__name__} at {name or 'the root module'!r}. Run one forward pass "
                "first so that it knows its number of features."
            )
        layers.append((name, module))
    return layers


def _move(obj, device: torch.device):
    """``obj`` with every tensor inside (lists, tuples, namedtuples, mappings) moved to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        rebuild: Callable[..., Any] = type(obj)  # the mapping's own class, from a dict
        return rebuild({k: _move(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_move(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def _make_call(model, forward, device) -> Callable[[Any], None]:
    if forward is not None:
        # Without knowing which entries are inputs, move everything that is a tensor.
        if device is None:
            return lambda batch: forward(model, batch)
        return lambda batch: forward(model, _move(batch, device))

    def call(batch):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"{_WHERE}: expected each batch to be a Tensor or a tuple/list whose first item "
                f"is the input Tensor, got {type(batch).__name__}. Pass "
                "forward=lambda model, batch: model(...) to say how to run such a batch."
            )
        # Only the input moves: targets are never used and can stay where they are.
        model(batch if device is None else batch.to(device))

    return call


def _distributed_group(process_group):
    """``(group, world_size, rank)``: the group to reduce over, or ``(None, 1, 0)`` if none."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialized:
        if process_group is not None:
            raise RuntimeError(
                f"{_WHERE}: expected torch.distributed to be initialized when process_group is "
                "given, got an uninitialized default group. Call init_process_group() first."
            )
        return None, 1, 0
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    world_size = torch.distributed.get_world_size(group)
    if world_size <= 1:
        return None, 1, 0
    return group, world_size, torch.distributed.get_rank(group)


def _gather(group, world_size, device, failed, batches_drawn, accs) -> list[np.ndarray]:
    """All processes' packed states: one all_gather of one float64 vector per process.

    Counts travel as float64, exact up to 2**53. all_gather rather than all_reduce: every
    process then merges the same blocks in the same (rank) order, so all end with identical
    bits, and Chan's merge needs the per-process (count, mean, M2), not their sums.
    """
    parts = [np.array([float(failed), float(batches_drawn)])]
    parts += [acc.pack() for acc in accs]
    packet = torch.from_numpy(np.concatenate(parts)).to(device)
    gathered = [torch.empty_like(packet) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, packet, group=group)
    return [t.cpu().numpy() for t in gathered]


def recompute_statistics(
    model: torch.nn.Module,
    data: Iterable,
    *,
    method: str = "pooled",
    max_batches: int | None = None,
    nonfinite: str = "skip",
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    process_group: ProcessGroup | None = None,
    progress: bool = True,
) -> dict[str, LayerStatistics]:
    r"""Recompute the running statistics of every BatchNorm layer of ``model`` over ``data``.

    The weights stay fixed; one pass runs the model over the batches of ``data``, with each
    BatchNorm layer normalising every batch with that batch's own statistics, as in training
    (Ioffe & Szegedy 2015, Alg. 2, step 10). For every layer and channel, with :math:`B`
    batches and :math:`m_b` values per channel in batch :math:`b` (batch size times spatial
    size), :math:`m = \sum_b m_b`:

    ``method="pooled"`` (default): the mean and the unbiased variance of all :math:`m` values
    the layer saw, exactly as if the batches were concatenated,

    .. math::
        \mathrm{E}[x] = \frac{1}{m}\sum_{i=1}^{m} x_i, \qquad
        \mathrm{Var}[x] = \frac{1}{m - 1}\sum_{i=1}^{m} \left(x_i - \mathrm{E}[x]\right)^2 .

    The per-batch summaries (count, mean, M2) are merged with Chan et al.'s formula
    (:func:`batchnorm.stats.merge_moments`), which is stable and independent of the batch
    order up to rounding.

    ``method="paper"``: the paper's estimator, the average over batches of the batch means and
    of the batches' unbiased variances,

    .. math::
        \mathrm{E}[x] = \frac{1}{B}\sum_b \mu_b, \qquad
        \mathrm{Var}[x] = \frac{1}{B}\sum_b \frac{m_b}{m_b - 1}\,\sigma_b^2 ,

    which for equal batch sizes is Alg. 2's :math:`\frac{m}{m-1}\mathrm{E}_B[\sigma_B^2]`
    (:func:`batchnorm.reference.population_statistics` with ``method="paper"``).

    ``method="sequential"``: the statistics each layer's input has *in the inference
    network*. In the two methods above, as in training, every BatchNorm layer normalises each
    batch with that batch's own statistics, so a deeper layer sees inputs whose batch means and
    scales were just normalised away by the layers before it; at inference those layers use
    fixed statistics instead, and the deeper layer's input spreads more. Sequential makes one
    pass per layer, in the order the layers run: the first pass is ``"pooled"`` (exact for the
    first layer), and each further pass recomputes one layer, pooled, with every other
    BatchNorm layer in evaluation mode, the ones before it on their new statistics. It costs
    one pass over ``data`` per BatchNorm layer (use ``max_batches`` on deep networks) and needs
    ``data`` that can be iterated repeatedly.

    Which to use, measured (an earlier version of the lab's ``population`` experiment: a 3x100
    ReLU MLP on 4,000 MNIST-1D examples, 5 seeds): for the first layer pooled and sequential
    are identical; in the second and third layers pooled's variances came out 1.1 % and 2.1 %
    below sequential's and paper's within 0.6 % on average, and the final test losses ranked
    sequential, paper, running averages, pooled. In the current experiment
    (``docs/lab/full/summary.md``: 55,000 training examples, 20 epochs, batch sizes 16, 60 and
    256) the three estimators end within 0.01 nats of one another at every batch size, and
    sequential is within 0.001 nats of torch's running averages or better. So:
    ``"sequential"`` when the statistics should match what inference computes and a pass per
    layer is affordable; ``"paper"`` as the one-pass
    estimator (the same as ``torch.optim.swa_utils.update_bn`` on equal batches);
    ``"pooled"`` for the exact statistics of the training-mode network's inputs, which are
    independent of batch order and weight a small last batch by its size (paper weights every
    batch equally, and averages within-batch variances only, so it misses the spread between
    batch means when batches are not random samples, e.g. unshuffled data).

    Which layers: every :class:`torch.nn.modules.batchnorm._BatchNorm` that has running
    buffers: ``torch.nn.BatchNorm1d/2d/3d``, ``batchnorm.BatchNorm1d/2d/3d`` and subclasses,
    ``torch.nn.SyncBatchNorm`` and ``batchnorm.SyncBatchNorm`` (which run as plain,
    unsynchronised BatchNorm during the pass: torch's then works on CPU, and no per-batch
    collective can deadlock when processes hold different numbers of batches; the processes'
    statistics are reduced once at the end), and the activated layers of the family table
    (``batchnorm.BatchNormAct1d/2d/3d``: the statistics of their input, their activation
    applied to what they pass on).
    Layers built with ``track_running_stats=False`` have nothing to recompute and are ignored.

    Other modules keep the mode they are in. Call ``model.eval()`` first to collect the
    statistics with dropout off, which is what inference will see; ``model.train()`` gives
    what ``update_bn`` does. As in training, a deeper layer's inputs depend on the batch
    statistics of the layers before it, so they depend on how ``data`` is batched; "exact"
    means exact for the inputs the layer saw in this pass.

    Distributed: when ``torch.distributed`` is initialized and the group has more than one
    process, every process runs its own batches (its shard, possibly none), then the
    processes' summaries are combined in one ``all_gather`` for all layers together, merged in
    rank order, so that every process writes identical statistics: those of the union of all
    shards. Every process of the group must call this function. A process with no batch takes
    part normally; the empty-data error is raised (on every process) only if no process had a
    batch. If a process fails during its pass, it still takes part in the collective with a
    failure flag before raising its error, and the others raise a RuntimeError instead of
    waiting for the collective's timeout. Every process must hold the same model (the same
    BatchNorm layers in the same order). ``max_batches`` applies per process. Note that
    :class:`~torch.utils.data.DistributedSampler` pads the shards to equal length by repeating
    examples (unless ``drop_last=True``, which drops some instead), so the union it gives is
    not exactly the dataset; for exact statistics give each process a disjoint shard.

    Dtypes: the summaries are computed in float64 on the input's device, whatever the layer's
    dtype; the results are cast to the buffers' dtype when written.

    Mutation: only ``running_mean``, ``running_var`` (set to ``mean`` and ``var_unbiased``) and
    ``num_batches_tracked`` (set to the number of batches that contributed, so that continuing
    to train with ``momentum=None``, torch's cumulative average, weights the recomputed
    statistics as that many batches) of the layers that saw data, written together at the end.
    Parameters, ``momentum``, ``eps``, modes and ``track_running_stats`` are left as they were;
    the pass runs under :func:`torch.no_grad`. A layer called twice in one forward counts two
    batches. If anything fails (a bad batch, a non-finite batch with ``nonfinite="raise"``,
    another process's failure), nothing is changed: modes, flags and hooks are restored and no
    buffer is written.

    Non-finite batches: a batch whose mean or variance at some layer is NaN or infinite would
    poison that layer's statistics (torch keeps a NaN forever: pytorch#88474). With
    ``nonfinite="skip"`` it is left out at that layer (and only there), counted in
    :attr:`LayerStatistics.skipped`, and one :class:`~batchnorm.NonFiniteStatisticsWarning` at
    the end lists the layers and counts. With ``nonfinite="raise"`` a
    :class:`~batchnorm.NonFiniteStatisticsError` names the layer and the batch, and nothing is
    changed. A layer whose final statistics are finite in float64 but overflow its buffers'
    dtype (float32, float16) falls under the same policy: left unchanged with a warning, or an
    error. (The same policy and classes as the layers' own guard.)

    Args:
        model: The model; it may itself be a BatchNorm layer.
        data: An iterable of batches, read once: a DataLoader, a list of tensors, or of
            ``(input, target, ...)`` tuples/lists (only the first item is passed to ``model``).
            Other batches (dicts, ...) need ``forward``. A single tensor is refused: iterating
            it would yield single examples.
        method: ``"pooled"``, ``"paper"`` or ``"sequential"`` (see above).
        max_batches: Stop after this many batches (per process), or ``None`` for all of
            ``data``; no batch beyond it is drawn from ``data``.
        nonfinite: ``"skip"`` or ``"raise"`` (see above).
        forward: ``forward(model, batch)`` runs one batch, for batches that are not a tensor
            or a tuple/list; its return value is ignored.
        device: Move inputs there before the forward (with ``forward``, every tensor in the
            batch, through lists, tuples and mappings), like ``update_bn``'s ``device``.
            ``None`` leaves them where they are.
        process_group: The group to reduce over when distributed (default: the world).
        progress: Show a progress bar (tqdm; only on rank 0 when distributed).

    Returns:
        ``{layer name: LayerStatistics}`` (names as in ``model.named_modules()``, ``""`` for
        the root), one entry per layer whose buffers were rewritten, in module order.

    Raises:
        TypeError: ``model`` is not a Module, ``data`` is not an iterable of batches, a batch
            is neither a tensor nor a tuple/list and ``forward`` is not given, or an argument
            has the wrong type.
        ValueError: Unknown ``method`` or ``nonfinite``, ``max_batches < 1``, a bad ``device``,
            an uninitialized lazy BatchNorm layer, or ``data`` with no batch (on any process).
        NonFiniteStatisticsError: ``nonfinite="raise"`` and a batch had non-finite statistics,
            or a layer's statistics overflow its buffers' dtype.
        RuntimeError: ``process_group`` given without torch.distributed initialized, or
            another process failed during its pass.

    Warns:
        UserWarning: ``model`` has no BatchNorm layer with running statistics (``{}`` is
            returned, nothing changes), or some layer never ran during the pass (its
            statistics are kept).
        NonFiniteStatisticsWarning: batches were skipped as non-finite, or layers were left
            unchanged because their statistics overflow their buffers' dtype.

    Example:
        >>> import torch
        >>> from batchnorm.tools.population import recompute_statistics
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
        >>> gen = torch.Generator().manual_seed(0)
        >>> batches = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (7, 16, 3)]
        >>> stats = recompute_statistics(net.eval(), batches, progress=False)
        >>> stats["1"].batches, stats["1"].count, int(net[1].num_batches_tracked)
        (3, 26, 3)
        >>> features = net[0](torch.cat(batches))  # the BatchNorm layer's input, all 26 rows
        >>> torch.allclose(net[1].running_var, features.var(dim=0))  # unbiased variance
        True
        >>> net.training, net[1].training, net[1].track_running_stats  # modes restored
        (False, False, True)
    """
    device = _check_arguments(
        model, data, method, max_batches, nonfinite, forward, device, progress
    )
    layers = _find_layers(model)
    if not layers:
        warnings.warn(
            f"{_WHERE}: expected a model with BatchNorm layers that track running statistics, "
            f"got none in {type(model).__name__}; nothing was changed.",
            UserWarning,
            stacklevel=2,
        )
        return {}
    group, world_size, rank = _distributed_group(process_group)
    call = _make_call(model, forward, device)
    job = _Job(data, call, max_batches, nonfinite, group, world_size, progress and rank == 0)
    if method == "sequential":
        return _recompute_sequential(job, layers)
    return _recompute(job, layers, method)[0]


@dataclass(frozen=True)
class _Job:
    """What every pass of one call shares."""

    data: Iterable
    call: Callable[[Any], None]
    max_batches: int | None
    nonfinite: str
    group: Any
    world_size: int
    show_progress: bool


def _recompute(job: _Job, layers, method: str, label: str = ""):
    """One pass that recomputes ``layers`` (the others keep their mode); write and return.

    Returns:
        ``(results, first_call)``: ``{name: LayerStatistics}`` of the layers rewritten, and this
        process's ``{name: position of the layer's first call}``.
    """
    group, world_size, nonfinite = job.group, job.world_size, job.nonfinite
    accs = [Accumulator(name, module, method) for name, module in layers]
    state = PassState(nonfinite)
    collective_device = layers[0][1].running_mean.device

    try:
        run_pass(job.data, accs, state, job.call, job.max_batches, job.show_progress, label)
    except Exception:
        if group is not None:
            _join_as_failed(group, world_size, collective_device, accs)
        raise

    if group is not None:
        gathered = _gather(group, world_size, collective_device, False, state.batches_drawn, accs)
        failed = [r for r, block in enumerate(gathered) if block[0] != 0]
        if failed:
            raise RuntimeError(
                f"{_WHERE}: expected every process to finish its pass, got a failure on "
                f"rank(s) {failed}; see the error raised there. Nothing was changed here."
            )
        batches_drawn = int(sum(round(block[1]) for block in gathered))
        accs = _merge_gathered(gathered, accs, method)
    else:
        batches_drawn = state.batches_drawn

    if batches_drawn == 0:
        where = " on any process" if group is not None else ""
        raise ValueError(
            f"{_WHERE}: expected data with at least one batch{where}, got none; nothing was "
            "changed."
        )
    results = {acc.name: LayerStatistics(*acc.result()) for acc in accs if acc.batches > 0}
    updates, overflow = _prepare_writes(accs, results)
    if overflow and nonfinite == "raise":
        raise NonFiniteStatisticsError(
            f"{_WHERE}: expected statistics that fit the running buffers' dtype, got values "
            f"that overflow it at layer(s) {overflow!r}; no running statistics were changed."
        )
    for name in overflow:
        del results[name]
    _write(updates)
    _warn_about(accs, overflow, stacklevel=4)
    logger.debug(
        "recompute_statistics: %d batches, %d layers rewritten, method=%s, world_size=%d",
        batches_drawn,
        len(results),
        method,
        world_size,
    )
    return results, state.first_call


def _recompute_sequential(job: _Job, layers) -> dict[str, LayerStatistics]:
    """``method="sequential"``: one pass per layer, in the order the layers run.

    Pass 1 recomputes every layer as ``"pooled"`` does (exact for the first layer to run, whose
    input no other BatchNorm shapes) and finds the order the layers run in. Then each further
    layer is recomputed alone, with every other BatchNorm layer in evaluation mode: the ones
    before it normalise with their new statistics, as at inference. If any pass fails, every
    layer's buffers and modes are put back as they were.
    """
    if isinstance(job.data, Iterator):
        raise TypeError(
            f"{_WHERE}: expected data that can be iterated more than once (a list or a "
            f"DataLoader) for method='sequential', which makes one pass per BatchNorm layer, "
            f"got a one-shot iterator ({type(job.data).__name__})."
        )
    modules = [module for _, module in layers]
    saved = [
        (
            module,
            module.training,
            [t.detach().clone() for t in _statistics_buffers(module)],
        )
        for module in modules
    ]
    try:
        results, first_call = _recompute(job, layers, "pooled", label=f"(1/{len(layers)})")
        order = _call_order(job, layers, first_call)
        for module in modules:
            module.training = False
        for position, (name, module) in enumerate(order[1:], start=2):
            passed, _ = _recompute(
                job, [(name, module)], "pooled", label=f"({position}/{len(layers)} {name})"
            )
            results.update(passed)
    except BaseException:
        with torch.no_grad():
            for module, _, values in saved:
                for buffer, value in zip(_statistics_buffers(module), values, strict=True):
                    buffer.copy_(value)
        raise
    finally:
        for module, training, _ in saved:
            module.training = training
    return {name: results[name] for name, _ in layers if name in results}


def _statistics_buffers(module) -> list[torch.Tensor]:
    buffers = [module.running_mean, module.running_var]
    if module.num_batches_tracked is not None:
        buffers.append(module.num_batches_tracked)
    return buffers


def _call_order(job: _Job, layers, first_call: dict[str, int]):
    """``layers`` that ran, in the order of their first call (over all processes, if any).

    Every process must loop over the same layers in the same order, also one that had no
    batch: the positions are gathered and the earliest one counts.
    """
    never = float(len(layers))
    positions = np.array([first_call.get(name, never) for name, _ in layers], dtype=np.float64)
    if job.group is not None:
        local = torch.from_numpy(positions).to(layers[0][1].running_mean.device)
        gathered = [torch.empty_like(local) for _ in range(job.world_size)]
        torch.distributed.all_gather(gathered, local, group=job.group)
        positions = np.min([t.cpu().numpy() for t in gathered], axis=0)
    ran = [i for i in np.argsort(positions, kind="stable") if positions[i] < never]
    return [layers[i] for i in ran]


def _merge_gathered(gathered, accs, method) -> list[Accumulator]:
    """Fresh accumulators holding the merge of every process's blocks, in rank order."""
    merged = [Accumulator(acc.name, acc.module, method) for acc in accs]
    for block in gathered:
        offset = _HEADER
        for acc in merged:
            size = LAYER_HEAD + 2 * acc.num_features
            acc.absorb(block[offset : offset + size])
            offset += size
    return merged


def _join_as_failed(group, world_size, device, accs) -> None:
    """Take part in the collective with a failure flag, so the others do not wait for it."""
    try:
        _gather(group, world_size, device, True, 0, accs)
    except Exception:  # the original error matters more than a failed courtesy collective
        logger.exception("recompute_statistics: could not tell the other processes of a failure")


def _prepare_writes(accs, results):
    """The new buffer values, cast to the buffers' dtype and device, and the layers they overflow.

    A float64 statistic can exceed the largest float32 (or float16) value; written, it would be
    Inf forever, so such a layer falls under the non-finite policy like a non-finite batch.
    """
    updates = []
    overflow = []
    for acc in accs:
        if acc.name not in results:
            continue
        stats = results[acc.name]
        module = acc.module
        mean = torch.as_tensor(stats.mean).to(module.running_mean)
        var = torch.as_tensor(stats.var_unbiased).to(module.running_var)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            overflow.append(acc.name)
            continue
        # The statistics as a summary the update takes: M2 = (m - 1) * unbiased variance.
        moments = Moments(stats.count, stats.mean, stats.var_unbiased * (stats.count - 1))
        updates.append((module, moments, stats.batches))
    return updates, overflow


def _write(updates) -> None:
    """Set each layer's statistics: the one running update, with the new batch weighing 1."""
    for module, moments, batches in updates:
        update_running(
            module.running_mean, module.running_var, moments, 1.0, nonfinite="raise", where=_WHERE
        )
        if module.num_batches_tracked is not None:
            with torch.no_grad():
                module.num_batches_tracked.fill_(batches)


def _warn_about(accs, overflow, stacklevel) -> None:
    if overflow:
        warnings.warn(
            NonFiniteStatisticsWarning(
                f"{_WHERE}: the statistics of layer(s) {overflow!r} overflow their running "
                "buffers' dtype; those layers were left unchanged. Pass nonfinite='raise' to "
                "stop instead."
            ),
            stacklevel=stacklevel,
        )
    skipped = [acc for acc in accs if acc.skipped]
    if skipped:
        listing = ", ".join(
            f"{acc.name!r}: {acc.skipped} of {acc.skipped + acc.batches}" for acc in skipped
        )
        unchanged = [acc.name for acc in skipped if acc.batches == 0]
        note = f"; layers left unchanged (no finite batch): {unchanged!r}" if unchanged else ""
        warnings.warn(
            NonFiniteStatisticsWarning(
                f"{_WHERE}: batches with NaN or infinite statistics were left out, by layer "
                f"{listing}{note}. Pass nonfinite='raise' to stop at the first one instead."
            ),
            stacklevel=stacklevel,
        )
    unused = [acc.name for acc in accs if acc.batches == 0 and acc.skipped == 0]
    if unused:
        warnings.warn(
            f"{_WHERE}: expected every BatchNorm layer to run during the pass, got no batch at "
            f"{unused!r}; their running statistics were left unchanged.",
            UserWarning,
            stacklevel=stacklevel,
        )
