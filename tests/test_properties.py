"""Property tests (hypothesis): invariants of Batch Normalization over drawn shapes and data.

Every example builds its tensors from a drawn seed with its own ``torch.Generator``; nothing is
seeded globally. Shapes have rank 2-5, a batch of 2-256 and at most ~50k elements.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference, use_routing
from batchnorm.functional import batch_norm
from conftest import (
    EVAL_ROUTINGS,
    TOL,
    bn_classes,
    from_np,
    labelled,
    make_input,
    make_layout,
    to_np64,
)

EPS = 1e-5
MAX_ELEMS = 50_000


@st.composite
def bn_shapes(draw, min_rank=2, max_rank=5, max_channels=8):
    """``(N, C, *spatial)`` with 2 <= N <= 256 and at most MAX_ELEMS elements."""
    rank = draw(st.integers(min_rank, max_rank))
    n = draw(st.integers(2, 256))
    c = draw(st.integers(1, max_channels))
    budget = MAX_ELEMS // (n * c)
    spatial = []
    for _ in range(rank - 2):
        d = draw(st.integers(1, max(1, min(6, budget))))
        budget = max(1, budget // d)
        spatial.append(d)
    return (n, c, *spatial)


seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])
dense_layouts = st.sampled_from(["contiguous", "channels_last"])
all_layouts = st.sampled_from(["contiguous", "channels_last", "strided"])


def _per_channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _channel_moments(y):
    """Per-channel mean and biased variance of ``y``, in float64."""
    y64 = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
    return y64.mean(dim=1), y64.var(dim=1, unbiased=False)


# --- parity on drawn shapes ----------------------------------------------------------------


@given(
    shape=bn_shapes(),
    dtype=dtypes,
    layout=all_layouts,
    momentum=st.sampled_from([0.1, 0.0, 1.0, None]),
    affine=st.booleans(),
    seed=seeds,
)
def test_module_matches_torch_and_reference_on_drawn_shapes(
    shape, dtype, layout, momentum, affine, seed
):
    gen = torch.Generator().manual_seed(seed)
    ours_cls, torch_cls = bn_classes(len(shape))
    theirs = torch_cls(shape[1], momentum=momentum, affine=affine, dtype=dtype)
    ours = ours_cls(shape[1], momentum=momentum, affine=affine, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    tol = TOL[dtype]
    x = make_input(shape, dtype, layout, gen, scale=2.0, offset=-1.0)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    outs = []
    for module in (ours, theirs):
        xl = make_layout(x.detach().clone(), layout).requires_grad_(True)
        y = module(xl)
        y.backward(grad)
        outs.append((y.detach(), xl.grad))
    (y, dx), (ty, tdx) = outs
    ry, _, _ = reference.batch_norm_train(to_np64(x), eps=EPS)  # weight 1, bias 0 at init
    rdx, _, _ = reference.batch_norm_train_backward(to_np64(grad), to_np64(x), eps=EPS)
    torch.testing.assert_close(y.double(), from_np(ry), **tol)
    torch.testing.assert_close(dx.double(), from_np(rdx), **tol)

    _assert_close_where_torch_meets_spec(y, ty, from_np(ry), dtype)
    _assert_close_where_torch_meets_spec(dx, tdx, from_np(rdx), dtype)
    ours_state = ours.state_dict()
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours_state[key], want, **tol, msg=labelled(key))
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)


def _assert_close_where_torch_meets_spec(got, want_torch, spec, dtype):
    """Parity with torch, except where torch itself misses the float64 spec in float32.

    torch's float32 CPU kernel loses accuracy on ill-conditioned channels: for x[:, 7] =
    (-1.2329, -1.2673) (m = 2, biased variance 3e-4 against eps 1e-5) its input gradient is off
    the reference by 3.1e-4, while ours is within 3.4e-8. There the spec (oracle 1, already
    checked strictly above) wins and torch (oracle 2) is not consulted; float64 has no excuse.
    """
    tol = TOL[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(got, want_torch, **tol)
        return
    torch_meets_spec = torch.isclose(want_torch.double(), spec, **tol)
    torch.testing.assert_close(got[torch_meets_spec], want_torch[torch_meets_spec], **tol)


# --- invariants ---------------------------------------------------------------------------------


@given(
    shape=bn_shapes(),
    dtype=dtypes,
    layout=dense_layouts,
    log_scale=st.floats(-2, 2),
    offset=st.floats(-100, 100),
    seed=seeds,
)
def test_batch_norm_output_has_zero_mean_and_shrunk_unit_variance(
    shape, dtype, layout, log_scale, offset, seed
):
    """Per channel: mean(y) = 0 and biased var(y) = var / (var + eps) (Alg. 1, no affine)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, layout, gen, scale=10.0**log_scale, offset=offset)
    y = batch_norm(x, None, None, training=True, eps=EPS)
    mean, var = _channel_moments(y)
    _, _, sigma2_B = reference.batch_norm_train(to_np64(x), eps=EPS)
    torch.testing.assert_close(mean, torch.zeros_like(mean), **TOL[dtype])
    torch.testing.assert_close(var, from_np(sigma2_B / (sigma2_B + EPS)), **TOL[dtype])


@given(
    shape=bn_shapes(),
    layout=dense_layouts,
    seed=seeds,
    log_a=st.lists(st.floats(-2, 2), min_size=8, max_size=8),
    b_over_a=st.lists(st.floats(-50, 50), min_size=8, max_size=8),
)
def test_batch_norm_invariant_to_positive_affine_input_map(shape, layout, seed, log_a, b_over_a):
    """BN(a x + b; eps a^2) = BN(x; eps) per channel for a > 0: the mean absorbs b, the
    standard deviation (with eps scaled alike) absorbs a. float64, where the map itself adds
    only ~1e-14 of rounding."""
    gen = torch.Generator().manual_seed(seed)
    c, dtype = shape[1], torch.float64
    a = _per_channel(torch.tensor([10.0**v for v in log_a[:c]], dtype=dtype), len(shape))
    b = a * _per_channel(torch.tensor(b_over_a[:c], dtype=dtype), len(shape))
    x = make_input(shape, dtype, "contiguous", gen)
    mapped = make_layout(a * x + b, layout)
    x = make_layout(x, layout)
    weight = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(c, generator=gen, dtype=dtype)
    for k in range(c):  # one eps per channel is not expressible: map channel k alone
        eps_k = EPS * float(a.flatten()[k]) ** 2
        got = batch_norm(mapped, None, None, weight, bias, training=True, eps=eps_k)[:, k]
        want = batch_norm(x, None, None, weight, bias, training=True, eps=EPS)[:, k]
        torch.testing.assert_close(got, want, **TOL[dtype])


@given(shape=bn_shapes(), dtype=dtypes, layout=dense_layouts, seed=seeds)
def test_batch_norm_permuting_the_batch_permutes_the_output(shape, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, "contiguous", gen)
    perm = torch.randperm(shape[0], generator=gen)
    rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    rm_p, rv_p = rm.clone(), rv.clone()
    y = batch_norm(make_layout(x, layout), rm, rv, training=True)
    y_p = batch_norm(make_layout(x[perm], layout), rm_p, rv_p, training=True)
    torch.testing.assert_close(y_p, y[perm], **TOL[dtype])
    torch.testing.assert_close(rm_p, rm, **TOL[dtype])
    torch.testing.assert_close(rv_p, rv, **TOL[dtype])


@given(
    shape=bn_shapes(),
    layout=dense_layouts,
    mean=st.sampled_from([1e4, -1e4, 3e3]),
    std=st.sampled_from([1e-2, 3e-2]),
    seed=seeds,
)
def test_batch_norm_stable_for_large_mean_small_std_float32(shape, layout, mean, std, seed):
    """mean 1e4, std 1e-2 in float32: E[x^2] - E[x]^2 would lose every digit of the variance
    (1e8 vs 1e-4, float32 has 7); the normalized output must still match the two-pass float64
    reference computed from the same float32 values."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32
    x = make_input(shape, dtype, layout, gen, scale=std, offset=mean)
    rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    y = batch_norm(x, rm, rv, training=True, momentum=1.0, eps=EPS)
    ry, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x), eps=EPS)
    m = x.numel() // x.shape[1]
    torch.testing.assert_close(y.double(), from_np(ry), **TOL[dtype])
    torch.testing.assert_close(rm.double(), from_np(mu_B), **TOL[dtype])
    torch.testing.assert_close(rv.double(), from_np(sigma2_B * m / (m - 1)), **TOL[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_stable_for_large_mean_small_std_float32_fixed_case(layout):
    gen = torch.Generator().manual_seed(11)
    x = make_input((64, 3, 8, 8), torch.float32, layout, gen, scale=1e-2, offset=1e4)
    y = batch_norm(x, None, None, training=True, eps=EPS)
    ry, _, _ = reference.batch_norm_train(to_np64(x), eps=EPS)
    torch.testing.assert_close(y.double(), from_np(ry), **TOL[torch.float32])


@EVAL_ROUTINGS
@given(
    shape=bn_shapes(max_rank=4),
    num_batches=st.integers(1, 4),
    layout=dense_layouts,
    seed=seeds,
)
def test_eval_after_cumulative_pass_equals_algorithm_2(routing, shape, num_batches, layout, seed):
    """momentum=None over B equal batches leaves the paper's population estimate
    (Alg. 2, steps 8-10) in the buffers; eval is then Alg. 2, step 11."""
    with use_routing(**routing):
        _check_eval_after_cumulative_pass(shape, num_batches, layout, seed)


def _check_eval_after_cumulative_pass(shape, num_batches, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    ours_cls, _ = bn_classes(len(shape))
    module = ours_cls(shape[1], momentum=None, dtype=dtype)
    batches = [
        make_input(shape, dtype, layout, gen, scale=3.0, offset=5.0) for _ in range(num_batches)
    ]
    with torch.no_grad():
        for x in batches:
            module(x)
    module.eval()
    mean, var_unbiased = reference.population_statistics([to_np64(b) for b in batches], "paper")
    x = make_input(shape, dtype, layout, gen, scale=3.0, offset=5.0)
    want = reference.batch_norm_inference(
        to_np64(x), mean, var_unbiased, to_np64(module.weight), to_np64(module.bias), EPS
    )
    torch.testing.assert_close(module(x).detach(), from_np(want), **TOL[dtype])
    assert module.num_batches_tracked.item() == num_batches


# --- closed-form running averages --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_running_mean_equals_closed_form_ema_after_k_steps(dtype):
    """Batches whose statistics are known by construction: batch t is ``mu_t + s_t * z`` with z
    standardized per channel (mean 0, biased variance 1), so mu_B = mu_t and sigma2_B = s_t^2.
    With momentum a and k steps from (0, 1):
    running_mean = sum_t a (1-a)^(k-1-t) mu_t,
    running_var = (1-a)^k + sum_t a (1-a)^(k-1-t) s_t^2 m/(m-1).
    Checked both by the closed form and by folding reference.update_running_statistics."""
    gen = torch.Generator().manual_seed(5)
    shape, k, a = (6, 3, 4, 5), 7, 0.1
    m = shape[0] * shape[2] * shape[3]
    ours = bn_classes(4)[0](3, momentum=a, dtype=dtype)
    mus, sigmas = [], []
    rm_ref, rv_ref = np.zeros(3), np.ones(3)
    for _t in range(k):
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        axes = (0, 2, 3)
        z = (z - z.mean(axes, keepdim=True)) / z.std(axes, unbiased=False, keepdim=True)
        mu_t = torch.randn(3, generator=gen, dtype=torch.float64) * 3
        s_t = torch.rand(3, generator=gen, dtype=torch.float64) * 2 + 0.5
        x = (_per_channel(mu_t, 4) + _per_channel(s_t, 4) * z).to(dtype)
        mus.append(mu_t.numpy())
        sigmas.append(s_t.numpy())
        ours(x)
        _, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x))
        rm_ref, rv_ref = reference.update_running_statistics(rm_ref, rv_ref, mu_B, sigma2_B, m, a)

    weights = [a * (1 - a) ** (k - 1 - t) for t in range(k)]
    closed_mean = sum(w * mu for w, mu in zip(weights, mus, strict=True))
    closed_var = (1 - a) ** k + sum(
        w * s**2 * m / (m - 1) for w, s in zip(weights, sigmas, strict=True)
    )
    tol = TOL[dtype]
    torch.testing.assert_close(ours.running_mean.double(), from_np(rm_ref), **tol)
    torch.testing.assert_close(ours.running_var.double(), from_np(rv_ref), **tol)
    # The closed form uses the intended statistics, not those of the rounded batches.
    closed_tol = tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean.double(), from_np(closed_mean), **closed_tol)
    torch.testing.assert_close(ours.running_var.double(), from_np(closed_var), **closed_tol)
    assert ours.num_batches_tracked.item() == k
    assert math.isclose(sum(weights) + (1 - a) ** k, 1.0)


@EVAL_ROUTINGS
@given(shape=bn_shapes(max_rank=3), dtype=dtypes, seed=seeds)
def test_functional_matches_torch_functional_on_drawn_shapes_eval(routing, shape, dtype, seed):
    with use_routing(**routing):
        _check_functional_eval(shape, dtype, seed)


def _check_functional_eval(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_input(shape, dtype, "contiguous", gen, scale=2.0)
    c = shape[1]
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    w = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(
        batch_norm(x, rm, rv, w, b, training=False),
        F.batch_norm(x, rm, rv, w, b, training=False),
        **TOL[dtype],
    )
