r"""``SyncBatchNorm``: Batch Normalization over the global batch of a torch.distributed group.

Under data parallelism each process sees only its shard of the mini-batch, and plain
BatchNorm then normalizes with the shard's statistics. :class:`SyncBatchNorm` normalizes every
shard with the statistics of the *concatenated* batch of all processes of a group, on any
device torch.distributed works on: gloo on CPU (where ``torch.nn.SyncBatchNorm`` refuses to
run) as well as NCCL on CUDA. :func:`batchnorm.convert_sync_batchnorm` and
:func:`batchnorm.revert_sync_batchnorm` (in :mod:`batchnorm.tools.convert`) switch the
BatchNorm layers of a model between the two kinds in place. This module holds the layer and its
collectives; the statistics, normalization, backward stages and running update are
:mod:`batchnorm.functional`'s, the same the single-process layers run.

Forward (training), per channel, with rank :math:`r` holding :math:`n_r` values per channel:

1. each rank summarises its shard as :math:`(n_r, \bar{x}_r, M2_r)` (count, mean, sum of
   squared deviations) in float64;
2. one ``all_gather`` of one float64 vector per rank brings every summary to every rank;
3. every rank merges them in rank order with Chan, Golub & LeVeque's update
   (:func:`batchnorm.stats.merge_moments`)

   .. math::
       n = n_a + n_b, \quad \delta = \bar{x}_b - \bar{x}_a, \quad
       \bar{x} = \bar{x}_a + \delta\,\tfrac{n_b}{n}, \quad
       M2 = M2_a + M2_b + \delta^2\,\tfrac{n_a n_b}{n},

   which is exact for uneven shards, and an empty shard is its identity. Every rank then holds
   bit-identical global statistics :math:`m = \sum_r n_r`, :math:`\mu`,
   :math:`\sigma^2 = M2 / m` (biased), so every rank makes the same decisions from them;
4. each rank normalizes its shard, :math:`\hat{x} = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`,
   :math:`y = \gamma\hat{x} + \beta`, and updates the running statistics with :math:`\mu` and
   the unbiased :math:`\sigma^2 \cdot m/(m - 1)` of the global batch (torch's rule).

Backward: with :math:`\delta = \partial L / \partial y`, the gradient of single-process
BatchNorm over the concatenated batch is

.. math::
    dx_i = \gamma\sigma^{-1}\Big(\delta_i - \frac{S_1}{m}
           - \frac{(x_i - \mu)\,\sigma^{-2} S_2}{m}\Big), \qquad
    S_1 = \sum_{j} \delta_j, \quad S_2 = \sum_{j} \delta_j (x_j - \mu),

with both sums over *all* ranks' values. One ``all_reduce`` (sum) of the float64 vector
:math:`[S_1^{(r)}, S_2^{(r)}]` gives them; :math:`dx` of rank :math:`r`'s rows then follows
locally. ``weight`` and ``bias`` get the *local* sums :math:`\sigma^{-1} S_2^{(r)}` and
:math:`S_1^{(r)}`: their sum over ranks is single-process BatchNorm's gradient, and
:class:`~torch.nn.parallel.DistributedDataParallel` (which averages parameter gradients over
ranks, while each rank's loss is the mean over its own shard) turns them into exactly the
gradient of the mean loss over the global batch, as it does for every other parameter.

Why one collective each way: the per-rank summary is all the merge needs (``all_gather``
rather than ``all_reduce``, since Chan's merge needs each rank's count, mean and M2, not their
sums, and every rank merging the same blocks in the same order gives identical bits); the two
sums are all the backward needs. Before a layer's first synchronized forward, the ranks
additionally exchange ``num_features`` once (a two-number ``all_gather``): gloo aborts the
whole process, uncatchably, when the ranks' vectors differ in length, so the lengths are made
to agree before any vector whose length depends on ``num_features`` is sent.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._validate import (
    Where,
    caller_name,
    check_batch_norm_args,
    check_layer_input,
    check_nonfinite_policy,
    layer_name,
)
from .families import (
    Family,
    add_twin,
    families,
    family_of,
    is_batchnorm_like,
    known_family,
    register,
)
from .functional import (
    backward_input,
    backward_sums,
    batch_moments,
    forward_layer,
    normalize,
    update_running,
)
from .modules import BatchNormBase
from .stats import Moments, finalize, merge_all

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


__all__ = ["ORIGINAL_CLASS", "SyncBatchNorm", "forget_sync_state", "last_input_rank"]

logger = logging.getLogger(__name__)

# First number of every vector this module exchanges. A rank that receives a vector with
# another first number was in a different collective: the ranks called their layers in
# different orders. The values are arbitrary, exact in float64, and unlikely as statistics.
_HANDSHAKE = 918273.0
_STATISTICS = 918274.0
# Statistics vector: [_STATISTICS, num_features, status, count, mean (C), M2 (C)].
_HEAD = 4
_OK = 0.0
_REJECTED = 1.0  # this rank's input failed validation; it joined only to unblock the others


class SyncBatchNorm(BatchNormBase, torch.nn.modules.batchnorm._BatchNorm):
    r"""Batch Normalization with statistics over all processes of a torch.distributed group.

    In training mode, when ``torch.distributed`` is initialized and the group (``process_group``,
    or the default group) has more than one process, every process normalizes its input with
    the mean and *biased* variance of the concatenation of all processes' inputs, per channel
    (axis 1), over every other axis, and gets the gradients single-process BatchNorm would give
    on that concatenated batch (see the module :mod:`batchnorm.distributed` for the math and the
    collectives). Otherwise (evaluation mode, world size 1, torch.distributed not initialized)
    it is exactly :class:`batchnorm.BatchNorm2d` and its siblings, for inputs of any rank >= 2;
    evaluation mode never communicates, as in torch.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    A subclass of :class:`torch.nn.modules.batchnorm._BatchNorm` with the constructor,
    parameters, buffers, ``state_dict`` keys and ``_version`` of ``torch.nn.SyncBatchNorm``,
    plus this package's ``nonfinite`` policy; deliberately *not* a subclass of
    ``torch.nn.SyncBatchNorm``. torch 2.13's ``DistributedDataParallel`` refuses CPU models that
    hold an instance of that class ("SyncBatchNorm layers only work with GPU modules",
    ``DistributedDataParallel._passing_sync_batchnorm_handle``); the check is an ``isinstance``
    test and passes no handle or attribute to the layer (it only feeds a ``has_sync_bn`` field
    of DDP's usage log), so nothing in DDP depends on the layer being torch's.

    Running statistics: in training with ``track_running_stats``, ``running_mean`` and
    ``running_var`` are updated in place, identically on every rank,
    ``running = (1 - momentum) * running + momentum * batch`` with the global batch's mean and
    *unbiased* variance (factor :math:`m/(m-1)`, :math:`m` the global count per channel);
    ``momentum=None`` is the cumulative average ``1 / num_batches_tracked``; ``momentum`` is
    the weight of the new batch (the opposite of flax's and equinox's decay). DDP's
    ``broadcast_buffers`` is then unnecessary: the buffers already agree.

    Uneven and empty shards: ranks may hold different batch sizes, including none (``N = 0``);
    a rank with no samples still takes part in both collectives (it sends an empty summary and
    zero sums), returns an empty output and updates its running statistics like the others.
    Only the global count matters: a global count of 1 per channel raises ``ValueError`` on
    every rank (no statistics can be computed), and a global count of 0 changes nothing, like
    BatchNorm on an empty batch.

    Non-finite batches: handled as in :class:`batchnorm.BatchNorm2d` (``nonfinite="skip"`` or
    ``"raise"``), from the global statistics, so every rank takes the same decision.

    Faults, and what every rank must do alike: each rank must call its synchronized layers in
    the same order, in the same mode, and backpropagate through them (or not) alike; otherwise
    a collective waits for the rank that is not there until the process group's timeout
    (``init_process_group(timeout=...)``; gloo's default is 30 minutes: set a shorter one). A
    rank whose input fails validation still joins the statistics exchange, flagged as rejected,
    and raises its ``ValueError``/``TypeError``; the others then raise ``RuntimeError`` naming
    that rank, at once and with no state changed anywhere. A rank that exits or crashes makes
    the others' collective fail (gloo notices the closed connection at once), and they raise
    ``RuntimeError``. Different ``num_features`` on different ranks raise ``RuntimeError`` on
    every rank before any statistics are exchanged. With ``DistributedDataParallel.join`` for
    uneven inputs, pass ``throw_on_early_termination=True``, as for torch's layer.

    Dtypes and devices: CPU float32/float64 input in the layouts the Numba kernels take
    (contiguous or channels-last; :func:`batchnorm.backend_for` says ``"numba"``) runs on those
    kernels with float64 statistics and arithmetic. Other inputs (float16/bfloat16, other
    strides, CUDA and other devices) run on torch ops: statistics and arithmetic in float64 on
    CPU, and in float32 (float64 for float64 input) on other devices, where float64 is slow;
    the output is rounded once to the input's dtype. The exchanged vectors are float64 (counts
    exact up to :math:`2^{53}`) on the input's device, as NCCL requires.

    Autograd: first derivatives only; differentiating the gradient again (double backward)
    raises ``RuntimeError``. ``torch.compile`` is not supported in synchronized mode (the
    exchange is NumPy and eager collectives); unsynchronized, the layer compiles like
    :class:`batchnorm.BatchNorm2d`.

    Args:
        num_features: :math:`C`, the number of channels.
        eps: Added to the variance before the square root; must be ``>= 0``.
        momentum: Weight of the new batch in the running averages, in ``[0, 1]``, or ``None``
            for a cumulative average.
        affine: Learn a per-channel ``weight`` :math:`\gamma` and ``bias`` :math:`\beta`.
        track_running_stats: Keep running estimates for evaluation mode.
        process_group: The group whose processes share statistics; ``None`` for the default
            (world) group. Every process of the group must call the layer.
        device: Device of parameters and buffers.
        dtype: Dtype of parameters and buffers.
        bias: With ``affine``, also learn ``bias``.
        nonfinite: ``"skip"`` or ``"raise"``: what a training batch with non-finite global
            statistics does.

    Raises:
        TypeError: ``num_features`` not an int.
        ValueError: ``num_features < 1``, ``eps < 0``, ``momentum`` outside ``[0, 1]``, or
            ``nonfinite`` not ``"skip"``/``"raise"``.

    Shape:
        - Input: :math:`(N, C, *)`, any rank >= 2; ``N`` may differ between ranks and be 0.
        - Output: the shape, dtype and memory format of the input.

    Example:
        Without an initialized process group it is plain BatchNorm:

        >>> import torch
        >>> from batchnorm.distributed import SyncBatchNorm
        >>> layer = SyncBatchNorm(3)
        >>> layer(torch.randn(8, 3, 4, 4)).shape
        torch.Size([8, 3, 4, 4])
    """

    input_ranks = None  # any rank >= 2
    input_shape = "(N, {C}, *)"
    process_group = None  # class default, for layers class-swapped in by convert_sync_batchnorm

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        # The layers' own constructor (argument checks, the non-finite policy), in BatchNorm's
        # positional order, which has no process_group.
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
        )
        self.process_group = process_group

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: ProcessGroup | None = None
    ) -> torch.nn.Module:
        """Make every BatchNorm layer of ``module`` a SyncBatchNorm, in place (torch's name).

        The conversion :func:`batchnorm.convert_sync_batchnorm` documents; it lives here, as
        in torch, because it is this class's (the reverse and the other conversions are in
        :mod:`batchnorm.tools.convert`).
        """
        return _convert_to_sync(module, process_group, "convert_sync_batchnorm()")

    # No ``mask`` (padding is not synchronized), deliberately unlike BatchNormBase.forward:
    # torch.fx traces every parameter of a root layer's forward as a graph input, so accepting
    # an unused one would change the traced graph.
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        group = self._sync_group()
        if group is None:
            output = forward_layer(self, input)  # exactly batchnorm.BatchNorm*d
        else:
            output = self._sync_forward(input, group)
        # Remembered so that revert_sync_batchnorm can pick the BatchNorm*d of this rank for a
        # layer that was built as SyncBatchNorm (it has no original class to return to).
        self.__dict__["_input_dim"] = input.dim()
        return output

    # ----------------------------------------------------------------------------------------

    def _sync_group(self):
        """The group to synchronize over, or ``None`` when this call is plain BatchNorm."""
        if not self.training:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise RuntimeError(
                    f"{layer_name(self)}: expected torch.distributed to be initialized when "
                    "process_group is given, got an uninitialized default group. Call "
                    "init_process_group() first, or set process_group=None."
                )
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_rank(group) < 0:
            raise RuntimeError(
                f"{layer_name(self)}: expected this process (global rank {dist.get_rank()}) to be "
                "a member of process_group, got a group it does not belong to. Give each "
                "process the group it is in."
            )
        return group if dist.get_world_size(group) > 1 else None

    def _sync_forward(self, input, group) -> torch.Tensor:
        where = functools.partial(layer_name, self)
        peers = _Peers(group)
        device = _packet_device(input, self)
        self._agree_on_num_features(peers, device)
        tracking = self.track_running_stats
        running_mean = self.running_mean if tracking else None
        running_var = self.running_var if tracking else None
        num_batches_tracked = self.num_batches_tracked if tracking else None
        try:
            check_layer_input(where, self, input, _state_dtype(self))
            check_nonfinite_policy(where, self.nonfinite)
            # The shared per-call checks (devices and dtypes of the parameters and buffers,
            # eps, momentum). They run on an empty slice because their one-value-per-channel
            # rule is about the local batch, while here only the global count decides.
            check_batch_norm_args(
                where,
                input[:0],
                running_mean,
                running_var,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
                num_batches_tracked,
            )
        except (TypeError, ValueError):
            _join_as_rejected(peers, self.num_features, device, where)
            raise
        eps = float(self.eps)
        local = batch_moments(input, where=where)
        packet = torch.from_numpy(
            np.concatenate(
                [[_STATISTICS, self.num_features, _OK, local.count], local.mean, local.m2]
            )
        ).to(device)
        blocks = _all_gather(peers, packet, where, "batch statistics")
        total = _merge_blocks(blocks, peers, self.num_features, where)
        if total.count == 0:
            # Every rank is empty: what BatchNorm does with an empty batch (nothing changes).
            return forward_layer(self, input)
        if total.count == 1:
            raise ValueError(
                f"{caller_name(where)}: expected more than 1 value per channel over all ranks of "
                f"the process group when training, got 1 (this rank's input has shape "
                f"{tuple(input.shape)})."
            )
        mean, var, _ = finalize(total)
        invstd = 1.0 / np.sqrt(var + eps)
        sync = _Sync(peers, where, int(total.count), mean, var, invstd, eps)
        weight, bias = self.weight, self.bias
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias)
        ):
            output = _SyncBatchNormFn.apply(input, weight, bias, sync)
        else:
            output = _normalize(input, weight, bias, sync)
        if tracking and running_mean is not None and running_var is not None:
            update_running(
                running_mean,
                running_var,
                total,
                self.momentum,
                num_batches_tracked=num_batches_tracked,
                nonfinite=self.nonfinite,
                where=where,
                on_skip=functools.partial(_count_skipped, self),
            )
        return output

    def _agree_on_num_features(self, peers: _Peers, device: torch.device) -> None:
        """Check once per group that every rank's layer has this ``num_features``.

        The statistics vector's length depends on ``num_features``, and gloo aborts the whole
        process (a C++ exception no Python code can catch) when the vectors of an all_gather
        differ in length; this two-number exchange is the same length on every rank.
        """
        key = (peers.ranks, self.num_features)
        if self.__dict__.get("_sync_checked") == key:
            return
        packet = torch.tensor(
            [_HANDSHAKE, float(self.num_features)], dtype=torch.float64, device=device
        )
        where = functools.partial(layer_name, self)
        blocks = _all_gather(peers, packet, where, "num_features")
        _check_kind(blocks, _HANDSHAKE, peers, where)
        features = [int(c) for c in blocks[:, 1]]
        if any(c != self.num_features for c in features):
            pairs = zip(peers.ranks, features, strict=True)
            shown = ", ".join(f"{c} on global rank {r}" for r, c in pairs)
            raise RuntimeError(
                f"{layer_name(self)}: expected the same num_features on every rank of the process "
                f"group, got {shown}. Every rank must build the same model."
            )
        self.__dict__["_sync_checked"] = key


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------


class _Peers:
    """The group of one synchronized call, and the global ranks of its members (for messages)."""

    __slots__ = ("group", "ranks", "size")

    def __init__(self, group) -> None:
        self.group = group
        self.ranks = tuple(dist.get_process_group_ranks(group))
        self.size = len(self.ranks)


def _packet_device(input, module: torch.nn.Module) -> torch.device:
    # The input's device (NCCL needs CUDA tensors); a rejected non-tensor input has none, and
    # then the layer's own device stands in.
    if isinstance(input, torch.Tensor):
        return input.device
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _collective_failed(where, peers: _Peers, what: str, err: Exception) -> RuntimeError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RuntimeError(
        f"{caller_name(where)}: expected every rank of the process group (global ranks "
        f"{list(peers.ranks)}) to take part in exchanging the {what}, but the collective "
        f"failed with {first_line!r}. A rank probably exited, crashed or timed out, or the "
        "ranks called their synchronized layers in different orders; the process group is "
        "unusable now."
    )


def _all_gather(peers: _Peers, packet: torch.Tensor, where, what: str) -> np.ndarray:
    """Every rank's ``packet``, stacked in group-rank order, as a float64 NumPy array."""
    gathered = [torch.empty_like(packet) for _ in range(peers.size)]
    try:
        dist.all_gather(gathered, packet, group=peers.group)
    except RuntimeError as err:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise _collective_failed(where, peers, what, err) from err
    return torch.stack(gathered).cpu().numpy()


def _all_reduce(peers: _Peers, packet: torch.Tensor, where, what: str) -> torch.Tensor:
    try:
        dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=peers.group)
    except RuntimeError as err:
        raise _collective_failed(where, peers, what, err) from err
    return packet


def _join_as_rejected(peers: _Peers, num_features: int, device, where) -> None:
    """Take part in the statistics exchange flagged as rejected, so the others do not wait."""
    packet = torch.zeros(_HEAD + 2 * num_features, dtype=torch.float64, device=device)
    packet[:3] = torch.tensor([_STATISTICS, float(num_features), _REJECTED])
    try:
        _all_gather(peers, packet, where, "batch statistics")
    except RuntimeError:  # the caller's own error matters more than the courtesy collective
        logger.exception(
            "%s: could not tell the other ranks of a rejected input", caller_name(where)
        )


def _check_kind(blocks: np.ndarray, kind: float, peers: _Peers, where) -> None:
    wrong = [r for r, block in zip(peers.ranks, blocks, strict=True) if block[0] != kind]
    if wrong:
        raise RuntimeError(
            f"{caller_name(where)}: expected every rank of the process group to be exchanging the "
            f"same layer's data, got a different collective from global rank(s) {wrong}. The "
            "ranks must call their synchronized layers in the same order and the same number "
            "of times."
        )


def _merge_blocks(blocks: np.ndarray, peers: _Peers, num_features: int, where) -> Moments:
    """Check the gathered headers, then merge the ranks' summaries in group-rank order."""
    _check_kind(blocks, _STATISTICS, peers, where)
    # Lengths already agree (checked once per group); a differing count here means memory
    # corruption or a foreign sender, not a user error.
    assert all(int(b[1]) == num_features for b in blocks), "num_features changed after the check"
    rejected = [r for r, block in zip(peers.ranks, blocks, strict=True) if block[2] != _OK]
    if rejected:
        raise RuntimeError(
            f"{caller_name(where)}: expected a valid input on every rank of the process group, got "
            f"an input rejected on global rank(s) {rejected} (see the error raised there); "
            "nothing was updated on any rank."
        )
    c = num_features
    parts = [
        Moments(int(b[3]), b[_HEAD : _HEAD + c].copy(), b[_HEAD + c : _HEAD + 2 * c].copy())
        for b in blocks
    ]
    return merge_all(parts)


# --------------------------------------------------------------------------------------------
# Local statistics, normalization and gradients
# --------------------------------------------------------------------------------------------


class _Sync(NamedTuple):
    """What the normalization and its backward need from one synchronized forward.

    ``mean``, ``var`` and ``invstd`` are the global statistics, float64 NumPy arrays of shape
    ``(C,)``; ``n_values`` is the global number of values per channel (not ``count``, which
    would hide the tuple method).
    """

    peers: _Peers
    where: Where
    n_values: int
    mean: np.ndarray
    var: np.ndarray
    invstd: np.ndarray
    eps: float


def _state_dtype(layer) -> torch.dtype | None:
    for t in (layer.weight, layer.running_mean):
        if t is not None:
            return t.dtype
    return None


def _count_skipped(layer) -> None:
    layer.nonfinite_batches_skipped += 1


def _normalize(x, weight, bias, sync: _Sync) -> torch.Tensor:
    """``y = (x - mean) * invstd * weight + bias`` with the global statistics."""
    mean, var = (torch.from_numpy(a).to(x.device) for a in (sync.mean, sync.var))
    return normalize(x, mean, var, weight, bias, sync.eps, where=sync.where)


def _backward(dy, x, weight, sync: _Sync, need_dx: bool):
    """``(dx, dweight, dbias)`` of one rank; ``dx`` needs the global sums (one all_reduce).

    ``dweight``/``dbias`` are this rank's sums alone (see the module docstring). ``dx`` is
    ``None`` when autograd does not want it; then no collective is entered, on any rank, since
    whether the input needs a gradient is the same on every rank.
    """
    channels = x.shape[1]
    sum_dy, sum_dy_xmu = backward_sums(dy, x, sync.mean)
    param_dtype = weight.dtype if weight is not None else x.dtype
    invstd = torch.from_numpy(sync.invstd).to(x.device)
    dweight = (sum_dy_xmu * invstd).to(param_dtype)
    dbias = sum_dy.to(param_dtype)
    if not need_dx:
        return None, dweight, dbias
    packet = torch.cat([sum_dy, sum_dy_xmu])
    totals = _all_reduce(sync.peers, packet, sync.where, "gradient sums")
    dx = backward_input(
        dy,
        x,
        sync.mean,
        sync.invstd,
        weight,
        totals[:channels],
        totals[channels:],
        sync.n_values,
    )
    return dx, dweight, dbias


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sync):
        ctx.save_for_backward(x, weight)
        ctx.sync = sync
        return _normalize(x, weight, bias, sync)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dweight, dbias = _backward(dy, x, weight, ctx.sync, need_dx=need[0])
        return dx, dweight if need[1] else None, dbias if need[2] else None, None


# --------------------------------------------------------------------------------------------
# What the conversions need to know of a layer's synchronization state
# --------------------------------------------------------------------------------------------

# Instance attributes this module keeps on a layer: the group whose num_features were checked,
# and the rank of the last input.
_STATE_ATTRIBUTES = ("_sync_checked", "_input_dim")


def last_input_rank(layer: SyncBatchNorm) -> int | None:
    """The rank of the last input ``layer`` processed, or ``None`` before its first forward.

    :func:`batchnorm.revert_sync_batchnorm` uses it to pick ``BatchNorm1d/2d/3d`` for a layer
    built as :class:`SyncBatchNorm`.
    """
    return layer.__dict__.get("_input_dim")


def forget_sync_state(layer: torch.nn.Module) -> None:
    """Remove what this module remembers on ``layer`` (before it stops being a SyncBatchNorm)."""
    for name in _STATE_ATTRIBUTES:
        layer.__dict__.pop(name, None)


# The instance attribute where a converted layer keeps the class it had, for the reverse.
ORIGINAL_CLASS = "_sync_original_class"


def _path_text(path: str) -> str:
    return repr(path) if path else "the root module"


def _convert_to_sync(model: torch.nn.Module, process_group, where: str) -> torch.nn.Module:
    """The conversion of :meth:`SyncBatchNorm.convert_sync_batchnorm` (see its public twin,
    :func:`batchnorm.convert_sync_batchnorm`, for the contract)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}.")
    swaps, already = [], []
    for path, module in model.named_modules():
        cls = type(module)
        family = family_of(cls)
        if cls is SyncBatchNorm:
            already.append(module)
        elif family is not None and family.sync is not None and cls in (family.ours, family.torch):
            swaps.append(module)
        elif is_batchnorm_like(module):
            raise TypeError(
                f"{where}: cannot convert {_path_text(path)} of type "
                f"{cls.__module__}.{cls.__qualname__}: only torch.nn.BatchNorm1d/2d/3d, "
                "torch.nn.SyncBatchNorm and batchnorm.BatchNorm1d/2d/3d are converted, and "
                "converting a subclass would drop its behaviour. Replace it yourself or convert "
                "its base class."
            )
    for module in swaps:
        original = type(module)
        module.__class__ = known_family(original).sync
        module.__dict__[ORIGINAL_CLASS] = original
    for module in (*swaps, *already):
        module.process_group = process_group
    return model


# The synchronized family (batchnorm.families), and this class as the synchronized twin of every
# fixed-rank one.
register(Family("SyncBatchNorm", None, SyncBatchNorm, torch.nn.SyncBatchNorm, sync=SyncBatchNorm))
for _family in families():
    if _family.ranks is not None:
        add_twin(_family.name, sync=SyncBatchNorm)
