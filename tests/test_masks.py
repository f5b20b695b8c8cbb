"""Masked BatchNorm: ``layer(input, mask=...)`` against BatchNorm on the gathered real values.

The oracle is ``torch.nn.functional.batch_norm`` applied to the real positions gathered into a
``(values, C)`` tensor: outputs, input/weight/bias gradients, running statistics and the
counter of a masked call must be those of that call, whatever the padding holds (huge values,
NaN, infinities); padding gets zero output and zero gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from conftest import (
    TOL,
    assert_state_unchanged,
    bn_classes,
    make_layout,
    randomize_bn_state,
    shape_id,
    snapshot_state,
)

EPS = 1e-5

# (input shape, layout): 1d (N, C) and (N, C, L), 2d contiguous and channels-last, 3d.
CASES = [
    ((7, 3), "contiguous"),
    ((4, 3, 6), "contiguous"),
    ((3, 2, 4, 5), "contiguous"),
    ((3, 2, 4, 5), "channels_last"),
    ((2, 3, 2, 3, 4), "contiguous"),
    ((2, 3, 2, 3, 4), "channels_last"),
]
CASE_IDS = [f"{shape_id(s)}-{layout}" for s, layout in CASES]
GARBAGE = [1e30, float("nan"), float("inf"), -float("inf")]


def _layer(shape, dtype, gen, **kwargs):
    ours_cls, _ = bn_classes(len(shape))
    layer = ours_cls(shape[1], dtype=dtype, **kwargs)
    randomize_bn_state(layer, gen)
    return layer


def _mask(shape, gen, keep=0.6):
    """A mask of real values with at least 2 real and 1 padded position."""
    mask = torch.rand((shape[0], *shape[2:]), generator=gen) < keep
    flat = mask.view(-1)
    flat[:2] = True
    flat[-1] = False
    return mask


def _with_padding(x, mask, garbage):
    x = x.clone()
    x.movedim(1, -1)[~mask] = garbage
    return x


def _gather(t, mask):
    """The real positions of an ``(N, C, *)`` tensor as a ``(values, C)`` tensor."""
    return t.movedim(1, -1)[mask]


def _expected(layer, x, mask, grad, momentum):
    """Output, gradients and running statistics of F.batch_norm on the gathered real values."""
    real = _gather(x.detach(), mask).clone().requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    running_mean = layer.running_mean.clone()
    running_var = layer.running_var.clone()
    counter = int(layer.num_batches_tracked)
    # torch.nn's cumulative average: the batch weighs 1 / (counter after the increment).
    factor = 1.0 / (counter + 1) if momentum is None else momentum
    y = F.batch_norm(real, running_mean, running_var, weight, bias, True, factor, EPS)
    y.backward(_gather(grad, mask))
    return {
        "output": y.detach(),
        "input": real.grad,
        "weight": weight.grad,
        "bias": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
        "counter": counter + 1,
    }


@pytest.mark.parametrize("garbage", GARBAGE, ids=["1e30", "nan", "inf", "-inf"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
def test_masked_forward_equals_batch_norm_of_the_gathered_values(
    shape, layout, dtype, momentum, garbage, gen
):
    layer = _layer(shape, dtype, gen, momentum=momentum)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) * 2 + 1
    mask = _mask(shape, gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    want = _expected(layer, x, mask, grad, momentum)

    xp = make_layout(_with_padding(x, mask, garbage), layout).requires_grad_(True)
    y = layer(xp, mask=mask)
    y.backward(grad)

    tol = TOL[dtype]
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(_gather(y.detach(), mask), want["output"], **tol)
    assert torch.equal(_gather(y.detach(), ~mask), torch.zeros_like(_gather(x, ~mask)))
    torch.testing.assert_close(_gather(xp.grad, mask), want["input"], **tol)
    assert torch.equal(_gather(xp.grad, ~mask), torch.zeros_like(_gather(x, ~mask)))
    torch.testing.assert_close(layer.weight.grad, want["weight"], **tol)
    torch.testing.assert_close(layer.bias.grad, want["bias"], **tol)
    torch.testing.assert_close(layer.running_mean, want["running_mean"], **tol)
    torch.testing.assert_close(layer.running_var, want["running_var"], **tol)
    assert layer.num_batches_tracked.item() == want["counter"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
def test_masked_forward_with_all_true_mask_equals_no_mask(shape, layout, dtype, training, gen):
    masked = _layer(shape, dtype, gen).train(training)
    plain = _layer(shape, dtype, gen).train(training)
    plain.load_state_dict(masked.state_dict())
    x = make_layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), layout)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)
    results = []
    for layer, kwargs in ((masked, {"mask": mask}), (plain, {})):
        xl = x.clone().requires_grad_(True)
        y = layer(xl, **kwargs)
        y.backward(grad)
        results.append((y, xl.grad, layer.weight.grad, layer.bias.grad, layer.state_dict()))
    (y, dx, dw, db, state), (y0, dx0, dw0, db0, state0) = results
    assert torch.equal(y, y0) and torch.equal(dx, dx0)
    assert torch.equal(dw, dw0) and torch.equal(db, db0)
    for key in state0:
        assert torch.equal(state[key], state0[key]), key


@pytest.mark.parametrize("garbage", [1e30, float("nan")], ids=["1e30", "nan"])
@pytest.mark.parametrize(("shape", "layout"), CASES, ids=CASE_IDS)
def test_masked_forward_in_eval_uses_running_statistics_and_zeroes_padding(
    shape, layout, garbage, gen
):
    layer = _layer(shape, torch.float64, gen).eval()
    before = snapshot_state(layer)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = _mask(shape, gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    real = _gather(x, mask).clone().requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    want = F.batch_norm(
        real, layer.running_mean, layer.running_var, weight, layer.bias.detach(), False, 0.1, EPS
    )
    want.backward(_gather(grad, mask))

    xp = make_layout(_with_padding(x, mask, garbage), layout).requires_grad_(True)
    y = layer(xp, mask=mask)
    y.backward(grad)

    tol = TOL[torch.float64]
    torch.testing.assert_close(_gather(y.detach(), mask), want.detach(), **tol)
    assert not _gather(y.detach(), ~mask).any()
    torch.testing.assert_close(_gather(xp.grad, mask), real.grad, **tol)
    assert not _gather(xp.grad, ~mask).any()
    torch.testing.assert_close(layer.weight.grad, weight.grad, **tol)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize(
    ("shape", "layout"), CASES[3:4] + CASES[5:6], ids=CASE_IDS[3:4] + CASE_IDS[5:6]
)
def test_masked_forward_keeps_channels_last(shape, layout, gen):
    layer = _layer(shape, torch.float32, gen)
    x = make_layout(torch.randn(shape, generator=gen), layout)
    y = layer(x, mask=_mask(shape, gen))
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)


def test_masked_forward_without_running_statistics_uses_the_batch_in_both_modes(gen):
    shape = (5, 3, 4)
    layer = _layer(shape, torch.float64, gen, track_running_stats=False)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = _mask(shape, gen)
    want = F.batch_norm(_gather(x, mask), None, None, layer.weight, layer.bias, True, 0.1, EPS)
    for training in (True, False):
        y = layer.train(training)(x, mask=mask)
        torch.testing.assert_close(_gather(y, mask), want, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(6, 2), (3, 2, 4), (2, 2, 3, 3)], ids=shape_id)
def test_masked_forward_gradcheck_float64(shape, gen):
    layer = _layer(shape, torch.float64, gen, momentum=0.0)
    mask = _mask(shape, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)

    def run(x, weight, bias):
        return torch.func.functional_call(
            layer, {"weight": weight, "bias": bias}, (x,), {"mask": mask}
        )

    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (x, weight, bias))
    assert torch.autograd.gradgradcheck(run, (x, weight, bias))


@pytest.mark.parametrize(
    ("make_mask", "error", "match"),
    [
        (lambda s: torch.ones((s[0], *s[2:])), TypeError, r"mask to be a boolean tensor"),
        (lambda s: [True] * s[0], TypeError, r"mask to be a boolean tensor, got list"),
        (lambda s: torch.ones(s, dtype=torch.bool), ValueError, r"mask of shape \(4, 5\)"),
        (lambda s: torch.ones(s[0], dtype=torch.bool), ValueError, r"mask of shape \(4, 5\)"),
        (lambda s: torch.ones(s[0], 6, dtype=torch.bool), ValueError, r"mask of shape"),
        (
            lambda s: torch.ones((s[0], *s[2:]), dtype=torch.bool, device="meta"),
            ValueError,
            r"mask on the input's device",
        ),
    ],
    ids=["float", "list", "with-channels", "too-few-dims", "wrong-length", "device"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_masked_forward_rejects_a_bad_mask_without_touching_state(
    make_mask, error, match, training, gen
):
    shape = (4, 3, 5)
    layer = _layer(shape, torch.float32, gen).train(training)
    before = snapshot_state(layer)
    with pytest.raises(error, match=rf"BatchNorm1d\(num_features=3\): expected {match}"):
        layer(torch.randn(shape, generator=gen), mask=make_mask(shape))
    assert_state_unchanged(layer, before)


def test_masked_forward_checks_the_input_before_the_mask(gen):
    layer = batchnorm.BatchNorm2d(3)
    before = snapshot_state(layer)
    with pytest.raises(ValueError, match=r"expected input with 3 channels"):
        layer(torch.randn(2, 4, 3, 3, generator=gen), mask=torch.ones(2, 3, 3, dtype=torch.bool))
    assert_state_unchanged(layer, before)


def test_masked_forward_with_nonfinite_real_values_skips_the_update(gen):
    shape = (6, 2)
    layer = _layer(shape, torch.float32, gen)
    before = snapshot_state(layer)
    x = torch.randn(shape, generator=gen)
    x[0, 1] = float("nan")  # a real value, not padding
    mask = torch.tensor([True, True, True, True, True, False])
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        layer(x, mask=mask)
    assert_state_unchanged(layer, before)
    assert layer.nonfinite_batches_skipped == 1
    layer.nonfinite = "raise"
    with pytest.raises(batchnorm.NonFiniteStatisticsError):
        layer(x, mask=mask)
    assert_state_unchanged(layer, before)


def test_masked_forward_passes_the_mask_positionally_too(gen):
    shape = (5, 2, 3)
    a, b = _layer(shape, torch.float64, gen), _layer(shape, torch.float64, gen)
    b.load_state_dict(a.state_dict())
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = _mask(shape, gen)
    assert torch.equal(a(x, mask), b(x, mask=mask))
    assert torch.equal(a.running_var, b.running_var)
