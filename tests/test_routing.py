"""The one routing decision (``batchnorm.routing.choose``) as a table, and the policy's scope.

Each row of the table is an input, what the call does, a policy, and the route the package
must pick. The rows cover every rule: inputs the kernels cannot take, the evaluation bound, the
serial bound and its channels-last scale for the training forward, running statistics that
require grad, and ``kernels=False``. Then: ``use_routing`` is scoped to its thread and asyncio
task, the layers follow the policy, and a backward routes as its forward did.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import batchnorm
from batchnorm import _stages
from batchnorm.routing import RoutingPolicy, choose, routing_policy, use_routing
from conftest import TOL, make_layout

DEFAULT = RoutingPolicy()
SERIAL = DEFAULT.serial_max_elements
EVAL_BYTES = DEFAULT.eval_native_bytes


def _rows(n, c, layout="contiguous", dtype=torch.float32, device="cpu"):
    return make_layout(torch.zeros(n, c, dtype=dtype, device=device), layout)


def _maps(n, c, hw, layout="contiguous", dtype=torch.float32):
    return make_layout(torch.zeros(n, c, hw, hw, dtype=dtype), layout)


# (id, input factory, op, policy changes, expected route)
TABLE = [
    # Inputs the kernels do not take: torch's op for every op, whatever the policy.
    ("bf16", lambda: _rows(8, 4, dtype=torch.bfloat16), "train", {}, "torch"),
    ("fp16", lambda: _rows(8, 4, dtype=torch.float16), "eval", {"eval_native_bytes": 0}, "torch"),
    ("meta", lambda: _rows(8, 4, device="meta"), "train", {}, "torch"),
    ("strided", lambda: _maps(4, 3, 5, "strided"), "train", {}, "torch"),
    ("permuted", lambda: torch.zeros(6, 4, 3, 5).permute(1, 2, 0, 3), "backward", {}, "torch"),
    ("one-dim", lambda: torch.zeros(8), "stage", {}, "torch"),
    # Training: serial up to the bound, parallel above; never torch's op.
    ("train-nchw-at-bound", lambda: _maps(SERIAL // 16, 1, 4), "train", {}, "serial"),
    ("train-nchw-above", lambda: _maps(SERIAL // 16 + 1, 1, 4), "train", {}, "parallel"),
    # The channels-last forward stays serial up to 15/8 of the bound; nchw does not.
    (
        "train-nhwc-1.5x",
        lambda: _maps(SERIAL // 64 * 3 // 2, 4, 4, "channels_last"),
        "train",
        {},
        "serial",
    ),  # fmt: skip
    ("train-nchw-1.5x", lambda: _maps(SERIAL // 64 * 3 // 2, 4, 4), "train", {}, "parallel"),
    ("train-nc-1.5x", lambda: _rows(SERIAL * 3 // 8, 4), "train", {}, "serial"),
    ("train-nhwc-2x", lambda: _maps(SERIAL // 32, 4, 4, "channels_last"), "train", {}, "parallel"),
    (
        "train-huge-eval-bytes",
        lambda: _rows(8, 4),
        "train",
        {"eval_native_bytes": 1 << 40},
        "serial",
    ),  # fmt: skip
    # Backward: serial up to the bound, no channels-last scale.
    (
        "backward-nhwc-1.5x",
        lambda: _maps(SERIAL // 64 * 3 // 2, 4, 4, "channels_last"),
        "backward",
        {},
        "parallel",
    ),  # fmt: skip
    ("backward-small", lambda: _rows(8, 4), "backward", {}, "serial"),
    # Evaluation: torch's op below eval_native_bytes, then the kernels by size.
    ("eval-small", lambda: _rows(8, 4), "eval", {}, "torch"),
    ("eval-just-below", lambda: _rows(EVAL_BYTES // 32 - 1, 8), "eval", {}, "torch"),
    ("eval-at-bound", lambda: _rows(EVAL_BYTES // 32, 8), "eval", {}, "parallel"),
    (
        "eval-f64-at-bound",
        lambda: _rows(EVAL_BYTES // 64, 8, dtype=torch.float64),
        "eval",
        {},
        "parallel",
    ),  # fmt: skip
    ("eval-small-kernels", lambda: _rows(8, 4), "eval", {"eval_native_bytes": 0}, "serial"),
    (
        "eval-large-serial-max",
        lambda: _rows(EVAL_BYTES // 32, 8),
        "eval",
        {"serial_max_elements": 1 << 40},
        "serial",
    ),  # fmt: skip
    # A stage has parallel kernels only.
    ("stage-small", lambda: _rows(8, 4), "stage", {}, "parallel"),
    # kernels=False: torch's op for everything.
    ("off-train", lambda: _rows(8, 4), "train", {"kernels": False}, "torch"),
    ("off-stage", lambda: _rows(8, 4), "stage", {"kernels": False}, "torch"),
]


@pytest.mark.parametrize(("make", "op", "changes", "expected"),
                         [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])  # fmt: skip
def test_choose_table(make, op, changes, expected):
    x = make()
    policy = RoutingPolicy(**{**DEFAULT.__dict__, **changes})
    assert choose(x, op, policy) == expected
    with use_routing(**changes):
        assert choose(x, op) == expected


@pytest.mark.parametrize("op", ["train", "eval", "backward"])
def test_choose_sends_statistics_that_require_grad_to_torch(op):
    assert choose(_rows(8, 4), op, DEFAULT, statistics_require_grad=True) == "torch"


def test_choose_rejects_unknown_op():
    with pytest.raises(ValueError, match=r"choose\(\): expected op in .* got 'forward'"):
        choose(_rows(8, 4), "forward")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"kernels": 1}, TypeError, r"kernels to be a bool, got 1"),
        ({"serial_max_elements": -1}, ValueError, r"serial_max_elements .* got -1"),
        ({"serial_max_elements": 1.5}, TypeError, r"serial_max_elements .* got 1.5"),
        ({"eval_native_bytes": True}, TypeError, r"eval_native_bytes .* got True"),
        ({"nhwc_train_serial_scale": 0.5}, ValueError, r"nhwc_train_serial_scale .* got 0.5"),
        ({"nhwc_train_serial_scale": "2"}, TypeError, r"nhwc_train_serial_scale .* got '2'"),
    ],
    ids=["kernels", "negative", "float-count", "bool-bytes", "scale-below-1", "scale-str"],
)
def test_policy_rejects_bad_fields_and_leaves_the_policy_in_force(changes, error, match):
    with pytest.raises(error, match=rf"RoutingPolicy\(\): expected {match}"):
        with use_routing(**changes):
            pass
    assert routing_policy() == DEFAULT


def test_use_routing_rejects_unknown_fields_and_foreign_policies():
    with pytest.raises(ValueError, match=r"use_routing\(\): expected fields .* got eval_bytes"):
        with use_routing(eval_bytes=0):
            pass
    with pytest.raises(TypeError, match=r"expected a RoutingPolicy or None, got dict"):
        with use_routing({"kernels": False}):
            pass


def test_use_routing_restores_the_previous_policy_also_after_an_error():
    with use_routing(eval_native_bytes=0):
        with pytest.raises(RuntimeError, match="inside"):
            with use_routing(kernels=False) as inner:
                assert routing_policy() is inner and not inner.kernels
                raise RuntimeError("inside")
        assert routing_policy().eval_native_bytes == 0 and routing_policy().kernels
    assert routing_policy() == DEFAULT


def test_use_routing_takes_a_whole_policy():
    policy = RoutingPolicy(serial_max_elements=7)
    with use_routing(policy, eval_native_bytes=0) as used:
        assert used.serial_max_elements == 7 and used.eval_native_bytes == 0
    assert routing_policy() == DEFAULT


def test_use_routing_is_scoped_to_its_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def other():
        inside.wait()
        seen["other"] = routing_policy()
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with use_routing(kernels=False):
        inside.set()
        release.wait(10)
        seen["mine"] = routing_policy()
    thread.join(10)
    assert not seen["mine"].kernels
    assert seen["other"] == DEFAULT


def test_use_routing_is_scoped_to_its_asyncio_task():
    async def task(changes, gate, results, name):
        with use_routing(**changes):
            await gate.wait()  # both tasks are inside their blocks at once
            results[name] = routing_policy()

    async def main():
        gate = asyncio.Event()
        results = {}
        both = asyncio.gather(
            task({"kernels": False}, gate, results, "off"),
            task({"eval_native_bytes": 0}, gate, results, "eval"),
        )
        await asyncio.sleep(0)
        gate.set()
        await both
        return results

    results = asyncio.run(main())
    assert not results["off"].kernels and results["off"].eval_native_bytes == EVAL_BYTES
    assert results["eval"].kernels and results["eval"].eval_native_bytes == 0
    assert routing_policy() == DEFAULT


@pytest.fixture
def native_calls(monkeypatch):
    calls = []
    real = _stages.native_batch_norm

    def spy(input, *args):
        calls.append(args[4])  # the training flag
        return real(input, *args)

    monkeypatch.setattr(_stages, "native_batch_norm", spy)
    return calls


def test_kernels_off_sends_training_to_torch_with_this_packages_running_update(native_calls, gen):
    ours, theirs = batchnorm.BatchNorm1d(4, momentum=None), torch.nn.BatchNorm1d(4, momentum=None)
    x = torch.randn(16, 4, generator=gen) * 3 + 1
    with use_routing(kernels=False):
        y = ours(x)
        assert batchnorm.backend_for(x) == "torch"
    assert native_calls == [True]
    torch.testing.assert_close(y, theirs(x), **TOL[torch.float32])
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, **TOL[torch.float32], msg=key)
    ours(x)  # the policy is back: the kernels
    assert native_calls == [True]


def test_kernels_off_still_skips_a_nonfinite_batch(native_calls):
    layer = batchnorm.BatchNorm1d(2)
    x = torch.randn(8, 2)
    x[0, 1] = float("nan")
    with use_routing(kernels=False), pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        layer(x)
    assert native_calls == [True]
    assert layer.num_batches_tracked.item() == 0 and layer.nonfinite_batches_skipped == 1
    assert torch.equal(layer.running_mean, torch.zeros(2))


def test_backward_routes_as_its_forward_did(monkeypatch):
    # Forward on the parallel kernels (serial bound 0), backward after the block has ended.
    chosen = []
    select = _stages.kernel

    def recording(op, layout, dtype):
        chosen.append(op)
        return select(op, layout, dtype)

    monkeypatch.setattr(_stages, "kernel", recording)
    layer = batchnorm.BatchNorm1d(3)
    x = torch.randn(10, 3, requires_grad=True)
    with use_routing(serial_max_elements=0):
        y = layer(x)
    y.sum().backward()
    assert chosen == ["train_parallel", "backward_parallel"]


def _layout_by_permute(x):
    """The definition kernel_layout implements with torch's memory-format flags."""
    if x.dim() == 2:
        return "nhwc" if x.is_contiguous() else None
    if x.is_contiguous():
        return "nchw"
    return "nhwc" if x.permute(0, *range(2, x.dim()), 1).is_contiguous() else None


@pytest.mark.parametrize(
    "shape",
    [(4, 3), (1, 3), (4, 1), (4, 3, 5), (4, 3, 1), (1, 3, 5), (4, 3, 5, 6), (4, 1, 5, 6),
     (4, 3, 1, 1), (1, 3, 5, 6), (2, 3, 4, 5, 6), (2, 3, 1, 1, 1), (2, 3, 2, 2, 2, 2)],
    ids=lambda s: "x".join(map(str, s)),
)  # fmt: skip
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "transposed"])
def test_kernel_layout_agrees_with_the_permuted_view(shape, layout):
    from batchnorm.routing import kernel_layout

    x = torch.zeros(shape)
    if layout == "transposed":
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    else:
        x = make_layout(x, layout)
    assert kernel_layout(x) == _layout_by_permute(x)


@pytest.mark.parametrize(
    ("op", "expected"),
    [("train", "serial"), ("backward", "serial"), ("eval", "serial"), ("stage", "torch")],
)
def test_a_forked_child_never_takes_the_parallel_kernels(op, expected):
    from batchnorm import _process

    x = _maps(SERIAL // 16 + 1, 16, 4)  # far above the serial bound
    assert choose(x, op, RoutingPolicy(eval_native_bytes=0)) == "parallel"
    _process.FORKED[0] = True  # what the fork handler does in a child
    try:
        assert choose(x, op, RoutingPolicy(eval_native_bytes=0)) == expected
        assert choose(_rows(8, 4), "eval", DEFAULT) == "torch"  # small evaluation: as anywhere
    finally:
        _process.FORKED[0] = False


def test_transforms_and_forward_ad_send_every_call_to_torch():
    from torch.func import vmap

    from batchnorm.routing import transformed

    x = _rows(8, 4)
    seen = []
    vmap(lambda row: seen.append((transformed(), choose(x, "train"))) or row)(x)
    assert seen == [(True, "torch")]
    with torch.autograd.forward_ad.dual_level():
        assert transformed() and choose(x, "train") == "torch"
    assert not transformed() and choose(x, "train") == "serial"
