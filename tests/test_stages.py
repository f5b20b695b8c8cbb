"""The staged functional API: each stage against the reference, and their compositions
against the fused op.

The fused kernels are the fast implementation of ``normalize_batch`` followed by
``update_running``; composed from the stages (``batch_moments`` -> ``finalize`` ->
``normalize``; ``backward_sums`` -> ``backward_input``) the same step must give the same
numbers to float64 rounding. Gradients of the stages are checked by finite differences
(gradcheck in float64), and through the statistics where the math says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import functional as F
from batchnorm import reference
from batchnorm.stats import Moments, finalize, merge_all
from conftest import (
    TOL,
    assert_state_unchanged,
    from_np,
    make_input,
    shape_id,
    snapshot_state,
    to_np64,
)

SHAPES = [(7, 3), (60, 100), (3, 5, 7), (4, 3, 5, 6), (5, 2, 3, 4, 3), (40, 8, 40, 40)]
LAYOUTS = ["contiguous", "channels_last"]
# The statistics of the staged and the fused path agree to float64 rounding: both run the same
# block moments, and the normalizations differ only in where scale = weight * invstd is rounded.
STAGED = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: TOL[torch.float32]}


def _params(c, dtype, gen):
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return weight, bias


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_batch_moments_match_reference(shape, dtype, layout, gen):
    x = make_input(shape, dtype, layout, gen, scale=3.0, offset=1e3)
    moments = F.batch_moments(x)
    _, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x))
    m = x.numel() // shape[1]
    assert moments.count == m and isinstance(moments.count, int)
    np.testing.assert_allclose(moments.mean, mu_B, rtol=1e-13, atol=0)
    np.testing.assert_allclose(moments.m2, sigma2_B * m, rtol=1e-11, atol=0)


def test_batch_moments_of_torch_route_inputs_are_float64(gen):
    x = make_input((6, 3, 4, 4), torch.float64, "strided", gen).to(torch.bfloat16)
    moments = F.batch_moments(x)
    _, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x))
    np.testing.assert_allclose(moments.mean, mu_B, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(moments.m2, sigma2_B * 96, rtol=1e-12, atol=1e-14)


def test_batch_moments_of_empty_batch_is_the_merge_identity():
    moments = F.batch_moments(torch.zeros(0, 4, 3))
    assert moments.count == 0 and np.array_equal(moments.mean, np.zeros(4))


@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 7), (4, 3, 2, 5)], ids=shape_id)
def test_batch_moments_with_mask_are_those_of_the_kept_positions(shape, gen):
    x = make_input(shape, torch.float64, "contiguous", gen, scale=2.0)
    excluded = torch.rand((shape[0], *shape[2:]), generator=gen) < 0.4
    moments = F.batch_moments(x, ~excluded)  # the mask marks real values
    kept = x.movedim(1, -1)[~excluded].numpy()  # (kept positions, C)
    assert moments.count == kept.shape[0]
    np.testing.assert_allclose(moments.mean, kept.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.m2, kept.var(axis=0) * kept.shape[0], rtol=1e-11)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (lambda: torch.zeros(6, 3), TypeError, r"mask to be a boolean tensor, got torch.float32"),
        (lambda: torch.zeros(6, 4, dtype=torch.bool), ValueError, r"mask of shape \(6, 5\)"),
        (lambda: [True], TypeError, r"mask to be a boolean tensor, got list"),
    ],
    ids=["float", "shape", "list"],
)
def test_batch_moments_rejects_bad_masks(mask, error, match):
    with pytest.raises(error, match=rf"batch_moments\(\): expected {match}"):
        F.batch_moments(torch.zeros(6, 3, 5), mask())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_staged_training_step_equals_the_fused_op(shape, dtype, layout, gen):
    # batch_moments -> finalize -> normalize, then update_running, against batch_norm.
    x = make_input(shape, dtype, layout, gen, scale=2.0, offset=3.0)
    weight, bias = _params(shape[1], dtype, gen)
    rm_f, rv_f = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    rm_s, rv_s = rm_f.clone(), rv_f.clone()
    fused = batchnorm.batch_norm(x, rm_f, rv_f, weight, bias, training=True, momentum=0.3)
    moments = F.batch_moments(x)
    mean, var, _ = finalize(moments)
    staged = F.normalize(x, torch.from_numpy(mean), torch.from_numpy(var), weight, bias)
    assert F.update_running(rm_s, rv_s, moments, momentum=0.3)
    torch.testing.assert_close(staged, fused, **STAGED[dtype])
    torch.testing.assert_close(rm_s, rm_f, **STAGED[dtype])
    torch.testing.assert_close(rv_s, rv_f, **STAGED[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_normalize_batch_equals_the_fused_op_and_returns_its_statistics(shape, layout, gen):
    dtype = torch.float64
    x = make_input(shape, dtype, layout, gen, scale=2.0, offset=3.0).requires_grad_(True)
    weight, bias = (p.requires_grad_(True) for p in _params(shape[1], dtype, gen))
    y, moments = F.normalize_batch(x, weight, bias)
    want = batchnorm.batch_norm(x, None, None, weight, bias, training=True)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    _, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x))
    np.testing.assert_allclose(moments.mean, mu_B, rtol=1e-12)
    np.testing.assert_allclose(moments.m2 / moments.count, sigma2_B, rtol=1e-11)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad(y, (x, weight, bias), grad)
    want_grads = torch.autograd.grad(want, (x, weight, bias), grad)
    for a, b in zip(got, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)], ids=shape_id)
def test_normalize_gradcheck_through_given_statistics(shape, gen):
    # Gradients to the input, the parameters and the statistics themselves.
    x = make_input(shape, torch.float64, "contiguous", gen).requires_grad_(True)
    mean = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    weight, bias = (p.requires_grad_(True) for p in _params(shape[1], torch.float64, gen))
    inputs = (x, mean, var, weight, bias)
    assert torch.autograd.gradcheck(lambda *a: F.normalize(*a, eps=1e-3), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: F.normalize(*a, eps=1e-3), inputs)


def test_normalize_with_float64_statistics_of_a_float32_input_is_applied_in_float64(gen):
    # Mean 1e4, spread 1e-2: float32 statistics would lose the spread to rounding.
    x = make_input((64, 3, 4, 4), torch.float32, "contiguous", gen, scale=1e-2, offset=1e4)
    moments = F.batch_moments(x)
    mean, var, _ = finalize(moments)
    y = F.normalize(x, mean, var)  # NumPy statistics are accepted as they are
    want, _, _ = reference.batch_norm_train(to_np64(x))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), from_np(want), **TOL[torch.float32])


def test_composed_stages_give_the_training_gradient(gen):
    # normalize_batch's gradient flows through the statistics; composing the non-differentiable
    # batch_moments with normalize does not, and that is the documented difference.
    shape = (8, 3, 4)
    x = make_input(shape, torch.float64, "contiguous", gen).requires_grad_(True)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, _ = F.normalize_batch(x, eps=0.1)
    (dx,) = torch.autograd.grad(y, x, grad)
    want, _, _ = reference.batch_norm_train_backward(to_np64(grad), to_np64(x), eps=0.1)
    torch.testing.assert_close(dx, from_np(want), **TOL[torch.float64])
    mean, var, _ = finalize(F.batch_moments(x))
    y_const = F.normalize(x, mean, var, eps=0.1)
    (dx_const,) = torch.autograd.grad(y_const, x, grad)
    torch.testing.assert_close(
        dx_const, grad / torch.from_numpy(np.sqrt(var + 0.1)).reshape(1, -1, 1)
    )


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)], ids=shape_id)
def test_normalize_batch_with_mask_gradcheck_and_statistics(shape, gen):
    x = make_input(shape, torch.float64, "contiguous", gen).requires_grad_(True)
    excluded = torch.zeros((shape[0], *shape[2:]), dtype=torch.bool)
    excluded[0] = True
    excluded[-1, ...] = True
    weight, bias = (p.requires_grad_(True) for p in _params(shape[1], torch.float64, gen))

    def run(x, weight, bias):
        return F.normalize_batch(x, weight, bias, eps=1e-3, mask=~excluded)[0]

    assert torch.autograd.gradcheck(run, (x, weight, bias))
    y, moments = F.normalize_batch(x, weight, bias, mask=~excluded)
    kept = x.detach()[1:-1]
    want, mu_B, _ = reference.batch_norm_train(
        to_np64(kept), to_np64(weight), to_np64(bias), eps=1e-5
    )
    torch.testing.assert_close(y[1:-1], from_np(want), **TOL[torch.float64])
    np.testing.assert_allclose(moments.mean, mu_B, rtol=1e-12)
    assert moments.count == kept.numel() // shape[1]


def test_normalize_batch_rejects_a_mask_that_keeps_one_value(gen):
    x = make_input((4, 2), torch.float64, "contiguous", gen)
    with pytest.raises(ValueError, match=r"more than 1 value per channel .* got 1 unmasked"):
        F.normalize_batch(x, mask=torch.tensor([False, False, True, False]))


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5, 6), (40, 8, 40, 40)], ids=shape_id)
def test_backward_stages_compose_to_the_training_gradient(shape, gen):
    dtype = torch.float64
    x = make_input(shape, dtype, "channels_last" if len(shape) == 4 else "contiguous", gen)
    weight, _ = _params(shape[1], dtype, gen)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    moments = F.batch_moments(x)
    mean, var, _ = finalize(moments)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    sum_dy, sum_dy_xmu = F.backward_sums(grad, x, mean)
    dx = F.backward_input(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, moments.count)
    want_dx, want_dw, want_db = reference.batch_norm_train_backward(
        to_np64(grad), to_np64(x), to_np64(weight)
    )
    torch.testing.assert_close(dx, from_np(want_dx), **TOL[dtype])
    torch.testing.assert_close(sum_dy, from_np(want_db), **TOL[dtype])
    torch.testing.assert_close(
        sum_dy_xmu * torch.from_numpy(invstd), from_np(want_dw), **TOL[dtype]
    )
    assert dx.stride() == x.stride()


def test_backward_stages_add_up_over_parts_of_a_batch(gen):
    # What SyncBatchNorm relies on: the sums of the parts are the sums of the whole.
    x = make_input((12, 4, 3), torch.float64, "contiguous", gen)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    mean = torch.from_numpy(F.batch_moments(x).mean)
    whole = F.backward_sums(grad, x, mean)
    parts = [F.backward_sums(grad[i : i + 4], x[i : i + 4], mean) for i in (0, 4, 8)]
    for k in range(2):
        torch.testing.assert_close(sum(p[k] for p in parts), whole[k], rtol=1e-13, atol=1e-13)


def test_merged_moments_of_parts_equal_the_moments_of_the_whole(gen):
    x = make_input((13, 3, 5), torch.float32, "contiguous", gen, scale=2.0, offset=50.0)
    whole = F.batch_moments(x)
    merged = merge_all(F.batch_moments(x[i : i + 4]) for i in range(0, 13, 4))
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 1.0, None], ids=["m0.1", "m1", "cumulative"])
def test_update_running_matches_reference(momentum, gen):
    x = make_input((9, 4), torch.float64, "contiguous", gen, scale=2.0)
    moments = F.batch_moments(x)
    rm, rv = torch.randn(4, generator=gen, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    counter = torch.tensor(3)
    rm_ref, rv_ref = rm.numpy().copy(), rv.numpy().copy()
    assert F.update_running(rm, rv, moments, momentum, num_batches_tracked=counter)
    mean, var, _ = finalize(moments)
    factor = 1 / 4 if momentum is None else momentum
    want = reference.update_running_statistics(rm_ref, rv_ref, mean, var, 9, factor)
    torch.testing.assert_close(rm, from_np(want[0]), **TOL[torch.float64])
    torch.testing.assert_close(rv, from_np(want[1]), **TOL[torch.float64])
    assert counter.item() == 4


def test_update_running_with_weight_one_replaces_nonfinite_running_values():
    # The population pass sets statistics this way; old NaNs take no part (0 * NaN is NaN).
    rm, rv = torch.full((2,), float("nan")), torch.full((2,), float("inf"))
    moments = Moments(4, np.array([1.0, 2.0]), np.array([3.0, 6.0]))
    assert F.update_running(rm, rv, moments, 1.0)
    torch.testing.assert_close(rm, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(rv, torch.tensor([1.0, 2.0]))


def test_update_running_skips_nonfinite_statistics_and_reports_them():
    rm, rv, counter = torch.zeros(2), torch.ones(2), torch.tensor(0)
    skipped = []
    moments = Moments(4, np.array([np.nan, 2.0]), np.array([3.0, 6.0]))
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning, match=r"in channels 0"):
        updated = F.update_running(
            rm, rv, moments, num_batches_tracked=counter, on_skip=lambda: skipped.append(1)
        )
    assert not updated and skipped == [1] and counter.item() == 0
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))
    with pytest.raises(batchnorm.NonFiniteStatisticsError, match=r"update_running\(\)"):
        F.update_running(rm, rv, moments, nonfinite="raise")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda rm, rv, m: F.update_running(rm, rv[:1], m), ValueError, r"running_var of shape"),
        (lambda rm, rv, m: F.update_running(rm.long(), rv, m), TypeError, r"floating-point"),
        (
            lambda rm, rv, m: F.update_running(rm, rv, Moments(1, m.mean, m.m2)),
            ValueError,
            r"more than 1 value per channel",
        ),
        (
            lambda rm, rv, m: F.update_running(rm, rv, Moments(np.array([3, 3]), m.mean, m.m2)),
            TypeError,
            r"one count for all channels",
        ),
        (lambda rm, rv, m: F.update_running(rm, rv, m, None), ValueError, r"num_batches_tracked"),
        (lambda rm, rv, m: F.update_running(rm, rv, m, 1.5), ValueError, r"momentum in \[0, 1\]"),
        (lambda rm, rv, m: F.update_running(rm, rv, m, nonfinite="x"), ValueError, r"nonfinite"),
    ],
    ids=["shape", "dtype", "count-1", "count-array", "cumulative", "momentum", "policy"],
)
def test_update_running_rejects_bad_arguments_without_touching_buffers(call, error, match):
    module = torch.nn.BatchNorm1d(2)
    before = snapshot_state(module)
    moments = Moments(4, np.array([1.0, 2.0]), np.array([3.0, 6.0]))
    with pytest.raises(error, match=match):
        call(module.running_mean, module.running_var, moments)
    assert_state_unchanged(module, before)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.zeros(4, 3), torch.zeros(2), torch.ones(3)), ValueError, r"mean of shape \(3,\)"),
        (
            (torch.zeros(4, 3), torch.zeros(3), torch.ones(3, dtype=torch.int64)),
            TypeError,
            r"var with a floating-point dtype",
        ),  # fmt: skip
        ((torch.zeros(4, 3), None, torch.ones(3)), ValueError, r"mean to be a \(C,\) tensor"),
        ((torch.zeros(4), torch.zeros(3), torch.ones(3)), ValueError, r"input of shape .* 2 dims"),
    ],
    ids=["shape", "dtype", "missing", "rank"],
)
def test_normalize_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=rf"normalize\(\): expected {match}"):
        F.normalize(*args)


def test_normalize_rejects_unknown_activation():
    with pytest.raises(ValueError, match=r"expected activation in \('identity',\), got 'relu'"):
        F.normalize(torch.zeros(4, 3), torch.zeros(3), torch.ones(3), activation="relu")


@pytest.mark.parametrize("fn", ["TrainFn", "EvalFn", "NormalizeFn"])
def test_autograd_functions_are_in_setup_context_form(fn):
    # forward without ctx plus setup_context: what torch.func needs to transform them.
    from batchnorm import _autograd

    cls = getattr(_autograd, fn)
    assert cls.setup_context is not torch.autograd.Function.setup_context
    assert "ctx" not in cls.forward.__code__.co_varnames[: cls.forward.__code__.co_argcount]


def test_torch_func_grad_through_a_training_layer_matches_torch_nn(gen):
    # The setup_context form is what lets torch.func.grad differentiate the op (MAML-style
    # inner loops use it with track_running_stats=False).
    x = make_input((8, 3), torch.float64, "contiguous", gen, scale=2.0)
    grads = []
    for cls in (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d):
        module = cls(3, track_running_stats=False).double()
        params = dict(module.named_parameters())

        def loss(p, x, module=module):
            return (torch.func.functional_call(module, p, (x,)) ** 3).sum()

        grads.append(
            (torch.func.grad(loss)(params, x), torch.func.grad(loss, argnums=1)(params, x))
        )
    (ours_p, ours_x), (theirs_p, theirs_x) = grads
    for name in ("weight", "bias"):
        torch.testing.assert_close(ours_p[name], theirs_p[name], **TOL[torch.float64])
    torch.testing.assert_close(ours_x, theirs_x, **TOL[torch.float64])
