"""Small evaluation-mode inputs go to torch's native op (measured faster there), large ones to
our kernels; training never leaves the kernels. See ``RoutingPolicy.eval_native_bytes``.

These tests run the shipped routing, as the whole suite does; the routing decisions for every
kind of input are tested as a table in ``tests/test_routing.py``.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm
from conftest import TOL, make_input, randomize_bn_state

EVAL_NATIVE_BYTES = batchnorm.routing_policy().eval_native_bytes


@pytest.fixture
def spy(monkeypatch):
    """Record the training flag of every call of torch's op ``torch.batch_norm``.

    Both ways in are seen: the modules' evaluation shortcut calls it directly, the functional
    path through ``torch.nn.functional.batch_norm``.
    """
    calls = []
    native = torch.batch_norm

    def recording(*args):
        calls.append(args[5])
        return native(*args)

    monkeypatch.setattr(torch, "batch_norm", recording)
    return calls


def test_backend_for_reports_the_routing():
    small = torch.zeros(4, 3)
    # 32 MiB exactly: the first size that stays on the kernels (float32), and float64 of half
    # as many rows.
    large = torch.zeros(EVAL_NATIVE_BYTES // 32, 8)
    below = torch.zeros(EVAL_NATIVE_BYTES // 32 - 1, 8)
    assert batchnorm.backend_for(small) == "numba"
    assert batchnorm.backend_for(small, training=False) == "torch"
    assert batchnorm.backend_for(large, training=False) == "numba"
    assert batchnorm.backend_for(below, training=False) == "torch"
    assert batchnorm.backend_for(large[: len(large) // 2].double(), training=False) == "numba"
    assert batchnorm.backend_for(large[: len(large) // 2 - 1].double(), training=False) == "torch"
    assert batchnorm.backend_for(small.half(), training=True) == "torch"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_small_eval_input_runs_on_native_op_and_matches_torch(layout, grad, spy, gen):
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    randomize_bn_state(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = make_input((4, 3, 5, 6), torch.float32, layout, gen)
    with torch.set_grad_enabled(grad):
        y = ours(x)
    assert spy == [False]
    torch.testing.assert_close(y, theirs(x).detach(), **TOL[torch.float32])
    if grad:  # gradients flow through torch's op to the parameters
        y.sum().backward()
        assert ours.weight.grad is not None and ours.bias.grad is not None


def test_large_eval_input_and_every_training_input_stay_on_the_kernels(spy, gen):
    layer = batchnorm.BatchNorm1d(8)
    big = make_input((EVAL_NATIVE_BYTES // 32, 8), torch.float32, "contiguous", gen)
    small = make_input((6, 8), torch.float32, "contiguous", gen)
    layer.train()
    layer(small)
    layer(big)
    layer.eval()
    layer(big)
    assert spy == []
    layer(small)
    assert spy == [False]


def test_routed_eval_changes_no_state_and_rejects_bad_input(spy, gen):
    layer = batchnorm.BatchNorm2d(3).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(make_input((2, 3, 4, 4), torch.float64, "contiguous", gen).float())
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"expected input with 3 channels"):
        layer(torch.zeros(2, 4, 4, 4))
    # The channel count is checked before torch's op is tried: without weight or running
    # statistics torch's op would accept any, so the shortcut never relies on it.
    assert spy == [False]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: torch.zeros(2, 4, 4, 4), ValueError, r"expected input with 3 channels"),
        (lambda: torch.zeros(2, 3, 4), ValueError, r"expected 4-D input"),
        (lambda: torch.zeros(2, 3, 4, 4, dtype=torch.float64), TypeError, r"float64"),
        (lambda: torch.zeros(2, 3, 4, 4, dtype=torch.int64), TypeError, r"floating-point"),
        (lambda: [[1.0, 2.0, 3.0]], TypeError, r"expected a torch.Tensor input"),
    ],
    ids=["channels", "rank", "dtype", "integer", "not-a-tensor"],
)
def test_routed_eval_reports_bad_input_in_this_packages_words(make, error, match, gen):
    # The evaluation shortcut calls torch's op first and checks only after a failure: the
    # error must still be ours, and a wrong rank (which torch's op would accept) must not slip
    # through.
    layer = batchnorm.BatchNorm2d(3).eval()
    randomize_bn_state(layer, gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match) as caught:
        layer(make())
    assert "BatchNorm2d(num_features=3)" in str(caught.value)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("affine", [True, False])
def test_routed_eval_matches_torch_for_every_layer_kind(kind, affine, spy, gen):
    shape = {"BatchNorm1d": (5, 4, 3), "BatchNorm2d": (5, 4, 3, 2), "BatchNorm3d": (5, 4, 3, 2, 2)}
    ours = getattr(batchnorm, kind)(4, affine=affine)
    theirs = getattr(torch.nn, kind)(4, affine=affine)
    randomize_bn_state(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = make_input(shape[kind], torch.float64, "contiguous", gen).float()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    assert spy == [False, False]  # ours (the shortcut), then torch.nn's
