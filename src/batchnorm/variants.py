r"""Batch norm for small or correlated batches: ghost batches and batch renormalization.

Both are BatchNorm layers in evaluation mode (the running statistics, Ioffe & Szegedy 2015,
Alg. 2) and differ only in training:

* :class:`GhostBatchNorm1d`/``2d``/``3d`` (Hoffer, Hubara & Soudry 2017, Sec. 4) normalize each
  chunk of ``virtual_batch_size`` consecutive examples with the chunk's own statistics, which
  keeps the noise of a small batch while a large one is processed.
* :class:`BatchRenorm1d`/``2d``/``3d`` (Ioffe 2017) correct the batch statistics towards the
  running ones by per-channel factors that the backward pass treats as constants, so that
  training and evaluation compute the same function when the two agree.

Each class subclasses its torch.nn namesake's twin in this package (``GhostBatchNorm2d`` is a
``torch.nn.BatchNorm2d``) and adds no parameter or buffer: ``state_dict`` keys, ``_version``
and buffers are BatchNorm's, so checkpoints move to and from ``torch.nn.BatchNorm*d``
(``strict=True``). The layers are variants of the BatchNorm families
(:func:`batchnorm.families.add_variant`): :func:`batchnorm.fold`, :func:`batchnorm.freeze` and
:func:`batchnorm.recompute_statistics` treat them as BatchNorm (their evaluation transform is
BatchNorm's), and :func:`batchnorm.convert` with ``to="torch"`` turns them into
``torch.nn.BatchNorm*d`` with a warning (training then normalizes with whole-batch statistics).

Composition, not copies: statistics come from :func:`batchnorm.functional.batch_moments` or
torch ops in float64, merge with :func:`batchnorm.stats.merge_all`, and every running update is
:func:`batchnorm.functional.update_running`.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import numpy.typing as npt
import torch

from . import _stages
from ._autograd import GhostTrainFn, apply, records_graph
from ._validate import (
    check_batch_norm_args,
    check_layer_input,
    check_mask,
    check_nonfinite_policy,
    layer_name,
)
from .families import add_variant
from .functional import batch_moments, forward_layer, normalize_batch, update_running
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .routing import choose
from .stats import Moments, merge_all

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "ghost_chunks",
]


def ghost_chunks(batch_size: int, virtual_batch_size: int) -> tuple[int, int]:
    """How a batch splits into ghost batches: ``(full chunks, size of the last chunk)``.

    The batch is cut into consecutive chunks of ``virtual_batch_size`` examples. A smaller
    remainder of two or more examples is a chunk of its own; a remainder of *one* example is
    merged into the chunk before it (which then has ``virtual_batch_size + 1`` examples), since
    one example's statistics may say nothing about its spread. A batch of at most
    ``virtual_batch_size + 1`` examples is therefore one chunk: plain BatchNorm.

    Args:
        batch_size: ``N``.
        virtual_batch_size: The chunk size.

    Returns:
        ``(full, last)``: ``full`` chunks of exactly ``virtual_batch_size`` examples, followed
        by one chunk of ``last`` examples (``last = 0``: none).

    Example:
        >>> ghost_chunks(10, 4), ghost_chunks(9, 4), ghost_chunks(8, 4), ghost_chunks(3, 4)
        ((2, 2), (1, 5), (2, 0), (0, 3))
    """
    full, last = divmod(batch_size, virtual_batch_size)
    if last == 1 and full > 0:
        full, last = full - 1, virtual_batch_size + 1
    return full, last


def _check_int(where: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: expected {name} to be an int >= {low}, got {value!r}.")
    if value < low:
        raise ValueError(f"{where}: expected {name} to be an int >= {low}, got {value!r}.")


def _check_limit(where: str, name: str, value, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected {name} to be a finite float >= {low}, got {value!r}.")
    if not (math.isfinite(value) and float(value) >= low):  # NaN and inf fail too
        raise ValueError(f"{where}: expected {name} to be a finite float >= {low}, got {value!r}.")


def _state_dtype(layer) -> torch.dtype | None:
    for t in (layer.weight, layer.running_mean):
        if t is not None:
            return t.dtype
    return None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # The output keeps the input's layout, as BatchNorm's does.
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _TrainingChecks(BatchNormBase):
    """The training call's checks, all before any state changes: ``(where, buffers, counter)``."""

    def _checked_training_call(self, input):
        where = functools.partial(layer_name, self)
        check_layer_input(where, self, input, _state_dtype(self))
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        counter = self.num_batches_tracked if track else None
        check_nonfinite_policy(where, self.nonfinite)
        check_batch_norm_args(
            where,
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            True,
            self.momentum,
            self.eps,
            counter,
        )
        return where, running_mean, running_var, counter

    def _update_running(self, where, running_mean, running_var, moments: Moments, counter) -> None:
        if running_mean is None:
            return

        def count_skip() -> None:
            self.nonfinite_batches_skipped += 1

        update_running(
            running_mean,
            running_var,
            moments,
            self.momentum,
            num_batches_tracked=counter,
            nonfinite=self.nonfinite,
            where=where,
            on_skip=count_skip,
        )


# --------------------------------------------------------------------------------------------
# Ghost batch normalization
# --------------------------------------------------------------------------------------------


class GhostBatchNormBase(_TrainingChecks, BatchNormBase):
    r"""Ghost Batch Normalization (Hoffer et al. 2017): BatchNorm per chunk of the batch.

    In training, the batch is cut along dim 0 into consecutive chunks ("ghost batches") of
    ``virtual_batch_size`` examples, and each chunk :math:`G` is normalized with its own
    per-channel mean and *biased* variance (divide by :math:`m_G`, the chunk's values per
    channel):

    .. math::
        y = \frac{x - \mu_G}{\sqrt{\sigma_G^2 + \epsilon}}\,\gamma + \beta, \qquad x \in G .

    Gradients flow through each chunk's statistics, so a chunk's output and gradients are
    exactly those of BatchNorm run on that chunk alone. Remainder rule (:func:`ghost_chunks`):
    a smaller last chunk of two or more examples is normalized on its own; a last chunk of a
    single example is merged into the chunk before it. With ``virtual_batch_size >= N - 1`` the
    layer is BatchNorm (the same call).

    Running statistics: exactly one update per training forward (and one increment of
    ``num_batches_tracked``), from the chunks' moments merged (:func:`batchnorm.stats.merge_all`),
    which are the moments of the whole batch. ``running_mean`` moves towards the whole batch's
    mean and ``running_var`` towards the whole batch's *unbiased* variance (factor
    :math:`m/(m-1)` with :math:`m` = N times the spatial size), with torch's ``momentum``
    (the weight of the new batch; ``None``: cumulative average). That is what BatchNorm's
    update would do with the same batch: the running statistics estimate the population the
    evaluation transform uses, not the chunks' noisier statistics.

    Evaluation mode, and training with no running statistics to update being irrelevant, is
    BatchNorm's: running statistics in evaluation, or the whole batch's statistics when the
    layer has none (``track_running_stats=False``).

    Masks: ``forward(input, mask=...)`` takes BatchNorm's mask of real values
    (:meth:`batchnorm.BatchNorm2d.forward`: ``True`` = real; padding is left out of the
    statistics and of the running update, its output and gradient are 0; an all-``True`` mask
    is the unmasked call). Each chunk is normalized with the statistics of its own real
    positions; a chunk with fewer than 2 real values per channel has no spread of its own and
    is normalized with the statistics of the whole batch's real values (gradients flow through
    those). The one running update uses all real values. Fewer than 2 real values in the whole
    batch, a batch of one chunk, and evaluation mode are BatchNorm's masked call. The masked
    call runs in torch ops (float64 on the CPU).

    Dtypes and cost: a contiguous float32/float64 CPU input runs on dedicated kernels
    (:mod:`batchnorm.kernels.grouped`), one call forward and one backward, without copying the
    input: each chunk is one contiguous block, and each (chunk, channel) pair is normalized from
    cache right after its float64 statistics are taken (rounded once to the input's dtype).
    Channels-last input is copied to a contiguous one first (and its gradient back); inputs the
    kernels do not take (another device or dtype, a process made by fork) run BatchNorm on each
    chunk in turn. Merged statistics and the running update are float64.

    Args:
        num_features: :math:`C`.
        virtual_batch_size: Examples per ghost batch, an int >= 1.
        eps, momentum, affine, track_running_stats, device, dtype, bias, nonfinite: As for
            :class:`batchnorm.BatchNorm2d`.

    Raises:
        TypeError: ``virtual_batch_size`` (or ``num_features``) not an int.
        ValueError: ``virtual_batch_size < 1``, or any argument BatchNorm refuses.
    """

    virtual_batch_size: int

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
        single_value: str = "raise",
    ) -> None:
        _check_int(f"{type(self).__name__}()", "virtual_batch_size", virtual_batch_size, 1)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            nonfinite=nonfinite,
            single_value=single_value,
        )
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def variant_arguments(self) -> dict:
        """The constructor arguments BatchNorm does not have (for :func:`batchnorm.unfreeze`)."""
        return {"virtual_batch_size": self.virtual_batch_size}

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return _ghost_forward_masked(self, input, mask)
        if not self.training or not isinstance(input, torch.Tensor):
            return forward_layer(self, input)
        if input.dim() >= 2 and (
            input.shape[0] <= self.virtual_batch_size + 1 or input.numel() == 0
        ):
            # One chunk: BatchNorm itself, with its checks and its single_value policy.
            return BatchNormBase.forward(self, input)
        where, running_mean, running_var, counter = self._checked_training_call(input)
        full, last = ghost_chunks(input.shape[0], self.virtual_batch_size)
        _refuse_chunks_of_one_value(where, self.virtual_batch_size, input)
        weight, bias, eps, size = self.weight, self.bias, self.eps, self.virtual_batch_size
        if choose(input, "stage") == "parallel":
            # The grouped kernels take a contiguous input: channels-last data is copied there
            # (autograd copies the gradient back), and the output returns to its layout.
            groups = full + (1 if last else 0)
            output, merged = _ghost_grouped(input.contiguous(), size, groups, weight, bias, eps)
            output = output.contiguous(memory_format=_memory_format(input))
        else:
            # torch's route (another device or dtype, a forked process): BatchNorm per chunk.
            sizes = [size] * full + ([last] if last else [])
            parts = input.split(sizes)
            pieces = [normalize_batch(x, weight, bias, eps, where=where) for x in parts]
            output = torch.cat([y for y, _ in pieces])
            merged = merge_all(moments for _, moments in pieces)
        if running_mean is not None:
            self._update_running(where, running_mean, running_var, merged, counter)
        return output


def _refuse_chunks_of_one_value(where, size: int, input: torch.Tensor) -> None:
    # Every chunk has `size` examples or more (the last one: 2 or more), so only chunks of one
    # example with no spatial extent have one value per channel.
    if size == 1 and input[0].numel() == input.shape[1]:
        raise ValueError(
            f"{where()}: expected more than 1 value per channel in each ghost batch when "
            f"training, got virtual_batch_size={size} for input of shape "
            f"{tuple(input.shape)}; use virtual_batch_size >= 2."
        )


def _ghost_grouped(x, size, groups, weight, bias, eps):
    """Ghost batch norm of a contiguous ``x`` on the grouped kernels: one call, no copy of ``x``.

    Returns the output and the whole batch's :class:`Moments` (the chunks' merged).
    """
    if records_graph(x, weight, bias):
        y, (_, _, mean, m2) = apply(GhostTrainFn, x, weight, bias, size, groups, eps)
    else:
        y, _, _, mean, m2 = _stages.ghost_train_forward(x, size, groups, weight, bias, eps)
    return y, Moments(x.numel() // x.shape[1], mean, m2)


def _ghost_forward_masked(layer, input, mask):
    """:meth:`GhostBatchNormBase.forward` with a mask of real values (torch ops, float64 on the
    CPU): every check first; one chunk, evaluation or fewer than 2 real values in the whole
    batch are BatchNorm's masked call, an all-True mask the unmasked call."""
    if not (layer.training and isinstance(input, torch.Tensor)):
        return BatchNormBase.forward(layer, input, mask)
    where, running_mean, running_var, counter = layer._checked_training_call(input)
    check_mask(where, input, mask)
    size = layer.virtual_batch_size
    if input.shape[0] <= size + 1 or input.numel() == 0:
        return BatchNormBase.forward(layer, input, mask)  # one chunk: BatchNorm itself
    _refuse_chunks_of_one_value(where, size, input)
    if bool(mask.all()):
        return layer.forward(input)  # nothing is padding: the unmasked call (grouped kernels)
    excluded = ~mask
    # Padding replaced by zeros, so that its values (NaN, Inf) never reach the arithmetic.
    clean = input.masked_fill(excluded.unsqueeze(1), 0)
    count, mean, m2 = _stages.masked_moments(clean, excluded)
    if count < 2:
        # Too few real values for any statistics: BatchNorm's rule for that (its single_value
        # policy: raise, or normalize with the running statistics) applies to the whole batch.
        return BatchNormBase.forward(layer, input, mask)
    full, last = ghost_chunks(input.shape[0], size)
    sizes = [size] * full + ([last] if last else [])
    per_chunk = mask.reshape(mask.shape[0], -1).sum(dim=1).split(sizes)
    shape = _stages.broadcast_shape(input)
    batch_invstd = torch.rsqrt(m2 / count + layer.eps)
    pieces = []
    for x_chunk, out_chunk, real in zip(
        clean.split(sizes), excluded.split(sizes), per_chunk, strict=True
    ):
        real = int(real.sum())
        if real >= 2:
            _, chunk_mean, chunk_m2 = _stages.masked_moments(x_chunk, out_chunk)
            chunk_invstd = torch.rsqrt(chunk_m2 / real + layer.eps)
        else:
            # A chunk with fewer than 2 real values has no spread of its own: it is normalized
            # with the statistics of the whole batch's real values.
            chunk_mean, chunk_invstd = mean, batch_invstd
        pieces.append(
            (x_chunk.to(mean.dtype) - chunk_mean.reshape(shape)) * chunk_invstd.reshape(shape)
        )
    output = torch.cat(pieces)
    if layer.weight is not None:
        output = output * layer.weight.to(mean.dtype).reshape(shape)
    if layer.bias is not None:
        output = output + layer.bias.to(mean.dtype).reshape(shape)
    output = output.to(input.dtype).masked_fill(excluded.unsqueeze(1), 0)
    output = output.contiguous(memory_format=_memory_format(input))
    if running_mean is not None:
        stats = torch.stack([mean.detach(), m2.detach()]).double().cpu().numpy()
        merged = Moments(count, stats[0].copy(), stats[1].copy())
        layer._update_running(where, running_mean, running_var, merged, counter)
    return output


# --------------------------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------------------------


class BatchRenormBase(_TrainingChecks, BatchNormBase):
    r"""Batch Renormalization (Ioffe 2017): batch statistics corrected towards the running ones.

    In training, with :math:`\mu_B` and the *biased* :math:`\sigma_B^2` of the batch (per
    channel, over :math:`m` = N times the spatial size values) and :math:`\mu`,
    :math:`\sigma^2` = ``running_mean``, ``running_var``:

    .. math::
        y = \gamma\left(\frac{x - \mu_B}{\sigma_B}\,r + d\right) + \beta, \quad
        r = \mathrm{clip}_{[1/r_{max},\,r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
        d = \mathrm{clip}_{[-d_{max},\,d_{max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

    with :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}` and :math:`\sigma =
    \sqrt{\sigma^2 + \epsilon}`. :math:`r` and :math:`d` are constants in the backward pass
    (Ioffe 2017, Alg. 1: ``stop_gradient``); gradients flow through :math:`\mu_B` and
    :math:`\sigma_B` as in BatchNorm. With :math:`r = 1, d = 0` this is BatchNorm exactly.

    Warm-up: the limits grow linearly from :math:`(1, 0)` (BatchNorm) to ``(rmax, dmax)`` over
    ``warmup`` training steps, counted by ``num_batches_tracked`` before the step
    (:math:`k`):

    .. math::
        t = \mathrm{clip}_{[0, 1]}(k / \mathrm{warmup}), \quad
        r_{max}(k) = 1 + (\mathrm{rmax} - 1)\,t, \quad d_{max}(k) = \mathrm{dmax}\,t

    (``warmup=0``: :math:`t = 1` from the first step). The clip means the configured limits
    are never exceeded, however long training runs.

    Running statistics: BatchNorm's update (:func:`batchnorm.functional.update_running`), once
    per training forward: ``running_var`` moves towards the batch's *unbiased* variance
    (factor :math:`m/(m-1)`), with torch's ``momentum`` (default 0.01 here, as the paper's
    slower averages; ``None``: cumulative average). Without running statistics
    (``track_running_stats=False``) :math:`r = 1, d = 0`: the layer is BatchNorm. Evaluation
    mode is BatchNorm's.

    Masks, ``forward(input, mask)``: as BatchNorm's (:meth:`batchnorm.BatchNorm2d.forward`,
    ``True`` = real value, checked before any state changes). Padding is left out of
    :math:`\mu_B`, :math:`\sigma_B^2` (hence of :math:`r`, :math:`d`) and of the running update;
    its output and gradient are zero, NaN there is harmless; an all-``True`` mask is the unmasked
    call. Fewer than 2 (real) values per channel in training: BatchNorm's ``single_value`` policy
    (``"raise"``: ``ValueError``; ``"use_running"``: the running statistics normalize, no
    :math:`r`, :math:`d`, and neither they nor ``num_batches_tracked`` change).

    Dtypes: statistics, :math:`r` and :math:`d` in float64; the normalization is the package's
    BatchNorm kernel with scale :math:`\gamma r` and shift :math:`\gamma d + \beta` rounded to
    the parameters' dtype.

    Args:
        num_features: :math:`C`.
        eps: As for BatchNorm.
        momentum: Weight of the new batch in the running averages, or ``None``.
        affine: Learn :math:`\gamma` and :math:`\beta`.
        rmax: Upper limit of :math:`r`, a finite float >= 1.
        dmax: Limit of :math:`|d|`, a finite float >= 0.
        warmup: Training steps over which the limits ramp up, an int >= 0.
        track_running_stats, device, dtype, bias, nonfinite: As for BatchNorm.
        single_value: Keyword-only, ``"raise"`` or ``"use_running"``: as for BatchNorm.

    Raises:
        TypeError: ``rmax``/``dmax`` not numbers, ``warmup`` not an int.
        ValueError: ``rmax < 1``, ``dmax < 0``, ``warmup < 0``, a non-finite limit, or any
            argument BatchNorm refuses.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup: int = 5000,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
        single_value: str = "raise",
    ) -> None:
        where = f"{type(self).__name__}()"
        _check_limit(where, "rmax", rmax, 1.0)
        _check_limit(where, "dmax", dmax, 0.0)
        _check_int(where, "warmup", warmup, 0)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            nonfinite=nonfinite,
            single_value=single_value,
        )
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup = int(warmup)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup={self.warmup}"

    def variant_arguments(self) -> dict:
        """The constructor arguments BatchNorm does not have (for :func:`batchnorm.unfreeze`)."""
        return {"rmax": self.rmax, "dmax": self.dmax, "warmup": self.warmup}

    def limits(self) -> tuple[float, float]:
        """The limits of this training step: ``(r_max(k), d_max(k))`` for the current counter.

        Example:
            >>> import batchnorm
            >>> layer = batchnorm.BatchRenorm1d(3, warmup=10)
            >>> layer.limits()
            (1.0, 0.0)
            >>> _ = layer.num_batches_tracked.fill_(5)
            >>> layer.limits()
            (2.0, 2.5)
        """
        counter = self.num_batches_tracked
        if self.warmup == 0 or counter is None:
            fraction = 1.0
        else:
            fraction = min(max(float(counter) / self.warmup, 0.0), 1.0)
        return 1.0 + (self.rmax - 1.0) * fraction, self.dmax * fraction

    def correction(self, mean: npt.ArrayLike, var: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """``(r, d)`` for a batch of mean ``mean`` and biased variance ``var`` at this step.

        Args:
            mean, var: ``(C,)`` float64 arrays, the batch's statistics.

        Returns:
            float64 arrays ``r`` in ``[1/r_max(k), r_max(k)]`` and ``d`` in
            ``[-d_max(k), d_max(k)]`` (NaN where a statistic is NaN); ones and zeros without
            running statistics. Nothing is mutated.
        """
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        if self.running_mean is None or self.running_var is None or not self.track_running_stats:
            return np.ones_like(mean), np.zeros_like(mean)
        r_limit, d_limit = self.limits()
        running_mean, running_var = (
            t.detach().to(device="cpu", dtype=torch.float64).numpy()
            for t in (self.running_mean, self.running_var)
        )
        sigma = np.sqrt(running_var + self.eps)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.clip(np.sqrt(var + self.eps) / sigma, 1.0 / r_limit, r_limit)
            d = np.clip((mean - running_mean) / sigma, -d_limit, d_limit)
        return r, d

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or not isinstance(input, torch.Tensor):
            return BatchNormBase.forward(self, input, mask)  # evaluation is BatchNorm's
        padding = None
        # At most one value per channel (or none): no sigma_B, hence no r.
        too_few = input.dim() >= 2 and input.numel() <= input.shape[1]
        if mask is not None:
            where = functools.partial(layer_name, self)
            check_layer_input(where, self, input, _state_dtype(self))
            check_mask(where, input, mask)
            count = int(mask.sum())  # real values per channel (the mask has no channel axis)
            mask, padding = (None, None) if count == mask.numel() else (mask, ~mask)
            too_few = count < 2
        if too_few:
            return BatchNormBase.forward(self, input, mask)  # BatchNorm's single_value rule
        where, running_mean, running_var, counter = self._checked_training_call(input)
        if running_mean is None:
            return BatchNormBase.forward(self, input, mask)  # r = 1, d = 0: BatchNorm
        # Padding zeroed first (as BatchNorm's masked call): NaN there would reach the weight's
        # gradient as 0 * NaN.
        x = input if padding is None else _zero_padding(input, padding)
        moments = batch_moments(x, mask, where=where)
        # The biased variance (more than one value per channel was checked).
        r, d = self.correction(moments.mean, moments.m2 / moments.count)
        weight: torch.Tensor | None = self.weight
        bias: torch.Tensor | None = self.bias
        if not (np.all(r == 1.0) and np.all(d == 0.0)):
            # gamma (x_hat r + d) + beta = x_hat (gamma r) + (gamma d + beta): BatchNorm with
            # another scale and shift, r and d constants (no graph through them).
            dtype = weight.dtype if weight is not None else running_mean.dtype
            r_t, d_t = (torch.from_numpy(a).to(input.device, dtype) for a in (r, d))
            shift = d_t if weight is None else d_t * weight
            weight = r_t if weight is None else r_t * weight
            bias = shift if bias is None else shift + bias
        output, _ = normalize_batch(x, weight, bias, self.eps, mask=mask, where=where)
        self._update_running(where, running_mean, running_var, moments, counter)
        return output if padding is None else _zero_padding(output, padding)


def _zero_padding(t: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    # As modules.py's: a copy in t's memory format (masked_fill broadcast over C loses it).
    return t.clone(memory_format=torch.preserve_format).masked_fill_(padding.unsqueeze(1), 0)


# --------------------------------------------------------------------------------------------
# The classes
# --------------------------------------------------------------------------------------------

# Each variant accepts what its BatchNorm class accepts: the ranks and shape text are theirs.
_RANKS = {
    "1d": (BatchNorm1d.input_ranks, BatchNorm1d.input_shape),
    "2d": (BatchNorm2d.input_ranks, BatchNorm2d.input_shape),
    "3d": (BatchNorm3d.input_ranks, BatchNorm3d.input_shape),
}


class GhostBatchNorm1d(GhostBatchNormBase, torch.nn.BatchNorm1d):
    __doc__ = (
        GhostBatchNormBase.__doc__ or ""
    ) + "\n    Shape: input ``(N, C)`` or ``(N, C, L)``.\n"
    input_ranks, input_shape = _RANKS["1d"]


class GhostBatchNorm2d(GhostBatchNormBase, torch.nn.BatchNorm2d):
    __doc__ = (
        GhostBatchNormBase.__doc__ or ""
    ) + "\n    Shape: input ``(N, C, H, W)``, contiguous or channels_last.\n"
    input_ranks, input_shape = _RANKS["2d"]


class GhostBatchNorm3d(GhostBatchNormBase, torch.nn.BatchNorm3d):
    __doc__ = (GhostBatchNormBase.__doc__ or "") + "\n    Shape: input ``(N, C, D, H, W)``.\n"
    input_ranks, input_shape = _RANKS["3d"]


class BatchRenorm1d(BatchRenormBase, torch.nn.BatchNorm1d):
    __doc__ = (BatchRenormBase.__doc__ or "") + "\n    Shape: input ``(N, C)`` or ``(N, C, L)``.\n"
    input_ranks, input_shape = _RANKS["1d"]


class BatchRenorm2d(BatchRenormBase, torch.nn.BatchNorm2d):
    __doc__ = (
        BatchRenormBase.__doc__ or ""
    ) + "\n    Shape: input ``(N, C, H, W)``, contiguous or channels_last.\n"
    input_ranks, input_shape = _RANKS["2d"]


class BatchRenorm3d(BatchRenormBase, torch.nn.BatchNorm3d):
    __doc__ = (BatchRenormBase.__doc__ or "") + "\n    Shape: input ``(N, C, D, H, W)``.\n"
    input_ranks, input_shape = _RANKS["3d"]


# Variants of the fixed-rank families (batchnorm.families): their evaluation transform, twins
# and state are BatchNorm's.
for _variant, _family in (
    (GhostBatchNorm1d, "BatchNorm1d"),
    (GhostBatchNorm2d, "BatchNorm2d"),
    (GhostBatchNorm3d, "BatchNorm3d"),
    (BatchRenorm1d, "BatchNorm1d"),
    (BatchRenorm2d, "BatchNorm2d"),
    (BatchRenorm3d, "BatchNorm3d"),
):
    add_variant(_family, _variant)
