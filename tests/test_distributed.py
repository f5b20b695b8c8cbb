"""SyncBatchNorm in real gloo process groups, against single-process BatchNorm.

The oracle never goes through the code under test: ``torch.nn.BatchNorm1d/2d`` in float64 on
the concatenation of every rank's batch, backpropagating one global ``dy`` whose rows are split
among the ranks like the input's. Rank ``r``'s output and input gradient must equal its rows of
the oracle's; the sum over ranks of the weight/bias gradients must equal the oracle's; every
rank's running statistics must equal the oracle's (and each other's, bit for bit).

Starting processes is the cost, so each world size is started once (module-scoped fixtures)
and runs every scenario in one go; the tests then check its records. Processes meet through a
file in ``tmp_path`` and talk over loopback (tests/_distributed.py), every collective has a
bounded timeout, and every process is reaped.
"""

from __future__ import annotations

import datetime
import itertools
import multiprocessing
import os
import time
import warnings
from collections import Counter
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from _distributed import RankFailure, _loopback_interface, run_distributed
from batchnorm import SyncBatchNorm, _stages, convert_sync_batchnorm, revert_sync_batchnorm
from batchnorm._validate import NonFiniteStatisticsError, NonFiniteStatisticsWarning
from batchnorm.frozen import FrozenBatchNorm2d
from conftest import (
    TOL,
    assert_state_unchanged,
    bn_classes,
    labelled,
    make_layout,
    randomize_bn_state,
    snapshot_state,
)

# float16 output is rounded once from float64 arithmetic: half an ulp is 2**-11 relative (4.9e-4)
# and 2**-9 absolute near 4, the largest normalized values here.
HALF_TOL = dict(rtol=1e-3, atol=2e-3)
STEPS = 2
C = 3
# Seconds within which a fault must turn into an error on every rank (measured: < 0.1 s; the
# process groups' own timeout is far longer, so a hang would fail the bound, not pass it).
FAULT_BOUND = 10.0
GROUP_TIMEOUT = 90.0


def _tol(dtype):
    return HALF_TOL if dtype in (torch.float16, torch.bfloat16) else TOL[dtype]


# --- scenarios -------------------------------------------------------------------------------


class Case(NamedTuple):
    """One comparison scenario: per-rank batch sizes, shape, dtype, layout, layer options."""

    sizes: tuple[int, ...]
    tail: tuple[int, ...]  # spatial dims after (N, C)
    dtype: torch.dtype
    layout: str
    momentum: float | None
    affine: bool = True
    track: bool = True

    @property
    def id(self) -> str:
        dims = f"{2 + len(self.tail)}d"
        extra = "" if self.affine and self.track else "-noaffine-notrack"
        return (
            f"{'-'.join(map(str, self.sizes))}_{str(self.dtype)[6:]}_{dims}_{self.layout}"
            f"_m{self.momentum}{extra}"
        )

    @property
    def param_dtype(self) -> torch.dtype:
        # torch's mixed precision: half inputs with float32 parameters and statistics.
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    @property
    def seed(self) -> int:
        return sum(ord(ch) * (i + 1) for i, ch in enumerate(self.id)) % 100_000


SHAPE_KINDS = {
    "2d": ((), "contiguous"),
    "4d": ((3, 2), "contiguous"),
    "4d-cl": ((3, 2), "channels_last"),
}


def _product(sizes_list, dtypes, momenta):
    return [
        Case(sizes, SHAPE_KINDS[shape][0], dtype, SHAPE_KINDS[shape][1], momentum)
        for sizes, dtype, shape, momentum in itertools.product(
            sizes_list, dtypes, SHAPE_KINDS, momenta
        )
    ]


TWO_RANK_CASES = [
    *_product([(4, 4), (1, 7)], [torch.float32, torch.float64], [0.1, None]),
    Case((1, 7), (3, 2), torch.float16, "channels_last", 0.1),  # torch ops, float64 on CPU
    Case((4, 4), (3, 2), torch.float64, "strided", None),  # torch ops (no kernel layout)
    Case((1, 7), (), torch.float32, "strided", 0.1),
    Case((3, 5), (3, 2), torch.float64, "contiguous", 0.1, affine=False, track=False),
]
THREE_RANK_CASES = [
    *_product([(5, 0, 11)], [torch.float32, torch.float64], [0.1]),
    *_product([(1, 2, 3)], [torch.float32, torch.float64], [None]),
    Case((5, 0, 11), (4,), torch.float64, "contiguous", None),  # 3-D (N, C, L)
    Case((0, 6, 2), (3, 2), torch.float16, "contiguous", 0.1),
]


def _global_batch(seed: int, sizes, tail, dtype):
    """One global input (mean 3, sd 2: a non-zero mean exercises the merge) and one global dy."""
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), C, *tail)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _initial_layer(cls, case: Case, **kwargs):
    layer = cls(
        C,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track,
        dtype=case.param_dtype,
        **kwargs,
    )
    randomize_bn_state(layer, torch.Generator().manual_seed(case.seed))
    return layer


def _expected(case: Case, sizes=None):
    """The oracle: torch.nn BatchNorm in float64 on the concatenated batch, step by step."""
    sizes = sizes or case.sizes
    layer = _initial_layer(bn_classes(2 + len(case.tail))[1], case).double()
    steps = []
    for step in range(STEPS):
        x, dy = _global_batch(case.seed + step, sizes, case.tail, case.dtype)
        x = x.double().requires_grad_(True)
        y = layer(x)
        y.backward(dy.double())
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        steps.append({"y": y.detach(), "dx": x.grad, **grads})
        layer.zero_grad(set_to_none=True)
    return steps, snapshot_state(layer)


# --- the workers (run in the spawned processes) ----------------------------------------------


def _run_case(rank: int, case: Case, group=None, sizes=None) -> dict:
    """Train one SyncBatchNorm for STEPS steps on this rank's rows; record everything."""
    sizes = sizes or case.sizes
    layer = _initial_layer(SyncBatchNorm, case, process_group=group)
    backends = []
    local_moments = _stages.moments

    def spy(x, route):
        backends.append("torch" if route == "torch" else "numba")
        return local_moments(x, route)

    _stages.moments = spy
    steps = []
    try:
        for step in range(STEPS):
            x, dy = _global_batch(case.seed + step, sizes, case.tail, case.dtype)
            rows = _rows(sizes, rank)
            xr = make_layout(x[rows].clone(), case.layout).requires_grad_(True)
            y = layer(xr)
            y.backward(dy[rows].clone())
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            steps.append(
                {
                    "y": y.detach().clone(),
                    "dx": xr.grad.clone(),
                    **grads,
                    "same_strides": y.stride() == xr.stride() or case.layout == "strided",
                }
            )
            layer.zero_grad(set_to_none=True)
    finally:
        _stages.moments = local_moments
    return {"steps": steps, "state": snapshot_state(layer), "backends": backends}


def _attempt(fn, *args):
    """``("ok", value)`` or ``("error", type name, message, seconds until the error)``."""
    start = time.monotonic()
    try:
        return ("ok", fn(*args))
    except Exception as err:  # reported to the parent, which asserts on it
        return ("error", type(err).__name__, str(err), time.monotonic() - start)


def _bad_input_on_one_rank(rank):
    """Rank 1 passes 4 channels to a 3-channel layer; then both ranks make a valid call."""
    layer = SyncBatchNorm(C, dtype=torch.float64)
    before = snapshot_state(layer)
    channels = C + 1 if rank == 1 else C
    gen = torch.Generator().manual_seed(rank)
    outcome = _attempt(layer, torch.randn(4, channels, 2, 2, dtype=torch.float64, generator=gen))
    unchanged = _unchanged(layer, before)
    # Both ranks took part in exactly one exchange, so the next call pairs up again.
    after = layer(torch.randn(4, C, 2, 2, dtype=torch.float64, generator=gen))
    return {
        "outcome": outcome,
        "unchanged": unchanged,
        "after": (tuple(after.shape), int(layer.num_batches_tracked)),
    }


def _count_one(rank):
    """One value per channel over both ranks: ValueError on both, no state change."""
    layer = SyncBatchNorm(C, dtype=torch.float64)
    before = snapshot_state(layer)
    outcome = _attempt(layer, torch.randn(1 - rank, C, dtype=torch.float64))
    return {"outcome": outcome, "unchanged": _unchanged(layer, before)}


def _unchanged(layer, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def _all_empty(rank):
    layer = SyncBatchNorm(C, dtype=torch.float64)
    before = snapshot_state(layer)
    x = torch.empty(0, C, 2, 2, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    return {"shape": tuple(y.shape), "unchanged": _unchanged(layer, before)}


def _nonfinite(rank, policy):
    """Rank 0's batch holds a NaN in channel 1: every rank takes the same decision."""
    layer = SyncBatchNorm(C, dtype=torch.float64, nonfinite=policy)
    before = snapshot_state(layer)
    x = torch.randn(4, C, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if rank == 0:
        x[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = _attempt(layer, x)
    return {
        "outcome": outcome[:3] if outcome[0] == "error" else ("ok",),
        "warnings": [type(w.message).__name__ for w in caught],
        "unchanged": _unchanged(layer, before),
        "skipped": layer.nonfinite_batches_skipped,
    }


def _eval_no_sync(rank):
    """Evaluation mode never communicates: ranks may call it different numbers of times."""
    case = Case((4, 4), (3, 2), torch.float64, "contiguous", 0.1)
    layer = _initial_layer(SyncBatchNorm, case).eval()
    outputs = []
    for step in range(2 - rank):  # rank 0 twice, rank 1 once: a collective would hang
        x, _ = _global_batch(100 + step, (4,), case.tail, case.dtype)
        outputs.append(layer(x))
    return outputs


def _double_backward(rank):
    layer = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    return _attempt(lambda: gx.sum().backward())[:3]


def _collectives(rank):
    """How many collectives each phase enters (spied on torch.distributed itself)."""
    counts = Counter()
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def spy(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    layer = SyncBatchNorm(C, dtype=torch.float64)
    phases = {}
    try:
        for name in originals:
            setattr(dist, name, spy(name))
        for phase in ("first", "second"):
            x = torch.randn(3, C, 2, 2, dtype=torch.float64, requires_grad=True)
            y = layer(x)
            phases[f"{phase} forward"] = dict(counts)
            y.sum().backward()
            phases[f"{phase} backward"] = dict(counts)
        # The input needs no gradient: only the (local) weight and bias gradients are computed.
        layer(torch.randn(3, C, 2, 2, dtype=torch.float64)).sum().backward()
        phases["no input gradient"] = dict(counts)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return phases


# A small CNN with BatchNorm after convolutions (4-D) and after a Linear layer (2-D).
def _ddp_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3),
        nn.BatchNorm1d(3),
    ).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() == 1 and name.startswith(("1.", "4.", "8.")):  # BatchNorm weight/bias
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


DDP_SIZES = (4, 4)
DDP_STEPS = 3


def _ddp_batches():
    g = torch.Generator().manual_seed(11)
    n = sum(DDP_SIZES)
    return [
        (
            torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(DDP_STEPS)
    ]


def _ddp_training(rank):
    net = convert_sync_batchnorm(_ddp_net())
    # broadcast_buffers=False: the running statistics must agree without rank 0's copy.
    model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rows = _rows(DDP_SIZES, rank)
    for x, target in _ddp_batches():
        optimizer.zero_grad()
        # The mean over this rank's rows; DDP averages the gradients over the (equal) ranks,
        # which makes it the mean over the global batch.
        loss = nn.functional.mse_loss(model(x[rows]), target[rows])
        loss.backward()
        optimizer.step()
    return snapshot_state(net)


def _two_rank_worker(rank, world_size):
    assert world_size == 2, world_size
    return {
        "cases": {case.id: _run_case(rank, case) for case in TWO_RANK_CASES},
        "bad_input": _bad_input_on_one_rank(rank),
        "count_one": _count_one(rank),
        "all_empty": _all_empty(rank),
        "nonfinite_skip": _nonfinite(rank, "skip"),
        "nonfinite_raise": _nonfinite(rank, "raise"),
        "eval": _eval_no_sync(rank),
        "double_backward": _double_backward(rank),
        "collectives": _collectives(rank),
        "ddp": _ddp_training(rank),
    }


SUBGROUP = (0, 2)
SUBGROUP_SIZES = (3, 4)  # rows of ranks 0 and 2
SUBGROUP_CASE = Case((3, 4), (3, 2), torch.float64, "channels_last", 0.1)


def _mismatched_num_features(rank):
    features = C + 1 if rank == 2 else C
    layer = SyncBatchNorm(features, dtype=torch.float64)
    return _attempt(layer, torch.randn(4, features, dtype=torch.float64))


def _subgroup(rank, group):
    if rank not in SUBGROUP:
        layer = SyncBatchNorm(C, process_group=group, dtype=torch.float64)
        return _attempt(layer, torch.randn(4, C, dtype=torch.float64))[:3]
    return _run_case(SUBGROUP.index(rank), SUBGROUP_CASE, group=group, sizes=SUBGROUP_SIZES)


def _three_rank_worker(rank, world_size):
    assert world_size == 3, world_size
    group = dist.new_group(list(SUBGROUP))  # every rank must take part in creating it
    return {
        "cases": {case.id: _run_case(rank, case) for case in THREE_RANK_CASES},
        "mismatch": _mismatched_num_features(rank),
        "subgroup": _subgroup(rank, group),  # runs after the mismatch: the group is still usable
    }


def _exit_mid_step_worker(rank, world_size):
    """One full step, then rank 1 dies between its forward and its backward."""
    layer = SyncBatchNorm(C, dtype=torch.float64)
    for step in range(2):
        x = torch.randn(4, C, 2, 2, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        if step == 1 and rank == 1:
            os._exit(3)
        outcome = _attempt(lambda y=y: y.sum().backward())
    return outcome


@pytest.fixture(scope="module")
def warm_kernels():
    # Compile (or load) the kernels in this process first, so that the ranks only read the
    # on-disk cache and never compile into it concurrently.
    from batchnorm import kernels

    kernels.warmup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, warm_kernels):
    return run_distributed(
        _two_rank_worker,
        world_size=2,
        timeout=GROUP_TIMEOUT,
        rendezvous_dir=tmp_path_factory.mktemp("sync-two"),
    )


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, warm_kernels):
    return run_distributed(
        _three_rank_worker,
        world_size=3,
        timeout=GROUP_TIMEOUT,
        rendezvous_dir=tmp_path_factory.mktemp("sync-three"),
    )


# --- equality with single-process BatchNorm on the concatenated batch ------------------------


def _assert_ranks_equal_oracle(results: list[dict], case: Case, sizes=None):
    sizes = sizes or case.sizes
    expected_steps, expected_state = _expected(case, sizes)
    tol = _tol(case.dtype)
    param_tol = TOL[case.param_dtype]
    for step, want in enumerate(expected_steps):
        for rank, result in enumerate(results):
            got = result["steps"][step]
            rows = _rows(sizes, rank)
            where = f"step {step} rank {rank}"
            assert got["y"].dtype == case.dtype and got["same_strides"], where
            for key in ("y", "dx"):
                torch.testing.assert_close(
                    got[key].double(), want[key][rows], **tol, msg=labelled(f"{where} {key}")
                )
        for name in ("weight", "bias"):
            if name not in want:
                assert all(name not in r["steps"][step] for r in results)
                continue
            total = sum(r["steps"][step][name].double() for r in results)
            torch.testing.assert_close(
                total, want[name], **param_tol, msg=labelled(f"step {step} sum of d{name}")
            )
    for rank, result in enumerate(results):
        state = result["state"]
        assert state.keys() == expected_state.keys()
        for key, want in expected_state.items():
            if key == "num_batches_tracked":
                assert torch.equal(state[key], want), (rank, key)
            else:
                torch.testing.assert_close(
                    state[key].double(), want, **param_tol, msg=labelled(f"rank {rank} {key}")
                )
            # Every rank merged the same blocks in the same order: identical bits.
            assert torch.equal(state[key], results[0]["state"][key]), (rank, key)


@pytest.mark.distributed
@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=lambda c: c.id)
def test_sync_bn_two_ranks_equals_concatenated_batch(two_ranks, case):
    _assert_ranks_equal_oracle([r["cases"][case.id] for r in two_ranks], case)


@pytest.mark.distributed
@pytest.mark.parametrize("case", THREE_RANK_CASES, ids=lambda c: c.id)
def test_sync_bn_three_ranks_equals_concatenated_batch(three_ranks, case):
    _assert_ranks_equal_oracle([r["cases"][case.id] for r in three_ranks], case)


@pytest.mark.distributed
def test_sync_bn_subgroup_equals_concatenation_of_its_members(three_ranks):
    members = [three_ranks[r]["subgroup"] for r in SUBGROUP]
    _assert_ranks_equal_oracle(members, SUBGROUP_CASE, SUBGROUP_SIZES)
    outsider = three_ranks[1]["subgroup"]
    assert outsider[:2] == ("error", "RuntimeError") and "not belong" in outsider[2]


@pytest.mark.distributed
def test_sync_bn_dispatches_kernel_inputs_to_numba_and_others_to_torch_ops(two_ranks):
    for case in TWO_RANK_CASES:
        want = "torch" if case.layout == "strided" or case.dtype.itemsize == 2 else "numba"
        assert batchnorm.backend_for(_example_input(case)) == want  # the documented rule
        for rank in (0, 1):
            assert two_ranks[rank]["cases"][case.id]["backends"] == [want] * STEPS, case.id


def _example_input(case: Case) -> torch.Tensor:
    return make_layout(torch.zeros(2, C, *case.tail, dtype=case.dtype), case.layout)


def test_sync_bn_other_devices_use_torch_ops_in_float32():
    # No GPU here: the dispatch is checked on the meta device, which stands for any non-CPU one.
    x = torch.empty(4, C, 2, 2, device="meta", dtype=torch.float16)
    assert batchnorm.backend_for(x) == "torch"
    assert _stages.accumulate_dtype(x) == torch.float32
    assert _stages.accumulate_dtype(x.double()) == torch.float64
    assert _stages.accumulate_dtype(torch.empty(2, C, dtype=torch.float16)) == torch.float64


# --- training under DistributedDataParallel on CPU -------------------------------------------


@pytest.mark.distributed
def test_sync_bn_ddp_two_ranks_trains_like_one_process_on_the_full_batch(two_ranks):
    reference = _ddp_net()  # torch.nn.BatchNorm, one process, the concatenated batch
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, target in _ddp_batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(x), target).backward()
        optimizer.step()
    want = snapshot_state(reference)
    for rank in (0, 1):
        got = two_ranks[rank]["ddp"]
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(
                got[key], value, **TOL[torch.float64], msg=labelled(f"rank {rank} {key}")
            )


# --- other behaviours in the groups ----------------------------------------------------------


@pytest.mark.distributed
def test_sync_bn_bad_input_on_one_rank_raises_on_every_rank_without_state_change(two_ranks):
    bad, other = two_ranks[1]["bad_input"], two_ranks[0]["bad_input"]
    assert bad["outcome"][:2] == ("error", "ShapeError")  # a ValueError and a RuntimeError
    assert "SyncBatchNorm(num_features=3): expected input with 3 channels" in bad["outcome"][2]
    assert other["outcome"][:2] == ("error", "RuntimeError")
    assert "rejected on global rank(s) [1]" in other["outcome"][2]
    for result in (bad, other):
        assert result["outcome"][3] < FAULT_BOUND
        assert result["unchanged"]
        assert result["after"] == ((4, C, 2, 2), 1)


@pytest.mark.distributed
def test_sync_bn_global_count_of_one_raises_value_error_on_every_rank(two_ranks):
    for rank in (0, 1):
        result = two_ranks[rank]["count_one"]
        assert result["outcome"][:2] == ("error", "ValueError")
        assert "more than 1 value per channel over all ranks" in result["outcome"][2]
        assert result["unchanged"]


@pytest.mark.distributed
def test_sync_bn_all_ranks_empty_changes_nothing(two_ranks):
    for rank in (0, 1):
        assert two_ranks[rank]["all_empty"] == {"shape": (0, C, 2, 2), "unchanged": True}


@pytest.mark.distributed
def test_sync_bn_nonfinite_statistics_take_the_same_decision_on_every_rank(two_ranks):
    for rank in (0, 1):
        skip, raised = two_ranks[rank]["nonfinite_skip"], two_ranks[rank]["nonfinite_raise"]
        assert skip["outcome"] == ("ok",) and skip["unchanged"] and skip["skipped"] == 1
        assert skip["warnings"] == [NonFiniteStatisticsWarning.__name__]
        assert raised["outcome"][:2] == ("error", NonFiniteStatisticsError.__name__)
        assert raised["unchanged"] and raised["skipped"] == 0


@pytest.mark.distributed
def test_sync_bn_eval_mode_is_local_running_statistics_normalization(two_ranks):
    case = Case((4, 4), (3, 2), torch.float64, "contiguous", 0.1)
    reference = _initial_layer(nn.BatchNorm2d, case).eval()
    for rank in (0, 1):
        outputs = two_ranks[rank]["eval"]
        assert len(outputs) == 2 - rank
        for step, y in enumerate(outputs):
            x, _ = _global_batch(100 + step, (4,), case.tail, case.dtype)
            torch.testing.assert_close(y, reference(x), **TOL[torch.float64])


@pytest.mark.distributed
def test_sync_bn_double_backward_raises(two_ranks):
    for rank in (0, 1):
        outcome = two_ranks[rank]["double_backward"]
        assert outcome[:2] == ("error", "RuntimeError") and "once_differentiable" in outcome[2]


@pytest.mark.distributed
def test_sync_bn_one_collective_per_pass_after_the_first_forward(two_ranks):
    phases = two_ranks[0]["collectives"]
    # The first forward also agrees on num_features (once per layer and group).
    assert phases["first forward"] == {"all_gather": 2}
    assert phases["first backward"] == {"all_gather": 2, "all_reduce": 1}
    assert phases["second forward"] == {"all_gather": 3, "all_reduce": 1}
    assert phases["second backward"] == {"all_gather": 3, "all_reduce": 2}
    # dweight/dbias are local sums: without an input gradient nothing is exchanged backward.
    assert phases["no input gradient"] == {"all_gather": 4, "all_reduce": 2}
    assert two_ranks[1]["collectives"] == phases


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.distributed
def test_sync_bn_mismatched_num_features_raises_on_every_rank_in_bounded_time(three_ranks):
    for rank in range(3):
        outcome = three_ranks[rank]["mismatch"]
        assert outcome[:2] == ("error", "RuntimeError"), outcome
        assert "expected the same num_features on every rank" in outcome[2]
        assert "3 on global rank 0, 3 on global rank 1, 4 on global rank 2" in outcome[2]
        assert outcome[3] < FAULT_BOUND


@pytest.mark.distributed
def test_sync_bn_rank_exiting_mid_step_fails_the_survivor_in_bounded_time(tmp_path, warm_kernels):
    start = time.monotonic()
    results = run_distributed(
        _exit_mid_step_worker,
        world_size=2,
        timeout=30.0,
        grace=FAULT_BOUND,
        rendezvous_dir=tmp_path,
        allow_failures=True,
    )
    survivor, dead = results
    assert isinstance(dead, RankFailure) and "exited with code 3" in dead.reason
    assert not isinstance(survivor, RankFailure), survivor
    assert survivor[:2] == ("error", "RuntimeError"), survivor
    assert "exchanging the gradient sums, but the collective failed" in survivor[2]
    assert survivor[3] < FAULT_BOUND
    assert time.monotonic() - start < 30.0
    assert multiprocessing.active_children() == []


# --- one process: plain BatchNorm ------------------------------------------------------------


@pytest.fixture
def single_rank_group(tmp_path, monkeypatch):
    """A gloo group of world size 1 in this process, destroyed afterwards."""
    interface = _loopback_interface()
    if interface is not None:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", interface)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'rdzv'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _assert_same_as_batchnorm2d(**kwargs):
    gen = torch.Generator().manual_seed(3)
    ours = batchnorm.BatchNorm2d(C, dtype=torch.float64, **kwargs)
    randomize_bn_state(ours, gen)
    sync = SyncBatchNorm(C, dtype=torch.float64, **kwargs)
    sync.load_state_dict(ours.state_dict())
    for step in range(3):
        for layer in (ours, sync):
            layer.zero_grad(set_to_none=True)
            layer.train(step < 2)
        x = torch.randn(5, C, 4, 4, generator=gen, dtype=torch.float64)
        dy = torch.randn(5, C, 4, 4, generator=gen, dtype=torch.float64)
        results = []
        for layer in (ours, sync):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.backward(dy)
            results.append([y, xi.grad, *(p.grad for p in layer.parameters())])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b), step
        for key, value in ours.state_dict().items():
            assert torch.equal(sync.state_dict()[key], value), (step, key)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_without_process_group_is_exactly_batchnorm2d(momentum):
    assert not dist.is_initialized()
    _assert_same_as_batchnorm2d(momentum=momentum)


def test_sync_bn_world_size_one_is_exactly_batchnorm2d(single_rank_group):
    _assert_same_as_batchnorm2d()


def test_sync_bn_inside_ddp_on_cpu_constructs_where_torch_sync_batchnorm_is_refused(
    single_rank_group,
):
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(net))
    ours = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    model = nn.parallel.DistributedDataParallel(ours)
    model(torch.randn(4, 2, 3, 3)).sum().backward()
    assert ours[1].weight.grad is not None


def test_sync_bn_process_group_without_initialized_distributed_raises_runtime_error():
    layer = SyncBatchNorm(C, process_group=object())
    before = snapshot_state(layer)
    with pytest.raises(RuntimeError, match=r"SyncBatchNorm\(num_features=3\): expected torch"):
        layer(torch.randn(4, C))
    assert_state_unchanged(layer, before)
    layer.eval()(torch.randn(4, C))  # evaluation mode never synchronizes


# --- module contract -------------------------------------------------------------------------


def test_sync_bn_is_a_batchnorm_with_torch_sync_batchnorm_state_but_not_its_subclass():
    layer = SyncBatchNorm(C)
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(layer, nn.SyncBatchNorm)
    theirs = nn.SyncBatchNorm(C)
    randomize_bn_state(theirs, torch.Generator().manual_seed(0))
    layer.load_state_dict(theirs.state_dict())
    assert layer._version == theirs._version
    for key, value in theirs.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    nn.SyncBatchNorm(C).load_state_dict(layer.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_features=0), ValueError, r"SyncBatchNorm\(\): expected num_features"),
        (dict(num_features=2.0), TypeError, r"expected num_features to be a positive int"),
        (dict(num_features=3, momentum=1.5), ValueError, r"expected momentum in \[0, 1\]"),
        (dict(num_features=3, nonfinite="ignore"), ValueError, r"expected nonfinite to be one"),
    ],
)
def test_sync_bn_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyncBatchNorm(**kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4), r"expected input of shape \(N, 3, \*\) with at least 2 dims, got 1-D"),
        (torch.randn(4, 2, 5), r"expected input with 3 channels"),
        (torch.randn(4, 3, dtype=torch.float32), r"expected input of the layer's dtype float64"),
    ],
)
def test_sync_bn_forward_rejects_bad_input_without_touching_state(x, match):
    layer = SyncBatchNorm(C, dtype=torch.float64)
    randomize_bn_state(layer, torch.Generator().manual_seed(1))
    before = snapshot_state(layer)
    with pytest.raises((ValueError, TypeError), match=match):
        layer(x)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("rank", [2, 3, 4, 5, 6])
def test_sync_bn_accepts_any_input_rank_like_batchnorm(rank):
    shape = (4, C, 2, 3, 2, 2)[:rank]
    x = torch.randn(shape, dtype=torch.float64)
    want = nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(SyncBatchNorm(C, dtype=torch.float64)(x), want)


# --- conversion ------------------------------------------------------------------------------


_BN = (nn.BatchNorm2d, nn.BatchNorm3d, batchnorm.BatchNorm1d)


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.BatchNorm2d(3),
        nn.InstanceNorm2d(3),  # shares BatchNorm's base class, but is not BatchNorm
        FrozenBatchNorm2d(3),  # a fixed affine map: nothing to synchronize
        nn.Flatten(),
        nn.Linear(12, 4),
        batchnorm.BatchNorm1d(4, nonfinite="raise"),
        nn.Unflatten(1, (4, 1, 1, 1)),
        nn.BatchNorm3d(4),
    )


def test_convert_sync_batchnorm_swaps_classes_in_place_and_revert_restores_them():
    model = _model()
    classes = [type(m) for m in model]
    params = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    group = object()
    assert convert_sync_batchnorm(model, process_group=group) is model
    assert [type(m) is SyncBatchNorm for m in model] == [c in _BN for c in classes]
    assert [id(p) for p in model.parameters()] == params  # the optimizer keeps working
    assert all(model[i].process_group is group for i in (1, 6, 8))
    assert model[6].nonfinite == "raise"
    model.eval()(torch.randn(5, 2, 2, 2)).sum().backward()  # eval: a group object suffices
    optimizer.step()
    assert revert_sync_batchnorm(model) is model
    assert [type(m) for m in model] == classes
    assert [id(p) for p in model.parameters()] == params
    assert model[6].nonfinite == "raise"
    for i in (1, 8):  # torch's classes again: none of our attributes left behind
        assert model[i].__dict__.keys() == nn.BatchNorm2d(3).__dict__.keys()


def test_convert_sync_batchnorm_converts_the_root_and_torch_sync_batchnorm():
    root = nn.BatchNorm1d(3)
    assert convert_sync_batchnorm(root) is root and type(root) is SyncBatchNorm
    theirs = nn.SyncBatchNorm(3)
    randomize_bn_state(theirs, torch.Generator().manual_seed(2))
    before = snapshot_state(theirs)
    converted = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(theirs))
    assert type(converted[0]) is SyncBatchNorm and converted[0].process_group is None
    assert_state_unchanged(converted[0], before)
    revert_sync_batchnorm(converted)
    assert type(converted[0]) is nn.SyncBatchNorm and converted[0].process_group is None


class _CustomBatchNorm(nn.BatchNorm2d):
    pass


class _CustomSyncBatchNorm(SyncBatchNorm):
    pass


@pytest.mark.parametrize("fn", [convert_sync_batchnorm, revert_sync_batchnorm])
def test_conversions_reject_unknown_layers_without_partial_change(fn):
    layers = [nn.BatchNorm2d(3), SyncBatchNorm(3)]
    layers[1](torch.randn(4, 3, 2, 2))  # reversible: it has seen a 4-D input
    custom = _CustomBatchNorm(3) if fn is convert_sync_batchnorm else _CustomSyncBatchNorm(3)
    model = nn.Sequential(*layers, nn.Sequential(custom))
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=r"cannot (convert|revert) '2\.0' of type"):
        fn(model)
    assert [type(m) for m in model.modules()] == classes


def test_revert_sync_batchnorm_built_as_such_follows_the_last_input_rank():
    layers = nn.ModuleList(SyncBatchNorm(3) for _ in range(4))
    shapes = [(4, 3), (4, 3, 5), (4, 3, 2, 2), (4, 3, 2, 2, 2)]
    for layer, shape in zip(layers, shapes, strict=True):
        layer(torch.randn(shape))
    revert_sync_batchnorm(layers)
    assert [type(m) for m in layers] == [
        batchnorm.BatchNorm1d,
        batchnorm.BatchNorm1d,
        batchnorm.BatchNorm2d,
        batchnorm.BatchNorm3d,
    ]


def test_revert_sync_batchnorm_refuses_layer_that_never_saw_an_input():
    model = nn.Sequential(nn.BatchNorm2d(3), SyncBatchNorm(3))
    convert_sync_batchnorm(model[0])
    with pytest.raises(TypeError, match=r"cannot revert '1'.*no input yet"):
        revert_sync_batchnorm(model)
    assert type(model[0]) is SyncBatchNorm and type(model[1]) is SyncBatchNorm


@pytest.mark.parametrize("fn", [convert_sync_batchnorm, revert_sync_batchnorm])
def test_conversions_reject_non_modules(fn):
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module, got list"):
        fn([nn.BatchNorm2d(3)])
