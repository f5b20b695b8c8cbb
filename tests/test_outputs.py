"""The cache of large output buffers (batchnorm.outputs): reuse only what no tensor uses."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import outputs

BIG = (outputs.MIN_BYTES // 4,)  # float32 values in the smallest cached buffer


@pytest.fixture(autouse=True)
def _fresh_cache():
    previous = batchnorm.set_output_cache_limit(outputs.DEFAULT_LIMIT)
    batchnorm.clear_output_cache()
    yield
    batchnorm.clear_output_cache()
    batchnorm.set_output_cache_limit(previous)


def hits() -> int:
    return batchnorm.output_cache_info().hits


def address(a) -> int:
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def test_a_dead_output_is_reused():
    before = batchnorm.output_cache_info()
    first = torch.from_numpy(outputs.empty(BIG, np.float32))
    where = address(first)
    del first
    second = torch.from_numpy(outputs.empty(BIG, np.float32))
    assert address(second) == where
    info = batchnorm.output_cache_info()
    assert (info.hits - before.hits, info.misses - before.misses) == (1, 1)
    assert (info.buffers, info.held, info.idle) == (1, outputs.MIN_BYTES, 0)


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda t: t, id="tensor"),
        pytest.param(lambda t: t[1:], id="slice"),
        pytest.param(lambda t: t.view(2, -1).t(), id="transposed-view"),
        pytest.param(lambda t: t.numpy(), id="numpy-of-tensor"),
        pytest.param(lambda t: t.untyped_storage(), id="storage"),
        pytest.param(lambda t: torch.nn.Parameter(t), id="parameter"),
    ],
)
def test_memory_still_reachable_from_any_tensor_is_never_handed_out(keep):
    start = hits()
    tensor = torch.from_numpy(outputs.empty(BIG, np.float32))
    tensor.fill_(3.0)
    holder = keep(tensor)
    where = address(tensor)
    del tensor
    gc.collect()
    other = torch.from_numpy(outputs.empty(BIG, np.float32))
    other.fill_(-1.0)
    other_where = address(other)
    assert other_where != where
    assert hits() == start
    del holder, other
    gc.collect()
    # Once the last users are gone, both buffers are free again.
    again = torch.from_numpy(outputs.empty(BIG, np.float32))
    assert address(again) in {where, other_where}
    assert hits() == start + 1


def test_float32_and_float64_outputs_of_one_size_share_buffers():
    a = torch.from_numpy(outputs.empty(BIG, np.float32))
    where = address(a)
    del a
    b = torch.from_numpy(outputs.empty((BIG[0] // 2,), np.float64))
    assert address(b) == where and b.dtype == torch.float64


def test_small_outputs_are_not_cached():
    small = outputs.empty((outputs.MIN_BYTES // 4 - 1,), np.float32)
    assert small.nbytes < outputs.MIN_BYTES
    assert batchnorm.output_cache_info().buffers == 0


def test_limit_bounds_held_bytes_and_releases_least_recently_used_idle_buffers():
    batchnorm.set_output_cache_limit(2 * outputs.MIN_BYTES)
    first = torch.from_numpy(outputs.empty(BIG, np.float32))
    second = torch.from_numpy(outputs.empty(BIG, np.float32))
    third = torch.from_numpy(outputs.empty(BIG, np.float32))  # over the limit: not cached
    assert batchnorm.output_cache_info().buffers == 2
    where_first, where_second = address(first), address(second)
    del first, third
    # A bigger buffer needs room: the idle one (first) goes, the busy one (second) stays.
    bigger = torch.from_numpy(outputs.empty((BIG[0] + 1024,), np.float32))
    info = batchnorm.output_cache_info()
    assert info.buffers == 1 and info.held == outputs.MIN_BYTES
    del bigger
    assert address(second) == where_second != where_first


def test_clear_releases_idle_buffers_and_forgets_busy_ones_safely():
    busy = torch.from_numpy(outputs.empty(BIG, np.float32))
    busy.fill_(7.0)
    idle = torch.from_numpy(outputs.empty(BIG, np.float32))
    del idle
    assert batchnorm.output_cache_info().idle == outputs.MIN_BYTES
    batchnorm.clear_output_cache()
    assert batchnorm.output_cache_info()[1:4] == (0, 0, 0)
    fresh = torch.from_numpy(outputs.empty(BIG, np.float32))
    fresh.fill_(1.0)
    assert torch.all(busy == 7.0)


def test_limit_zero_turns_caching_off():
    assert batchnorm.set_output_cache_limit(0) == outputs.DEFAULT_LIMIT
    a = torch.from_numpy(outputs.empty(BIG, np.float32))
    assert batchnorm.output_cache_info().buffers == 0
    del a


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, r"expected nbytes >= 0, got -1"),
        (1.5, TypeError, "to be an int"),
        (True, TypeError, "to be an int"),
    ],
)
def test_set_output_cache_limit_rejects_bad_values_and_keeps_the_limit(value, error, match):
    with pytest.raises(error, match=match):
        batchnorm.set_output_cache_limit(value)
    assert batchnorm.output_cache_info().limit == outputs.DEFAULT_LIMIT


def test_threads_never_share_a_live_buffer():
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        held = []
        for i in range(20):
            t = torch.from_numpy(outputs.empty(BIG, np.float32))
            t.fill_(float(k * 100 + i))
            held.append(t)
            if len(held) > 2:
                held.pop(0)
            # Every buffer still held must keep exactly what this thread wrote into it.
            for j, h in enumerate(held):
                assert float(h[0]) == float(k * 100 + i - len(held) + 1 + j)
        with lock:
            results.append((k, float(held[-1][-1])))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(k, float(k * 100 + 19)) for k in range(4)]


# --------------------------------------------------------------------------------------------
# Through the layers: outputs reused across calls, results unchanged
# --------------------------------------------------------------------------------------------

SHAPE = (16, 8, 96, 96)  # 4.5 MiB of float32: cached


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_module_outputs_reuse_buffers_and_match_torch(memory_format):
    torch.manual_seed(0)
    x = torch.randn(SHAPE).to(memory_format=memory_format).requires_grad_(True)
    ours, theirs = batchnorm.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    start = hits()
    kept, copies = [], []
    for step in range(3):
        grad = torch.randn(SHAPE).to(memory_format=memory_format)
        x.grad = None
        y = ours(x * (step + 1))
        y.backward(grad)
        got = (y.detach().clone(), x.grad.clone())
        x.grad = None
        y_ref = theirs(x * (step + 1))
        y_ref.backward(grad)
        torch.testing.assert_close(got[0], y_ref.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], x.grad, atol=2e-5, rtol=1e-5)
        assert y.is_contiguous(memory_format=memory_format)
        kept.append(y)  # the outputs of every step stay alive: each must keep its own values
        copies.append(got[0])
    assert len({k.data_ptr() for k in kept}) == 3
    for k, c in zip(kept, copies, strict=True):
        torch.testing.assert_close(k.detach(), c, rtol=0, atol=0)
    assert hits() - start >= 2  # the input gradients of earlier steps were reused


def test_kept_outputs_are_not_overwritten_by_later_calls(eval_on_kernels):
    x = torch.randn(SHAPE)
    bn = batchnorm.BatchNorm2d(8).eval()
    first = bn(x)
    copy = first.clone()
    second = bn(x * 2.0)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, copy, rtol=0, atol=0)
    where = first.data_ptr()
    del first
    third = bn(x * 3.0)
    assert third.data_ptr() == where


def test_cache_survives_fork_with_its_lock_free():
    # A child process started while the lock is free must be able to allocate.
    code = (
        "import os, numpy as np\n"
        "from batchnorm import outputs\n"
        "a = outputs.empty((outputs.MIN_BYTES // 4,), np.float32)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    outputs.empty((outputs.MIN_BYTES // 4,), np.float32)\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_bypassed_allocates_afresh_and_keeps_the_cached_buffers():
    first = torch.from_numpy(outputs.empty(BIG, np.float32))
    where = address(first)
    del first
    start = hits()
    with outputs.bypassed():
        fresh = torch.from_numpy(outputs.empty(BIG, np.float32))
        assert address(fresh) != where and hits() == start
    assert batchnorm.output_cache_info().limit == outputs.DEFAULT_LIMIT
    again = torch.from_numpy(outputs.empty(BIG, np.float32))
    assert address(again) == where and hits() == start + 1
