r"""Running statistics over accumulated micro-batches: one update per optimizer step.

With gradient accumulation a step of batch :math:`B` is run as :math:`k` micro-batches of
:math:`B/k`. Each micro-batch is normalized by its own statistics (that is what the forward
computes and what the gradients are of), but a BatchNorm layer also folds each one into its
running statistics: :math:`k` momentum updates from :math:`k` small, noisy batches, and
``num_batches_tracked`` advanced :math:`k` times. :func:`accumulate_statistics` replaces those
with the one update the step's whole batch would have made: the micro-batches' summaries
(count, mean, M2) merge exactly (Chan et al.; :func:`batchnorm.stats.merge_moments`) into the
summary of their union, and that is folded in once when the block ends.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..families import is_batchnorm_like
from ..functional import batch_moments, update_running
from ..stats import Moments, merge_moments
from ._activated import activated_family

__all__ = ["accumulate_statistics"]

_WHERE = "accumulate_statistics()"


@contextlib.contextmanager
def accumulate_statistics(model: torch.nn.Module) -> Iterator[None]:
    r"""One running update per BatchNorm layer of ``model`` for all micro-batches of the block.

    Inside the block the layers compute as usual: each micro-batch is normalized by its own
    statistics, and gradients are those of that computation. What changes is the running
    statistics: when the block exits normally, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` of each layer that ran in training mode are set back to their values
    at entry and receive *one* update, from the merged statistics of every micro-batch the layer
    counted during the block. That is the update one forward of the concatenated micro-batches
    would make (unbiased variance of the union, :math:`m = \sum_i m_i`), and the counter
    advances by one. With ``momentum=None`` the update is the cumulative average, weight
    ``1 / (num_batches_tracked + 1)``, as the layer itself would apply it.

    Which layers: every BatchNorm of ``model`` (this package's and torch.nn's,
    ``batchnorm.families.is_batchnorm_like``, instance norms excluded) present at entry that
    tracks running statistics. A layer's call is counted when it ran in training mode and
    advanced its ``num_batches_tracked`` (so a micro-batch that a layer left out of its running
    statistics, a non-finite one or one-value-per-channel one under
    ``single_value="use_running"``, is left out here too). A ``mask=`` keyword (or second
    positional argument) of this package's layers is respected: padding is not counted. Layers
    that run only in evaluation mode, or not at all, are left alone. Lazy layers not yet
    initialized at entry are saved at their first call.

    If the block exits by an exception, every layer's ``running_mean``, ``running_var``,
    ``num_batches_tracked`` and ``nonfinite_batches_skipped`` are as they were at entry (for a
    lazy layer, as after its initialization).

    Cost: one extra statistics pass over each micro-batch's input per layer
    (:func:`batchnorm.functional.batch_moments`, the Numba moments kernel on CPU
    float32/float64), run by a forward hook after the layer's own forward (for the activated
    layers of the family table, ``batchnorm.BatchNormAct*d``, by the pre-hook before it, since
    such a layer may overwrite its input), and one small update per layer at exit. The update
    is this package's (:func:`batchnorm.functional.update_running`: float64, rounded once; a
    non-finite result is left out under the layer's ``nonfinite`` policy, ``"skip"`` for
    torch.nn's layers), also for torch.nn's layers.

    SyncBatchNorm: its forward normalizes (and updates) with the statistics of all processes,
    but the statistics pooled here are this process's own micro-batches; no collective is made,
    so the processes' running statistics differ after the block, as they do for plain
    BatchNorm under DDP. Synchronize them yourself (DDP's ``broadcast_buffers`` does at its next
    forward) or use :func:`batchnorm.recompute_statistics` for exact ones.

    Not supported: ``torch.func`` transforms inside the block (the hook's statistics are NumPy;
    it raises ``NotImplementedError``), and layers added to ``model`` inside the block (they are
    not watched).

    Args:
        model: Any module; its BatchNorm layers (the root included) are watched.

    Yields:
        Nothing; use it as ``with accumulate_statistics(model):``.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Example:
        >>> import torch, batchnorm
        >>> layer = batchnorm.BatchNorm1d(2)
        >>> x = torch.arange(16.0).reshape(8, 2)
        >>> with batchnorm.accumulate_statistics(layer):
        ...     for part in x.chunk(4):
        ...         _ = layer(part)
        >>> layer.num_batches_tracked.item()
        1
        >>> whole = batchnorm.BatchNorm1d(2)
        >>> _ = whole(x)
        >>> torch.allclose(layer.running_var, whole.running_var)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_WHERE}: expected a torch.nn.Module, got {type(model).__name__}.")
    watches = [
        _Watch(name, module)
        for name, module in model.named_modules()
        if is_batchnorm_like(module) and module.track_running_stats
    ]
    if not watches:
        warnings.warn(
            f"{_WHERE}: expected a model with BatchNorm layers that track running statistics, "
            f"got none in {type(model).__name__}; nothing will be accumulated.",
            UserWarning,
            stacklevel=3,
        )
    handles = []
    try:
        for watch in watches:
            watch.save()
            handles.append(watch.module.register_forward_pre_hook(watch.before, with_kwargs=True))
            handles.append(watch.module.register_forward_hook(watch.after, with_kwargs=True))
        yield
    except BaseException:
        for watch in watches:
            watch.restore(skipped_too=True)
        raise
    else:
        # Every layer set back first, then one update each: a layer whose update raises
        # (nonfinite="raise") is left as at entry.
        counted = [watch for watch in watches if watch.calls]
        for watch in counted:
            watch.restore(skipped_too=False)
        for watch in counted:
            watch.update()
    finally:
        for handle in handles:
            handle.remove()


@dataclass(eq=False)
class _Watch:
    """One layer's saved state and the statistics of its counted calls inside the block."""

    name: str
    module: _BatchNorm
    saved: tuple | None = None
    moments: Moments | None = None
    calls: int = 0
    counter_before: list = field(default_factory=list)
    # Per call in progress: the input's statistics taken before the forward (activated layers
    # only, which may overwrite their input), or None.
    taken_before: list = field(default_factory=list)

    def save(self) -> None:
        """Copy the running buffers, the counter and the skip count (once, when initialized)."""
        module = self.module
        if self.saved is not None or _is_lazy(module):
            return
        buffers = tuple(
            None if t is None else t.detach().clone()
            for t in (module.running_mean, module.running_var, module.num_batches_tracked)
        )
        self.saved = (buffers, module.__dict__.get("nonfinite_batches_skipped"))

    def restore(self, skipped_too: bool) -> None:
        """Put back what :meth:`save` copied (nothing if the layer was never initialized)."""
        if self.saved is None:
            return
        buffers, skipped = self.saved
        module = self.module
        with torch.no_grad():
            for t, value in zip(
                (module.running_mean, module.running_var, module.num_batches_tracked),
                buffers,
                strict=True,
            ):
                if t is not None and value is not None:
                    t.copy_(value)
        if skipped_too:
            if skipped is None:
                module.__dict__.pop("nonfinite_batches_skipped", None)
            else:
                module.__dict__["nonfinite_batches_skipped"] = skipped

    def before(self, module, args, kwargs) -> None:
        """Forward pre-hook: save a lazy layer now initialized; note the counter's value."""
        self.save()
        counter = module.num_batches_tracked
        self.counter_before.append(None if counter is None else int(counter))
        moments = None
        if module.training and activated_family(module) is not None:
            # An activated layer of the family table may compute in place (InPlaceABN): by
            # the forward hook its input may hold its output. A malformed input is left to the
            # layer's forward, which refuses it with its own message.
            try:
                moments = batch_moments(*_input_and_mask(args, kwargs), where=self.where)
            except (KeyError, TypeError, ValueError, RuntimeError):
                moments = None
        self.taken_before.append(moments)

    def after(self, module, args, kwargs, output) -> None:
        """Forward hook: if the call counted, merge its input's statistics into the block's."""
        before = self.counter_before.pop()
        moments = self.taken_before.pop()
        counter = module.num_batches_tracked
        if not module.training or (counter is not None and int(counter) == before):
            return
        if moments is None:
            moments = batch_moments(*_input_and_mask(args, kwargs), where=self.where)
        self.moments = moments if self.moments is None else merge_moments(self.moments, moments)
        self.calls += 1

    def update(self) -> None:
        """The block's one running update, from the merged statistics."""
        module = self.module
        running_mean, running_var, moments = module.running_mean, module.running_var, self.moments
        # Called only for a block that counted calls of a layer with running statistics.
        assert running_mean is not None and running_var is not None and moments is not None
        update_running(
            running_mean,
            running_var,
            moments,
            module.momentum,
            num_batches_tracked=module.num_batches_tracked,
            nonfinite=getattr(module, "nonfinite", "skip"),
            where=self.where,
            on_skip=functools.partial(_count_skipped, module),
        )

    def where(self) -> str:
        return f"{_WHERE} at {self.name or 'the model itself'!r}"


def _input_and_mask(args: tuple, kwargs: dict) -> tuple:
    """A layer call's ``(input, mask)``: positional or keyword, ``mask`` ``None`` if absent."""
    input = args[0] if args else kwargs["input"]
    return input, kwargs.get("mask", args[1] if len(args) > 1 else None)


def _is_lazy(module: torch.nn.Module) -> bool:
    return isinstance(module.running_mean, torch.nn.parameter.UninitializedBuffer)


def _count_skipped(module: torch.nn.Module) -> None:
    # Only this package's layers keep the count; torch.nn's get the warning alone.
    skipped = getattr(module, "nonfinite_batches_skipped", None)
    if skipped is not None:
        module.nonfinite_batches_skipped = skipped + 1
