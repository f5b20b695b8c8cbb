"""Ghost batch norm and batch renormalization against formulas built from torch's batch_norm."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import batchnorm
from batchnorm.families import family_of
from batchnorm.routing import use_routing
from conftest import TOL, make_layout, shape_id

GHOST = {2: batchnorm.GhostBatchNorm1d, 3: batchnorm.GhostBatchNorm1d}
GHOST |= {4: batchnorm.GhostBatchNorm2d, 5: batchnorm.GhostBatchNorm3d}
RENORM = {2: batchnorm.BatchRenorm1d, 3: batchnorm.BatchRenorm1d}
RENORM |= {4: batchnorm.BatchRenorm2d, 5: batchnorm.BatchRenorm3d}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d}
TORCH |= {4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}

# (per-example shape, layout)
CASES = [
    ((3,), "contiguous"),
    ((3, 5), "contiguous"),
    ((3, 4, 5), "contiguous"),
    ((3, 4, 5), "channels_last"),
    ((2, 3, 2, 2), "contiguous"),
]
CASE_IDS = [f"{shape_id(s)}-{layout}" for s, layout in CASES]

# (N, virtual_batch_size, chunk boundaries written out by hand from the remainder rule)
SPLITS = [
    (12, 4, [4, 4, 4]),  # exact chunks
    (10, 4, [4, 4, 2]),  # a smaller last chunk of its own
    (9, 4, [4, 5]),  # one example left over: merged into the chunk before
    (5, 2, [2, 3]),  # the same with chunks of 2
]
SPLIT_IDS = [f"N{n}-v{v}" for n, v, _ in SPLITS]


def _input(gen, n, per_example, layout="contiguous", dtype=torch.float64, scale=1.0):
    x = torch.randn(n, *per_example, generator=gen, dtype=dtype) * scale + 0.5
    return make_layout(x, layout)


def _with_params(layer, gen):
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=gen, dtype=layer.weight.dtype))
        layer.weight.add_(0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=gen, dtype=layer.bias.dtype))
    return layer


def _grads(layer, x, grad_out, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x, **kwargs)
    y.backward(grad_out)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _per_chunk_reference(x, sizes, weight, bias, eps, grad_out):
    """BatchNorm of each chunk alone (torch's functional op), and its gradients."""
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    outputs = [
        F.batch_norm(chunk, None, None, w, b, training=True, eps=eps)
        for chunk in torch.split(x, sizes)
    ]
    y = torch.cat(outputs)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad


# --------------------------------------------------------------------------------------------
# Ghost batch norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "v", "sizes"), SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_ghost_matches_per_chunk_batchnorm_outputs_and_all_gradients(
    gen, n, v, sizes, per_example, layout
):
    x = _input(gen, n, per_example, layout)
    layer = _with_params(GHOST[x.dim()](per_example[0], v, dtype=torch.float64), gen)
    grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=torch.float64), layout)
    got = _grads(layer, x, grad_out)
    want = _per_chunk_reference(x, sizes, layer.weight, layer.bias, layer.eps, grad_out)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_ghost_matches_per_chunk_batchnorm_in_float32(gen):
    x = _input(gen, 10, (3, 4, 4), dtype=torch.float32)
    layer = _with_params(batchnorm.GhostBatchNorm2d(3, 4), gen)
    grad_out = torch.randn(x.shape, generator=gen)
    got = _grads(layer, x, grad_out)
    want = _per_chunk_reference(x, [4, 4, 2], layer.weight, layer.bias, layer.eps, grad_out)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_ghost_chunks_of_one_example_with_spatial_extent_are_instance_statistics(gen):
    x = _input(gen, 3, (2, 5))
    layer = batchnorm.GhostBatchNorm1d(2, 1, dtype=torch.float64)
    want = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split(1)])
    torch.testing.assert_close(layer(x), want, **TOL[torch.float64])


@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=str)
def test_ghost_running_statistics_move_towards_the_whole_batch_once(gen, momentum):
    x = _input(gen, 10, (3, 4, 5), scale=2.0)
    layer = batchnorm.GhostBatchNorm2d(3, 4, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    start_mean, start_var = layer.running_mean.clone(), layer.running_var.clone()
    layer(x)
    weight = 1.0 if momentum is None else momentum  # cumulative average: 1 / 1 at step one
    # The merged statistics of all chunks are the whole batch's: its mean and its unbiased
    # variance over N * H * W values per channel.
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var_unbiased = x.var(dim=(0, 2, 3), correction=1)
    tol = TOL[torch.float64]
    torch.testing.assert_close(
        layer.running_mean, (1 - weight) * start_mean + weight * batch_mean, **tol
    )
    torch.testing.assert_close(
        layer.running_var, (1 - weight) * start_var + weight * batch_var_unbiased, **tol
    )
    assert layer.num_batches_tracked.item() == 1


def test_ghost_counts_one_batch_per_forward(gen):
    layer = batchnorm.GhostBatchNorm1d(3, 2)
    for step in range(1, 4):
        layer(_input(gen, 9, (3,), dtype=torch.float32))
        assert layer.num_batches_tracked.item() == step


@pytest.mark.parametrize("v", [8, 9, 100], ids=lambda v: f"v{v}")
def test_ghost_with_one_chunk_is_batchnorm_exactly(gen, v):
    x = _input(gen, 8, (3, 4, 5), dtype=torch.float32)
    ghost = _with_params(batchnorm.GhostBatchNorm2d(3, v), gen)
    plain = batchnorm.BatchNorm2d(3)
    plain.load_state_dict(ghost.state_dict())
    grad_out = torch.randn(x.shape, generator=gen)
    for got, want in zip(_grads(ghost, x, grad_out), _grads(plain, x, grad_out), strict=True):
        assert torch.equal(got, want)
    for name, buffer in plain.named_buffers():
        assert torch.equal(ghost.get_buffer(name), buffer)


def test_ghost_without_running_statistics_changes_no_buffer_and_uses_batch_statistics(gen):
    x = _input(gen, 10, (3,))
    layer = batchnorm.GhostBatchNorm1d(3, 4, track_running_stats=False, dtype=torch.float64)
    want = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.split([4, 4, 2])])
    torch.testing.assert_close(layer(x).detach(), want, **TOL[torch.float64])
    assert layer.running_mean is None and layer.num_batches_tracked is None
    layer.eval()  # no running estimates: the whole batch's statistics, as BatchNorm
    torch.testing.assert_close(
        layer(x).detach(), F.batch_norm(x, None, None, training=True), **TOL[torch.float64]
    )


# --------------------------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_renorm_without_room_to_correct_is_torch_batchnorm_over_steps(gen, per_example, layout):
    dtype = torch.float64
    ours = RENORM[len(per_example) + 1](
        per_example[0], momentum=0.2, rmax=1.0, dmax=0.0, warmup=0, dtype=dtype
    )
    theirs = TORCH[len(per_example) + 1](per_example[0], momentum=0.2, dtype=dtype)
    _with_params(ours, gen)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(4):
        x = _input(gen, 6, per_example, layout, scale=3.0)
        grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=dtype), layout)
        for got, want in zip(_grads(ours, x, grad_out), _grads(theirs, x, grad_out), strict=True):
            torch.testing.assert_close(got, want, **TOL[dtype])
        for name, buffer in theirs.named_buffers():
            torch.testing.assert_close(ours.get_buffer(name), buffer, **TOL[dtype])
    assert ours.num_batches_tracked.item() == 4


def _renorm_reference(x, layer, grad_out, r_limit, d_limit):
    """The paper's formula with r and d constants, from torch's functional op."""
    eps = layer.eps
    dims = [0, *range(2, x.dim())]
    mean_b = x.mean(dim=dims)
    sigma_b = torch.sqrt(x.var(dim=dims, correction=0) + eps)
    sigma = torch.sqrt(layer.running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_limit, r_limit)
    d = ((mean_b - layer.running_mean) / sigma).clamp(-d_limit, d_limit)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    x = x.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x_hat = F.batch_norm(x, None, None, training=True, eps=eps)
    y = w.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + b.reshape(shape)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_renorm_with_full_limits_from_step_one_matches_the_formula(gen, per_example, layout):
    # warmup=0: the full limits at the first step. Running statistics chosen so that some
    # channels clip (r at rmax, d at -dmax) and others do not.
    c = per_example[0]
    layer = RENORM[len(per_example) + 1](
        c, rmax=1.5, dmax=0.5, warmup=0, momentum=0.3, dtype=torch.float64
    )
    _with_params(layer, gen)
    assert layer.limits() == (1.5, 0.5)
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1.0, 2.0, c, dtype=torch.float64))
        layer.running_var.copy_(torch.linspace(0.1, 4.0, c, dtype=torch.float64))
    x = _input(gen, 7, per_example, layout, scale=1.5)
    grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=torch.float64), layout)
    want = _renorm_reference(x, layer, grad_out, 1.5, 0.5)
    start_mean, start_var = layer.running_mean.clone(), layer.running_var.clone()
    got = _grads(layer, x, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(
        layer.running_mean, 0.7 * start_mean + 0.3 * x.mean(dim=dims), **TOL[torch.float64]
    )
    # Bessel's factor uses every value of a channel: N times the spatial size, not N.
    torch.testing.assert_close(
        layer.running_var,
        0.7 * start_var + 0.3 * x.var(dim=dims, correction=1),
        **TOL[torch.float64],
    )


def test_renorm_warm_up_ramps_the_limits_linearly_and_stops_at_the_configured_ones():
    layer = batchnorm.BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup=4)
    seen = []
    for k in (0, 1, 2, 4, 5, 10**9):
        layer.num_batches_tracked.fill_(k)
        seen.append(layer.limits())
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (3.0, 5.0), (3.0, 5.0), (3.0, 5.0)]


@given(
    rmax=st.floats(1.0, 10.0),
    dmax=st.floats(0.0, 10.0),
    warmup=st.integers(0, 10_000),
    step=st.integers(0, 2**62),
    log_ratio=st.lists(st.floats(-20.0, 20.0), min_size=3, max_size=3),
    offset=st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
)
def test_renorm_corrections_stay_within_the_configured_limits_at_every_step(
    rmax, dmax, warmup, step, log_ratio, offset
):
    layer = batchnorm.BatchRenorm1d(3, rmax=rmax, dmax=dmax, warmup=warmup)
    layer.num_batches_tracked.fill_(step)
    r_limit, d_limit = layer.limits()
    assert 1.0 <= r_limit <= rmax and 0.0 <= d_limit <= dmax
    if warmup == 0 or step >= warmup:
        assert (r_limit, d_limit) == (rmax, dmax)
    var = np.exp(np.array(log_ratio))
    r, d = layer.correction(np.array(offset), var)
    assert np.all(r >= 1.0 / rmax) and np.all(r <= rmax)
    assert np.all(np.abs(d) <= dmax)


def test_renorm_first_steps_of_a_warm_up_are_batchnorm(gen):
    ours = _with_params(batchnorm.BatchRenorm2d(3, momentum=0.1), gen)
    plain = batchnorm.BatchNorm2d(3, momentum=0.1)
    plain.load_state_dict(ours.state_dict())
    x = _input(gen, 4, (3, 5, 5), dtype=torch.float32, scale=4.0)
    assert torch.equal(ours(x), plain(x))  # step 1 of 5000: limits (1, 0)
    for name, buffer in plain.named_buffers():
        assert torch.equal(ours.get_buffer(name), buffer)


def test_renorm_without_running_statistics_is_batchnorm(gen):
    layer = batchnorm.BatchRenorm1d(3, warmup=0, track_running_stats=False)
    x = _input(gen, 6, (3,), dtype=torch.float32, scale=3.0)
    assert torch.equal(layer(x), batchnorm.BatchNorm1d(3, track_running_stats=False)(x))


# --------------------------------------------------------------------------------------------
# Both: evaluation, state, checks, gradcheck
# --------------------------------------------------------------------------------------------

VARIANTS = [
    (batchnorm.GhostBatchNorm1d, {"virtual_batch_size": 2}, (3,)),
    (batchnorm.GhostBatchNorm2d, {"virtual_batch_size": 2}, (3, 4, 4)),
    (batchnorm.GhostBatchNorm3d, {"virtual_batch_size": 2}, (3, 2, 3, 3)),
    (batchnorm.BatchRenorm1d, {"warmup": 0}, (3,)),
    (batchnorm.BatchRenorm2d, {"warmup": 0}, (3, 4, 4)),
    (batchnorm.BatchRenorm3d, {"warmup": 0}, (3, 2, 3, 3)),
]
VARIANT_IDS = [cls.__name__ for cls, _, _ in VARIANTS]


def _trained(cls, kwargs, per_example, gen, steps=3):
    layer = _with_params(cls(per_example[0], **kwargs, dtype=torch.float64), gen)
    for _ in range(steps):
        layer(_input(gen, 7, per_example, scale=2.0))
    return layer


@pytest.mark.parametrize(("cls", "kwargs", "per_example"), VARIANTS, ids=VARIANT_IDS)
def test_variant_evaluation_is_batchnorm_evaluation(gen, cls, kwargs, per_example):
    layer = _trained(cls, kwargs, per_example, gen).eval()
    x = _input(gen, 5, per_example)
    want = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), want, **TOL[torch.float64])
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize(("cls", "kwargs", "per_example"), VARIANTS, ids=VARIANT_IDS)
def test_variant_state_dict_round_trips_with_torch_batchnorm_both_ways(
    gen, cls, kwargs, per_example
):
    ours = _trained(cls, kwargs, per_example, gen)
    theirs = TORCH[len(per_example) + 1](per_example[0], dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value)
    fresh = cls(per_example[0], **kwargs, dtype=torch.float64)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert theirs._version == ours._version == fresh._version


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: batchnorm.GhostBatchNorm2d(3, 0), ValueError, "virtual_batch_size"),
        (lambda: batchnorm.GhostBatchNorm2d(3, -4), ValueError, "virtual_batch_size"),
        (lambda: batchnorm.GhostBatchNorm2d(3, 2.0), TypeError, "virtual_batch_size"),
        (lambda: batchnorm.GhostBatchNorm2d(3, True), TypeError, "virtual_batch_size"),
        (lambda: batchnorm.GhostBatchNorm2d(3, 2, momentum=2.0), ValueError, "momentum"),
        (lambda: batchnorm.BatchRenorm2d(3, rmax=0.5), ValueError, "rmax"),
        (lambda: batchnorm.BatchRenorm2d(3, rmax=math.inf), ValueError, "rmax"),
        (lambda: batchnorm.BatchRenorm2d(3, rmax="3"), TypeError, "rmax"),
        (lambda: batchnorm.BatchRenorm2d(3, dmax=-0.1), ValueError, "dmax"),
        (lambda: batchnorm.BatchRenorm2d(3, dmax=math.nan), ValueError, "dmax"),
        (lambda: batchnorm.BatchRenorm2d(3, warmup=-1), ValueError, "warmup"),
        (lambda: batchnorm.BatchRenorm2d(3, warmup=10.0), TypeError, "warmup"),
        (lambda: batchnorm.BatchRenorm2d(0), ValueError, "num_features"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_variant_constructor_rejects_bad_arguments_by_name(build, error, match):
    with pytest.raises(error, match=match):
        build()


BAD_INPUTS = [
    ("wrong-rank", lambda x: x[:, :, 0], ValueError, r"expected 4-D"),
    ("wrong-channels", lambda x: x[:, :2], ValueError, r"expected .*\b3 channels"),
    ("one-value", lambda x: x[:1, :, :1, :1], ValueError, "more than 1 value per channel"),
    ("integer", lambda x: x.long(), TypeError, "floating"),
    ("dtype", lambda x: x.float(), TypeError, "dtype"),
]


@pytest.mark.parametrize("cls", [batchnorm.GhostBatchNorm2d, batchnorm.BatchRenorm2d])
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_forward_rejects_bad_input_without_touching_state(gen, cls, bad, error, match):
    kwargs = {"virtual_batch_size": 2} if cls is batchnorm.GhostBatchNorm2d else {"warmup": 0}
    layer = _trained(cls, kwargs, (3, 4, 4), gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(bad(_input(gen, 6, (3, 4, 4))))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_ghost_refuses_chunks_of_one_value_per_channel_without_touching_state(gen, masked):
    layer = batchnorm.GhostBatchNorm1d(3, 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = torch.tensor([True, False, True, True, True, True]) if masked else None
    with pytest.raises(ValueError, match=r"more than 1 value per channel in each ghost batch"):
        layer(_input(gen, 6, (3,), dtype=torch.float32), mask=mask)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_ghost_gradcheck_float64(gen):
    layer = _with_params(batchnorm.GhostBatchNorm1d(2, 2, dtype=torch.float64), gen)
    # Chunks of 2, 2 and 3 (a merged remainder): regrouped chunks and a chunk of its own.
    x = _input(gen, 7, (2, 3)).requires_grad_(True)
    # The layer's own parameters are gradcheck's inputs: its perturbations reach the layer.
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


def test_renorm_gradcheck_float64(gen):
    # momentum=0 keeps the running statistics the same across calls, and they are far enough
    # from the batch's that r and d sit at their limits in every channel: constants there, as
    # the backward treats them, so finite differences see the same function.
    layer = _with_params(
        batchnorm.BatchRenorm2d(2, momentum=0.0, rmax=1.2, dmax=0.3, warmup=0, dtype=torch.float64),
        gen,
    )
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([10.0, -10.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([100.0, 1e-3], dtype=torch.float64))
    x = _input(gen, 3, (2, 2, 2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


# --------------------------------------------------------------------------------------------
# The tools: variants are BatchNorm layers of their family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs", "per_example"), VARIANTS, ids=VARIANT_IDS)
def test_variants_belong_to_the_family_of_their_rank(cls, kwargs, per_example):
    family = family_of(cls)
    assert cls in family.variants and family.torch is TORCH[len(per_example) + 1]


def test_convert_to_torch_warns_and_keeps_evaluation(gen):
    net = torch.nn.Sequential(
        batchnorm.GhostBatchNorm2d(3, 2, dtype=torch.float64),
        batchnorm.BatchRenorm2d(3, warmup=0, dtype=torch.float64),
    )
    for _ in range(2):
        net(_input(gen, 6, (3, 4, 4)))
    net.eval()
    x = _input(gen, 4, (3, 4, 4))
    want = net(x)
    with pytest.warns(UserWarning, match=r"'0' \(GhostBatchNorm2d\), '1' \(BatchRenorm2d\)"):
        batchnorm.convert(net, to="torch")
    assert [type(m) for m in net] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d]
    torch.testing.assert_close(net(x), want, **TOL[torch.float64])


def test_convert_to_batchnorm_leaves_variants_alone():
    net = torch.nn.Sequential(batchnorm.GhostBatchNorm1d(3, 2), torch.nn.BatchNorm1d(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batchnorm.convert(net)
    assert [type(m) for m in net] == [batchnorm.GhostBatchNorm1d, batchnorm.BatchNorm1d]


def test_convert_sync_batchnorm_refuses_variants():
    with pytest.raises(TypeError, match="GhostBatchNorm2d"):
        batchnorm.convert_sync_batchnorm(torch.nn.Sequential(batchnorm.GhostBatchNorm2d(3, 2)))


@pytest.mark.parametrize(("cls", "kwargs", "per_example"), VARIANTS, ids=VARIANT_IDS)
def test_freeze_and_unfreeze_keep_a_variant_and_its_arguments(gen, cls, kwargs, per_example):
    layer = _trained(cls, kwargs, per_example, gen).eval()
    x = _input(gen, 4, per_example)
    want = layer(x)
    net = batchnorm.freeze(torch.nn.Sequential(layer))
    assert type(net[0]) is family_of(cls).frozen
    torch.testing.assert_close(net(x), want, **TOL[torch.float64])
    net = batchnorm.unfreeze(net)
    assert type(net[0]) is cls and net[0].variant_arguments() == layer.variant_arguments()
    assert net[0].momentum == layer.momentum


def test_fold_folds_a_variant_in_evaluation(gen):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, dtype=torch.float64),
        batchnorm.GhostBatchNorm2d(3, 2, dtype=torch.float64),
    )
    for _ in range(2):
        net(_input(gen, 6, (2, 6, 6)))
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = batchnorm.fold(net)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert batchnorm.check_fold(net, folded, _input(gen, 4, (2, 6, 6))) < 1e-10


@pytest.mark.parametrize("cls", [batchnorm.GhostBatchNorm1d, batchnorm.BatchRenorm1d])
def test_recompute_statistics_treats_a_variant_as_batchnorm(gen, cls):
    kwargs = {"virtual_batch_size": 2} if cls is batchnorm.GhostBatchNorm1d else {}
    layer = cls(3, **kwargs, dtype=torch.float64)
    data = [_input(gen, 5, (3,), scale=2.0) for _ in range(3)]
    batchnorm.recompute_statistics(torch.nn.Sequential(layer), data, progress=False)
    everything = torch.cat(data)
    torch.testing.assert_close(layer.running_mean, everything.mean(0), **TOL[torch.float64])
    torch.testing.assert_close(
        layer.running_var, everything.var(0, correction=1), **TOL[torch.float64]
    )
    assert type(layer) is cls


def test_docstring_examples_run():
    import doctest

    import batchnorm.variants

    result = doctest.testmod(batchnorm.variants, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------
# Batch renormalization with a mask of real values; the single_value policy
# --------------------------------------------------------------------------------------------


def _renorm_mask(n, per_example, gen, keep=0.6):
    """A mask of real values, ``(N, *spatial)``, with at least 2 real and 1 padded position."""
    mask = torch.rand((n, *per_example[1:]), generator=gen) < keep
    flat = mask.view(-1)
    flat[:2] = True
    flat[-1] = False
    return mask


def _real(t, mask):
    """The values at real positions, ``(R, C)``: what BatchNorm of the real values sees."""
    return t.movedim(1, -1)[mask]


def _padded(n, per_example, mask, gen, garbage, layout="contiguous"):
    x = _input(gen, n, per_example, scale=2.0)
    x.movedim(1, -1)[~mask] = garbage
    return make_layout(x, layout)


def _gathered_renorm_reference(layer, x, mask, grad_out, r_limit, d_limit):
    """Renorm of the real values in float64: r and d computed directly, then constants."""
    real = _real(x.detach(), mask).clone().requires_grad_(True)
    eps = layer.eps
    mean_b = real.mean(0)
    sigma_b = torch.sqrt(real.var(0, correction=0) + eps)
    sigma = torch.sqrt(layer.running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_limit, r_limit).detach()
    d = ((mean_b - layer.running_mean) / sigma).clamp(-d_limit, d_limit).detach()
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    x_hat = F.batch_norm(real, None, None, training=True, eps=eps)
    y = w * (x_hat * r + d) + b
    y.backward(_real(grad_out, mask))
    return y.detach(), real.grad, w.grad, b.grad


GARBAGE = [0.0, math.nan, 1e30]


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_renorm_mask_without_room_to_correct_is_batchnorm_of_the_real_values(
    gen, per_example, layout, garbage
):
    dtype = torch.float64
    layer = RENORM[len(per_example) + 1](
        per_example[0], momentum=0.3, rmax=1.0, dmax=0.0, warmup=0, dtype=dtype
    )
    _with_params(layer, gen)
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    mask = _renorm_mask(7, per_example, gen)
    x = _padded(7, per_example, mask, gen, garbage, layout)
    grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=dtype), layout)
    y, dx, dw, db = _grads(layer, x, grad_out, mask=mask)

    real = _real(x, mask).clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    want = F.batch_norm(real, running_mean, running_var, w, b, True, 0.3, layer.eps)
    want.backward(_real(grad_out, mask))
    for got, expected in ((_real(y, mask), want), (_real(dx, mask), real.grad), (dw, w.grad)):
        torch.testing.assert_close(got, expected.detach(), **TOL[dtype])
    torch.testing.assert_close(db, b.grad, **TOL[dtype])
    assert torch.equal(_real(y, ~mask), torch.zeros_like(_real(y, ~mask)))
    assert torch.equal(_real(dx, ~mask), torch.zeros_like(_real(dx, ~mask)))
    torch.testing.assert_close(layer.running_mean, running_mean, **TOL[dtype])
    torch.testing.assert_close(layer.running_var, running_var, **TOL[dtype])
    assert layer.num_batches_tracked.item() == 1
    assert y.is_contiguous(memory_format=_layout_format(x))


def _layout_format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_renorm_mask_with_full_limits_matches_a_float64_computation_of_r_and_d(
    gen, per_example, layout, garbage
):
    # Running statistics chosen so that some channels clip (r, d at a limit) and others not.
    c, dtype = per_example[0], torch.float64
    layer = RENORM[len(per_example) + 1](c, rmax=1.5, dmax=0.5, warmup=0, momentum=0.3, dtype=dtype)
    _with_params(layer, gen)
    with torch.no_grad():
        layer.running_mean.copy_(torch.linspace(-1.0, 2.0, c, dtype=dtype))
        layer.running_var.copy_(torch.linspace(0.1, 4.0, c, dtype=dtype))
    start_mean, start_var = layer.running_mean.clone(), layer.running_var.clone()
    mask = _renorm_mask(8, per_example, gen)
    x = _padded(8, per_example, mask, gen, garbage, layout)
    grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=dtype), layout)
    want = _gathered_renorm_reference(layer, x, mask, grad_out, 1.5, 0.5)
    y, dx, dw, db = _grads(layer, x, grad_out, mask=mask)
    for got, expected in zip((_real(y, mask), _real(dx, mask), dw, db), want, strict=True):
        torch.testing.assert_close(got, expected, **TOL[dtype])
    assert torch.equal(_real(y, ~mask), torch.zeros_like(_real(y, ~mask)))
    assert torch.equal(_real(dx, ~mask), torch.zeros_like(_real(dx, ~mask)))
    # The running update sees the real values only; Bessel's factor counts them.
    real = _real(x, mask)
    torch.testing.assert_close(
        layer.running_mean, 0.7 * start_mean + 0.3 * real.mean(0), **TOL[dtype]
    )
    torch.testing.assert_close(
        layer.running_var, 0.7 * start_var + 0.3 * real.var(0, correction=1), **TOL[dtype]
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("per_example", "layout"), CASES, ids=CASE_IDS)
def test_renorm_mask_of_all_true_is_the_unmasked_call_bit_for_bit(
    gen, per_example, layout, training
):
    dtype = torch.float32
    masked = RENORM[len(per_example) + 1](per_example[0], warmup=0, momentum=0.2)
    _with_params(masked, gen)
    with torch.no_grad():
        masked.running_mean.uniform_(-1.0, 1.0, generator=gen)
        masked.running_var.uniform_(0.2, 3.0, generator=gen)
    plain = RENORM[len(per_example) + 1](per_example[0], warmup=0, momentum=0.2)
    plain.load_state_dict(masked.state_dict())
    masked.train(training)
    plain.train(training)
    x = _input(gen, 6, per_example, layout, dtype=dtype, scale=2.0)
    grad_out = make_layout(torch.randn(x.shape, generator=gen, dtype=dtype), layout)
    mask = torch.ones((6, *per_example[1:]), dtype=torch.bool)
    got = _grads(masked, x, grad_out, mask=mask)
    for a, b in zip(got, _grads(plain, x, grad_out), strict=True):
        assert torch.equal(a, b)
    for name, buffer in plain.named_buffers():
        assert torch.equal(masked.get_buffer(name), buffer)


def test_renorm_mask_in_evaluation_uses_running_statistics_and_zeroes_padding(gen):
    layer = _trained(batchnorm.BatchRenorm2d, {"warmup": 0}, (3, 4, 4), gen).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = _renorm_mask(5, (3, 4, 4), gen)
    x = _padded(5, (3, 4, 4), mask, gen, math.nan)
    y = layer(x, mask=mask)
    want = F.batch_norm(
        _real(x, mask), layer.running_mean, layer.running_var, layer.weight, layer.bias,
        False, 0.0, layer.eps,
    )  # fmt: skip
    torch.testing.assert_close(_real(y, mask), want, **TOL[torch.float64])
    assert torch.equal(_real(y, ~mask), torch.zeros_like(_real(y, ~mask)))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_renorm_mask_without_running_statistics_is_masked_batchnorm(gen):
    layer = batchnorm.BatchRenorm1d(3, warmup=0, track_running_stats=False)
    plain = batchnorm.BatchNorm1d(3, track_running_stats=False)
    mask = _renorm_mask(6, (3, 5), gen)
    x = _padded(6, (3, 5), mask, gen, math.inf).float()
    assert torch.equal(layer(x, mask=mask), plain(x, mask=mask))


BAD_MASKS = [
    ("float", lambda m: m.double(), TypeError),
    ("list", lambda m: m.tolist(), TypeError),
    ("with-channels", lambda m: m.unsqueeze(1).expand(-1, 3, -1, -1), ValueError),
    ("short", lambda m: m[:-1], ValueError),
    ("flat", lambda m: m.reshape(-1), ValueError),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("bad", "error"), [case[1:] for case in BAD_MASKS], ids=[case[0] for case in BAD_MASKS]
)
def test_renorm_rejects_a_bad_mask_by_name_without_touching_state(gen, bad, error, training):
    layer = _trained(batchnorm.BatchRenorm2d, {"warmup": 0}, (3, 4, 4), gen).train(training)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = _renorm_mask(6, (3, 4, 4), gen)
    with pytest.raises(error, match=r"BatchRenorm2d.*expected mask"):
        layer(_input(gen, 6, (3, 4, 4)), mask=bad(mask))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_renorm_mask_gradcheck_float64(gen):
    # As test_renorm_gradcheck_float64: r and d at their limits in every channel, constants
    # under the perturbations; the mask leaves 5 of 12 positions per channel out.
    layer = _with_params(
        batchnorm.BatchRenorm2d(2, momentum=0.0, rmax=1.2, dmax=0.3, warmup=0, dtype=torch.float64),
        gen,
    )
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([10.0, -10.0], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([100.0, 1e-3], dtype=torch.float64))
    mask = torch.tensor([[[1, 0], [1, 1]], [[0, 1], [1, 0]], [[1, 0], [0, 1]]], dtype=torch.bool)
    x = _input(gen, 3, (2, 2, 2)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer(x, mask=mask), (x, layer.weight, layer.bias)
    )


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_renorm_one_value_per_channel_raises_by_default_without_touching_state(gen, masked):
    layer = _trained(batchnorm.BatchRenorm1d, {"warmup": 0}, (3, 4), gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    kwargs = {}
    if masked:
        x = _input(gen, 5, (3, 4))
        kwargs["mask"] = torch.zeros(5, 4, dtype=torch.bool)
        kwargs["mask"][2, 1] = True  # one real value per channel
    else:
        x = _input(gen, 1, (3, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_renorm_single_value_use_running_normalizes_with_running_statistics(gen, masked):
    layer = batchnorm.BatchRenorm1d(
        3, warmup=0, momentum=0.5, dtype=torch.float64, single_value="use_running"
    )
    _with_params(layer, gen)
    for _ in range(2):
        layer(_input(gen, 5, (3, 4), scale=2.0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    if masked:
        mask = torch.zeros(5, 4, dtype=torch.bool)
        mask[2, 1] = True
        x = _padded(5, (3, 4), mask, gen, math.nan)
        y = layer(x, mask=mask)
        assert torch.equal(_real(y, ~mask), torch.zeros_like(_real(y, ~mask)))
        x, y = _real(x, mask), _real(y, mask)
    else:
        x = _input(gen, 1, (3,))
        y = layer(x)
    want = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert "single_value='use_running'" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"single_value": "ignore"}, ValueError),
        ({"single_value": "use_running", "track_running_stats": False}, ValueError),
    ],
    ids=["unknown", "without-running-statistics"],
)
def test_renorm_constructor_checks_single_value_by_name(kwargs, error):
    with pytest.raises(error, match="single_value"):
        batchnorm.BatchRenorm2d(3, **kwargs)


# --------------------------------------------------------------------------------------------
# Ghost batch norm: the grouped kernels' path, and a mask of real values
# --------------------------------------------------------------------------------------------


def test_ghost_gradgradcheck_float64(gen):
    # Double backward through the grouped kernels' function recomputes each chunk in torch ops.
    layer = _with_params(batchnorm.GhostBatchNorm1d(2, 2, dtype=torch.float64), gen)
    x = _input(gen, 7, (2, 3)).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


def test_ghost_grouped_path_keeps_a_small_spread_about_a_large_mean(gen):
    x = 1e4 + 1e-2 * torch.randn(16, 3, 6, 6, generator=gen)
    layer = batchnorm.GhostBatchNorm2d(3, 4, momentum=1.0)
    y = layer(x)
    want = torch.cat([F.batch_norm(c.double(), None, None, training=True) for c in x.split(4)])
    torch.testing.assert_close(y.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(
        layer.running_var.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-6, atol=0
    )


def _ghost_mask(n, spatial, gen, keep=0.7):
    """A mask of real values with at least 2 real positions in every chunk of 4 examples."""
    mask = torch.rand((n, *spatial), generator=gen) < keep
    flat = mask.view(n, -1)
    flat[::2, 0] = True  # two examples of every chunk of 4 keep a real value
    flat[-1, -1] = False
    return mask


def _ghost_padded(x, mask, garbage):
    x = x.clone()
    x.movedim(1, -1)[~mask] = garbage
    return x


def _per_chunk_masked_reference(x, mask, sizes, layer, grad_out):
    """Masked BatchNorm (the package's, no running statistics) of each chunk alone."""
    bn = TORCH[x.dim()]
    plain = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[x.dim()]
    assert bn is not None
    ref = plain(x.shape[1], track_running_stats=False, dtype=x.dtype)
    ref.load_state_dict(
        {"weight": layer.weight.detach(), "bias": layer.bias.detach()}, strict=False
    )
    xr = x.detach().clone().requires_grad_(True)
    y = torch.cat([ref(c, mask=m) for c, m in zip(xr.split(sizes), mask.split(sizes), strict=True)])
    y.backward(grad_out)
    return y.detach(), xr.grad, ref.weight.grad, ref.bias.grad


@pytest.mark.parametrize("garbage", [0.0, math.nan, 1e30], ids=str)
@pytest.mark.parametrize(
    ("per_example", "layout"),
    [((3,), "contiguous"), ((3, 5), "contiguous"), ((3, 2, 3), "channels_last")],
    ids=["1d", "1d-L", "2d-channels_last"],
)
def test_ghost_mask_is_masked_batchnorm_of_each_chunk(gen, per_example, layout, garbage):
    n = 10  # chunks of 4, 4 and 2 examples
    mask = _ghost_mask(n, per_example[1:], gen)
    if not per_example[1:]:
        mask = torch.ones(n, dtype=torch.bool)
        mask[[1, 6]] = False
    x = make_layout(_ghost_padded(_input(gen, n, per_example), mask, garbage), layout)
    layer = _with_params(GHOST[x.dim()](per_example[0], 4, dtype=torch.float64), gen)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    got = _grads(layer, x, grad_out, mask=mask)
    want = _per_chunk_masked_reference(x, mask, [4, 4, 2], layer, grad_out)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    padding = ~mask.unsqueeze(1).expand_as(x)
    assert torch.equal(got[0][padding], torch.zeros_like(got[0][padding]))
    assert torch.equal(got[1][padding], torch.zeros_like(got[1][padding]))
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_ghost_mask_chunk_with_fewer_than_two_real_values_uses_the_batch_statistics(gen):
    # Chunks [0:4], [4:8], [8:10]; the second keeps one real value, the third none.
    x = _input(gen, 10, (3,), scale=2.0)
    mask = torch.ones(10, dtype=torch.bool)
    mask[[4, 5, 7, 8, 9]] = False
    layer = _with_params(batchnorm.GhostBatchNorm1d(3, 4, dtype=torch.float64), gen)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    got = _grads(layer, x, grad_out, mask=mask)
    xr = x.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    real = xr[mask]
    batch_mean, batch_var = real.mean(0), real.var(0, correction=0)
    first = F.batch_norm(xr[:4], None, None, w, b, training=True, eps=layer.eps)
    rest = (xr[4:] - batch_mean) / torch.sqrt(batch_var + layer.eps) * w + b
    y = torch.cat([first, rest]) * mask.unsqueeze(1)
    y.backward(grad_out)
    for g, want in zip(got, (y.detach(), xr.grad, w.grad, b.grad), strict=True):
        torch.testing.assert_close(g, want, **TOL[torch.float64])


@pytest.mark.parametrize("momentum", [0.3, None], ids=str)
def test_ghost_mask_running_statistics_move_towards_the_real_values_once(gen, momentum):
    mask = _ghost_mask(10, (5,), gen)
    x = _ghost_padded(_input(gen, 10, (3, 5), scale=2.0), mask, math.nan)
    layer = batchnorm.GhostBatchNorm1d(3, 4, momentum=momentum, dtype=torch.float64)
    start_mean, start_var = layer.running_mean.clone(), layer.running_var.clone()
    layer(x, mask=mask)
    real = x.movedim(1, -1)[mask]
    weight = 1.0 if momentum is None else momentum
    tol = TOL[torch.float64]
    torch.testing.assert_close(
        layer.running_mean, (1 - weight) * start_mean + weight * real.mean(0), **tol
    )
    torch.testing.assert_close(
        layer.running_var, (1 - weight) * start_var + weight * real.var(0, correction=1), **tol
    )
    assert layer.num_batches_tracked.item() == 1


def test_ghost_mask_of_all_true_is_the_unmasked_call_bit_for_bit(gen):
    x = _input(gen, 10, (3, 4, 4), dtype=torch.float32)
    masked = _with_params(batchnorm.GhostBatchNorm2d(3, 4), gen)
    plain = batchnorm.GhostBatchNorm2d(3, 4)
    plain.load_state_dict(masked.state_dict())
    grad_out = torch.randn(x.shape, generator=gen)
    mask = torch.ones(10, 4, 4, dtype=torch.bool)
    for got, want in zip(
        _grads(masked, x, grad_out, mask=mask), _grads(plain, x, grad_out), strict=True
    ):
        assert torch.equal(got, want)
    for name, buffer in plain.named_buffers():
        assert torch.equal(masked.get_buffer(name), buffer)


@pytest.mark.parametrize("n", [5, 10], ids=["one-chunk", "chunks"])
def test_ghost_mask_in_evaluation_or_one_chunk_is_masked_batchnorm(gen, n):
    mask = _ghost_mask(n, (5,), gen)
    x = _input(gen, n, (3, 5), scale=2.0)
    ghost = _trained(batchnorm.GhostBatchNorm1d, {"virtual_batch_size": 4}, (3, 5), gen)
    plain = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    plain.load_state_dict(ghost.state_dict())
    for training in [True, False] if n == 5 else [False]:
        ghost.train(training)
        plain.train(training)
        assert torch.equal(ghost(x, mask=mask), plain(x, mask=mask))
        for name, buffer in plain.named_buffers():
            assert torch.equal(ghost.get_buffer(name), buffer)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (lambda m: m.float(), TypeError),
        (lambda m: m[:-1], ValueError),
        (lambda m: m.reshape(-1), ValueError),
    ],
    ids=["float", "short", "flat"],
)
def test_ghost_rejects_a_bad_mask_without_touching_state(gen, bad, error):
    layer = _trained(batchnorm.GhostBatchNorm2d, {"virtual_batch_size": 2}, (3, 4, 4), gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = torch.ones(6, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    with pytest.raises(error, match=r"GhostBatchNorm2d.*mask"):
        layer(_input(gen, 6, (3, 4, 4)), mask=bad(mask))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_ghost_mask_with_fewer_than_two_real_values_raises_without_touching_state(gen):
    layer = _trained(batchnorm.GhostBatchNorm1d, {"virtual_batch_size": 2}, (3,), gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = torch.zeros(6, dtype=torch.bool)
    mask[3] = True
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(_input(gen, 6, (3,)), mask=mask)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_ghost_mask_gradcheck_float64(gen):
    layer = _with_params(batchnorm.GhostBatchNorm1d(2, 2, dtype=torch.float64), gen)
    mask = torch.ones(7, 3, dtype=torch.bool)
    mask[0, 1] = mask[3, :] = mask[4, 0] = mask[6, 2] = False  # chunk 2 keeps one real value
    x = _input(gen, 7, (2, 3)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: layer(x, mask=mask), (x, layer.weight, layer.bias)
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch-route"])
def test_ghost_every_layout_and_route_is_batchnorm_of_each_chunk(gen, layout, kernels):
    # Contiguous and channels-last input take the grouped kernels (channels-last through a
    # contiguous copy); strided input and torch's route run BatchNorm on each chunk in turn.
    x = make_layout(_input(gen, 10, (3, 4, 5)), layout)
    layer = _with_params(batchnorm.GhostBatchNorm2d(3, 4, dtype=torch.float64), gen)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with use_routing(kernels=kernels):
        got = _grads(layer, x, grad_out)
    want = _per_chunk_reference(x, [4, 4, 2], layer.weight, layer.bias, layer.eps, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        layer.running_mean, 0.1 * x.mean(dim=(0, 2, 3)), **TOL[torch.float64]
    )


def test_ghost_single_value_policy_is_batchnorms():
    # One example with no spatial extent: one value per channel. "raise" is torch's refusal;
    # "use_running" normalizes with the running statistics and leaves them and the counter.
    x = torch.randn(1, 3)
    strict = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        strict(x)
    assert strict.num_batches_tracked.item() == 0
    lenient = batchnorm.GhostBatchNorm1d(3, virtual_batch_size=4, single_value="use_running")
    lenient.running_mean.fill_(0.5)
    lenient.running_var.fill_(4.0)
    y = lenient(x)
    expected = (x - 0.5) / torch.sqrt(torch.tensor(4.0 + lenient.eps))
    torch.testing.assert_close(y, expected)
    assert lenient.num_batches_tracked.item() == 0
    assert torch.equal(lenient.running_mean, torch.full((3,), 0.5))
