"""``batchnorm.functional.batch_norm`` against ``torch.nn.functional.batch_norm`` and reference.py.

Two oracles per check: torch in the same dtype (drop-in parity) and the NumPy float64 spec in
``reference.py`` (correctness; compared in float64 with the tolerance of the input's dtype).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm import _stages, reference
from batchnorm._validate import NonFiniteStatisticsWarning
from batchnorm.functional import backend_for, batch_norm
from conftest import (
    DTYPES,
    LAYOUTS,
    SHAPES,
    TOL,
    from_np,
    labelled,
    make_input,
    make_layout,
    shape_id,
    to_np64,
)

EPS = 1e-5


def _channel_tensors(c, dtype, gen):
    """weight, bias, running_mean, running_var with non-trivial values."""
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    running_var = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    return weight, bias, running_mean, running_var


def _leaf(t, layout="contiguous"):
    """A fresh leaf copy of ``t`` (or None) in ``layout`` that records its gradient."""
    if t is None:
        return None
    return make_layout(t.detach().clone(), layout).requires_grad_(True)


def _run(fn, x, layout, running_mean, running_var, weight, bias, grad, **kwargs):
    """Forward + backward through ``fn``; returns output, gradients and the running buffers.

    Running buffers are cloned first so that both implementations start from the same values.
    ``grad=None`` backpropagates ``y.sum()`` (an expanded, stride-0 gradient).
    """
    xl, wl, bl = _leaf(x, layout), _leaf(weight), _leaf(bias)
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    y = fn(xl, rm, rv, wl, bl, **kwargs)
    if grad is None:
        y.sum().backward()
    else:
        y.backward(grad)
    grads = (xl.grad, None if wl is None else wl.grad, None if bl is None else bl.grad)
    return y.detach(), grads, rm, rv


def _assert_matches(ours, theirs, dtype):
    (y, grads, rm, rv), (ty, tgrads, trm, trv) = ours, theirs
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ty.shape
    torch.testing.assert_close(y, ty, **tol)
    for got, want in zip(grads, tgrads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **tol)
    if trm is not None:
        torch.testing.assert_close(rm, trm, **tol)
        torch.testing.assert_close(rv, trv, **tol)


def _reference_train(x, weight, bias, running_mean, running_var, grad, momentum):
    """(y, (dx, dweight, dbias), running_mean, running_var) from reference.py, float64."""
    gamma = None if weight is None else to_np64(weight)
    beta = None if bias is None else to_np64(bias)
    y, mu_B, sigma2_B = reference.batch_norm_train(to_np64(x), gamma, beta, EPS)
    dx, dgamma, dbeta = reference.batch_norm_train_backward(to_np64(grad), to_np64(x), gamma, EPS)
    grads = (dx, None if weight is None else dgamma, None if bias is None else dbeta)
    rm = rv = None
    if running_mean is not None:
        m = x.numel() // x.shape[1]
        rm, rv = reference.update_running_statistics(
            to_np64(running_mean), to_np64(running_var), mu_B, sigma2_B, m, momentum
        )
    return y, grads, rm, rv


def _reference_eval(x, weight, bias, running_mean, running_var, grad):
    gamma = None if weight is None else to_np64(weight)
    beta = None if bias is None else to_np64(bias)
    mean, var = to_np64(running_mean), to_np64(running_var)
    y = reference.batch_norm_inference(to_np64(x), mean, var, gamma, beta, EPS)
    dx, dgamma, dbeta = reference.batch_norm_inference_backward(
        to_np64(grad), to_np64(x), mean, var, gamma, EPS
    )
    grads = (dx, None if weight is None else dgamma, None if bias is None else dbeta)
    return y, grads, mean, var


def _assert_matches_reference(ours, ref, dtype):
    (y, grads, rm, rv), (ry, rgrads, rrm, rrv) = ours, ref
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), from_np(ry), **tol)
    for got, want in zip(grads, rgrads, strict=True):
        if want is not None:
            torch.testing.assert_close(got.double(), from_np(want), **tol)
    if rrm is not None:
        torch.testing.assert_close(rm.double(), from_np(rrm), **tol)
        torch.testing.assert_close(rv.double(), from_np(rrv), **tol)


# --- forward, backward and running statistics ------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_batch_norm_matches_torch_and_reference(shape, dtype, layout, training, affine, gen):
    c = shape[1]
    x = make_input(shape, dtype, layout, gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight, bias, rm, rv = _channel_tensors(c, dtype, gen)
    if not affine:
        weight = bias = None
    kwargs = dict(training=training, momentum=0.1, eps=EPS)

    ours = _run(batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    theirs = _run(F.batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    _assert_matches(ours, theirs, dtype)

    if training:
        ref = _reference_train(x, weight, bias, rm, rv, grad, momentum=0.1)
    else:
        ref = _reference_eval(x, weight, bias, rm, rv, grad)
    _assert_matches_reference(ours, ref, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 5, 6), (5, 2, 3, 4, 3)], ids=shape_id)
def test_batch_norm_training_without_running_stats_matches_torch(shape, dtype, layout, gen):
    x = make_input(shape, dtype, layout, gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight, bias, _, _ = _channel_tensors(shape[1], dtype, gen)
    kwargs = dict(training=True, momentum=0.1, eps=EPS)

    ours = _run(batch_norm, x, layout, None, None, weight, bias, grad, **kwargs)
    theirs = _run(F.batch_norm, x, layout, None, None, weight, bias, grad, **kwargs)
    _assert_matches(ours, theirs, dtype)
    _assert_matches_reference(ours, _reference_train(x, weight, bias, None, None, grad, 0.1), dtype)


@pytest.mark.parametrize("which", ["weight_only", "bias_only"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_with_one_affine_tensor_matches_torch(which, training, gen):
    dtype = torch.float64
    x = make_input((6, 4, 3), dtype, "contiguous", gen)
    grad = torch.randn(x.shape, generator=gen, dtype=dtype)
    weight, bias, rm, rv = _channel_tensors(4, dtype, gen)
    if which == "weight_only":
        bias = None
    else:
        weight = None
    kwargs = dict(training=training, momentum=0.1, eps=EPS)
    ours = _run(batch_norm, x, "contiguous", rm, rv, weight, bias, grad, **kwargs)
    theirs = _run(F.batch_norm, x, "contiguous", rm, rv, weight, bias, grad, **kwargs)
    _assert_matches(ours, theirs, dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_running_stats_follow_momentum(momentum, layout, dtype, gen):
    shape = (4, 3, 5, 6)
    x = make_input(shape, dtype, layout, gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight, bias, rm, rv = _channel_tensors(3, dtype, gen)
    kwargs = dict(training=True, momentum=momentum, eps=EPS)
    ours = _run(batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    theirs = _run(F.batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    _assert_matches(ours, theirs, dtype)
    ref = _reference_train(x, weight, bias, rm, rv, grad, momentum)
    _assert_matches_reference(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_momentum_none_is_cumulative_average(dtype, gen):
    """momentum=None over 3 equal-size batches: torch's module rule, and Algorithm 2's estimate.

    The factor is 1/num_batches_tracked, so the running mean is the average of the batch means
    and the running variance the average of the unbiased batch variances, which is
    ``population_statistics(method="paper")`` for equal batch sizes.
    """
    shape = (4, 3, 5, 6)
    batches = [make_input(shape, dtype, "contiguous", gen, scale=2.0, offset=1.0) for _ in range(3)]
    rm = torch.zeros(3, dtype=dtype)
    rv = torch.ones(3, dtype=dtype)
    nbt = torch.tensor(0, dtype=torch.long)
    torch_bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False, dtype=dtype)
    for x in batches:
        y = batch_norm(x, rm, rv, training=True, momentum=None, eps=EPS, num_batches_tracked=nbt)
        torch.testing.assert_close(y, torch_bn(x), **TOL[dtype])
    assert nbt.item() == 3 == torch_bn.num_batches_tracked.item()
    torch.testing.assert_close(rm, torch_bn.running_mean, **TOL[dtype])
    torch.testing.assert_close(rv, torch_bn.running_var, **TOL[dtype])
    mean, var_unbiased = reference.population_statistics([to_np64(b) for b in batches], "paper")
    torch.testing.assert_close(rm.double(), from_np(mean), **TOL[dtype])
    torch.testing.assert_close(rv.double(), from_np(var_unbiased), **TOL[dtype])


@pytest.mark.parametrize(
    ("training", "with_running", "expected"),
    [(True, True, 8), (False, True, 7), (True, False, 7)],
    ids=["train", "eval", "train_without_running_stats"],
)
def test_batch_norm_increments_num_batches_tracked_only_when_updating(
    training, with_running, expected, gen
):
    x = make_input((5, 3), torch.float32, "contiguous", gen)
    rm, rv = (torch.zeros(3), torch.ones(3)) if with_running else (None, None)
    nbt = torch.tensor(7, dtype=torch.long)
    batch_norm(x, rm, rv, training=training, num_batches_tracked=nbt)
    assert nbt.item() == expected


@pytest.mark.parametrize("grad_kind", ["expanded", "channels_last", "strided", "transposed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_backward_accepts_any_grad_layout(
    eval_routing, grad_kind, training, layout, gen
):
    dtype = torch.float32
    shape = (4, 3, 5, 6)
    x = make_input(shape, dtype, layout, gen)
    weight, bias, rm, rv = _channel_tensors(3, dtype, gen)
    if grad_kind == "expanded":
        grad = None  # y.sum().backward(): a stride-0 gradient
    elif grad_kind == "transposed":
        grad = torch.randn(6, 5, 3, 4, generator=gen).permute(3, 2, 1, 0)
        assert grad.shape == shape and not grad.is_contiguous()
    else:
        grad = make_input(shape, dtype, grad_kind, gen)
    kwargs = dict(training=training, momentum=0.1, eps=EPS)
    ours = _run(batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    theirs = _run(F.batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    _assert_matches(ours, theirs, dtype)


# The kernels reduce in blocks of 4096 values (kernels/_config.py): a row of >= 4096 spatial
# values is cut into slices, short rows are grouped, channels-last rows are merged in at most 32
# groups. These shapes sit on and just past those boundaries.
BLOCK_SHAPES = [
    (2, 2, 64, 64),  # S = 4096: one slice per row
    (2, 2, 65, 65),  # S = 4225: two slices, the second short
    (3, 2, 1, 8193),  # three slices, the last of one value
    (4097, 1),  # one channel, a block and one row
    (33 * 4096 + 5, 1),  # more channels-last blocks than groups
    (300, 5, 17),  # grouped short rows with a remainder
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=shape_id)
def test_batch_norm_matches_reference_across_block_boundaries(
    eval_routing, shape, dtype, layout, training, gen
):
    x = make_input(shape, dtype, layout, gen, scale=3.0, offset=2.0)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight, bias, rm, rv = _channel_tensors(shape[1], dtype, gen)
    kwargs = dict(training=training, momentum=0.1, eps=EPS)
    ours = _run(batch_norm, x, layout, rm, rv, weight, bias, grad, **kwargs)
    if training:
        ref = _reference_train(x, weight, bias, rm, rv, grad, momentum=0.1)
    else:
        ref = _reference_eval(x, weight, bias, rm, rv, grad)
    _assert_matches_reference(ours, ref, dtype)


# --- finite differences -----------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((5, 3), "contiguous"), ((3, 2, 2, 3), "contiguous"), ((3, 2, 2, 3), "channels_last")],
    ids=["5x3", "3x2x2x3-contiguous", "3x2x2x3-channels_last"],
)
def test_batch_norm_gradcheck_and_gradgradcheck(shape, layout, training, gen):
    dtype = torch.float64
    x = _leaf(make_input(shape, dtype, layout, gen), layout)
    weight, bias, rm, rv = _channel_tensors(shape[1], dtype, gen)
    weight, bias = _leaf(weight), _leaf(bias)

    def fn(x, weight, bias):
        return batch_norm(x, rm, rv, weight, bias, training=training, momentum=0.1, eps=EPS)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


# --- rejection leaves the running buffers untouched -----------------------------------------


def _buffers(dtype=torch.float32):
    return torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5, torch.tensor(4)


def _assert_untouched(buffers, snapshot):
    for now, before in zip(buffers, snapshot, strict=True):
        assert torch.equal(now, before)


@pytest.mark.parametrize(
    ("shape", "dtype", "error", "match"),
    [
        ((3,), torch.float32, ValueError, r"^batch_norm\(\): "),
        ((4, 5, 2), torch.float32, ValueError, r"^batch_norm\(\): .*channels"),
        ((4, 3), torch.int64, TypeError, r"^batch_norm\(\): .*floating"),
        ((1, 3), torch.float32, ValueError, r"^batch_norm\(\): .*more than 1 value per channel"),
        ((1, 3, 1, 1), torch.float32, ValueError, r"more than 1 value per channel"),
        ((4, 3), torch.float64, TypeError, r"^batch_norm\(\): .*dtype"),
    ],
    ids=[
        "wrong_rank",
        "wrong_channels",
        "integer",
        "one_value_2d",
        "one_value_4d",
        "dtype_mismatch",
    ],
)
def test_batch_norm_rejects_bad_input_without_touching_buffers(shape, dtype, error, match):
    rm, rv, nbt = buffers = _buffers()
    snapshot = [b.clone() for b in buffers]
    x = torch.ones(shape, dtype=dtype)
    with pytest.raises(error, match=match):
        batch_norm(x, rm, rv, training=True, momentum=0.1, num_batches_tracked=nbt)
    _assert_untouched(buffers, snapshot)


def test_batch_norm_rejects_half_input_with_float64_buffers_without_touching_buffers():
    # torch's native op (the fallback for half inputs) accepts float32 statistics only.
    rm, rv, nbt = buffers = _buffers(torch.float64)
    snapshot = [b.clone() for b in buffers]
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"^batch_norm\(\): .*dtype"):
        batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt)
    _assert_untouched(buffers, snapshot)


def test_batch_norm_rejects_momentum_none_without_counter_without_touching_buffers():
    rm, rv, _ = buffers = _buffers()
    snapshot = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match=r"^batch_norm\(\): .*num_batches_tracked"):
        batch_norm(torch.ones(4, 3), rm, rv, training=True, momentum=None)
    _assert_untouched(buffers, snapshot)


def test_batch_norm_rejects_wrong_weight_shape_without_touching_buffers():
    rm, rv, nbt = buffers = _buffers()
    snapshot = [b.clone() for b in buffers]
    with pytest.raises(ValueError, match=r"^batch_norm\(\): "):
        batch_norm(torch.ones(4, 3), rm, rv, torch.ones(4), training=True, num_batches_tracked=nbt)
    _assert_untouched(buffers, snapshot)


def test_batch_norm_rejects_parameter_on_other_device_without_touching_buffers():
    rm, rv, nbt = buffers = _buffers()
    snapshot = [b.clone() for b in buffers]
    weight = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match=r"^batch_norm\(\): .*device"):
        batch_norm(torch.ones(4, 3), rm, rv, weight, training=True, num_batches_tracked=nbt)
    _assert_untouched(buffers, snapshot)


def test_batch_norm_one_value_per_channel_allowed_in_eval(eval_routing, gen):
    rm, rv, _ = _buffers()
    x = make_input((1, 3), torch.float32, "contiguous", gen)
    torch.testing.assert_close(
        batch_norm(x, rm, rv, training=False), F.batch_norm(x, rm, rv, training=False)
    )


# --- empty batch, NaN and Inf ------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4)], ids=shape_id)
def test_batch_norm_empty_batch_returns_empty_and_keeps_state(eval_routing, shape, training):
    rm, rv, nbt = buffers = _buffers()
    snapshot = [b.clone() for b in buffers]
    x = torch.empty(shape)
    y = batch_norm(
        x, rm, rv, torch.ones(3), torch.zeros(3), training=training, num_batches_tracked=nbt
    )
    assert y.shape == shape and y.dtype == x.dtype
    _assert_untouched(buffers, snapshot)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_propagates_nan_and_inf_like_torch(dtype, layout, training, gen):
    """The output carries NaN/Inf exactly as torch's does; the running statistics do not
    (torch folds them in for good, pytorch#88474): that batch is left out, with a warning."""
    base = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64).to(dtype)
    base[1, 0, 2, 1] = float("nan")
    base[0, 1, 0, 0] = float("inf")
    base[3, 2, 1, 2] = float("-inf")
    base[2, 3, 0, 1] = float("inf")
    base[2, 3, 1, 1] = float("-inf")
    x = make_layout(base, layout)  # channel 4 stays finite
    weight, bias, rm, rv = _channel_tensors(5, dtype, gen)
    rm_before, rv_before = rm.clone(), rv.clone()
    nbt = torch.tensor(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = batch_norm(x, rm, rv, weight, bias, training=training, num_batches_tracked=nbt)
    want = F.batch_norm(x, rm_before.clone(), rv_before.clone(), weight, bias, training=training)
    torch.testing.assert_close(y, want, equal_nan=True, **TOL[dtype])
    assert torch.isfinite(y[:, 4]).all()
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    assert int(nbt) == 3
    skipped = [w for w in caught if issubclass(w.category, NonFiniteStatisticsWarning)]
    assert len(skipped) == (1 if training else 0)


# --- dispatch -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (3, 5, 7), (4, 3, 5, 6), (5, 2, 3, 4, 3)], ids=shape_id)
def test_backend_for_picks_numba_for_cpu_float_dense(shape, dtype, layout):
    assert backend_for(make_layout(torch.zeros(shape, dtype=dtype), layout)) == "numba"


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4, 3, 5, 6, dtype=torch.bfloat16),
        lambda: torch.zeros(4, 3, 5, 6, dtype=torch.float16),
        lambda: make_layout(torch.zeros(4, 3, 5, 6), "strided"),
        lambda: torch.zeros(6, 4, 3, 5).permute(1, 2, 0, 3),
        lambda: torch.zeros(4, 3, 5, 6, device="meta"),
    ],
    ids=["bfloat16", "float16", "strided", "permuted", "meta_device"],
)
def test_backend_for_falls_back_to_torch(make):
    assert backend_for(make()) == "torch"


def test_backend_for_is_exported_at_top_level():
    assert batchnorm.backend_for is backend_for


@pytest.fixture
def native_calls(monkeypatch):
    """Spy on the one way the package calls torch's op; returns the call log."""
    calls = []
    real = _stages.native_batch_norm

    def spy(input, *args, **kwargs):
        calls.append((input.dtype, input.device.type))
        return real(input, *args, **kwargs)

    monkeypatch.setattr(_stages, "native_batch_norm", spy)
    return calls


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_norm_dispatch_uses_kernels_not_native_for_float(
    dtype, layout, training, native_calls, eval_on_kernels, gen
):
    x = make_input((4, 3, 5, 6), dtype, layout, gen)
    _, _, rm, rv = _channel_tensors(3, dtype, gen)
    batch_norm(x, rm, rv, training=training)
    assert native_calls == []


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_batch_norm_dispatch_falls_back_to_native_for_half(
    eval_routing, dtype, training, native_calls, gen
):
    x = make_input((4, 3, 5, 6), dtype, "contiguous", gen)
    # torch's CPU op takes float32 parameters and statistics with a half input.
    weight, bias, rm, rv = _channel_tensors(3, torch.float32, gen)
    rm_t, rv_t = rm.clone(), rv.clone()
    nbt = torch.tensor(2)
    y = batch_norm(x, rm, rv, weight, bias, training=training, num_batches_tracked=nbt)
    assert native_calls == [(dtype, "cpu")]
    want = F.batch_norm(x, rm_t, rv_t, weight, bias, training=training)
    assert y.dtype == dtype
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    assert nbt.item() == (3 if training else 2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_dispatch_falls_back_to_native_for_strided_and_stays_correct(
    training, native_calls, gen
):
    x = make_input((4, 3, 5, 6), torch.float64, "strided", gen)
    weight, bias, rm, rv = _channel_tensors(3, torch.float64, gen)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    kwargs = dict(training=training, momentum=0.1, eps=EPS)
    ours = _run(batch_norm, x, "strided", rm, rv, weight, bias, grad, **kwargs)
    assert len(native_calls) == 1
    if training:
        ref = _reference_train(x, weight, bias, rm, rv, grad, momentum=0.1)
    else:
        ref = _reference_eval(x, weight, bias, rm, rv, grad)
    _assert_matches_reference(ours, ref, torch.float64)


def test_batch_norm_dispatch_falls_back_to_native_on_meta_device(eval_routing, native_calls):
    # A non-CPU device without hardware: shapes only, but the dispatch decision is real.
    x = torch.empty(4, 3, 5, 6, device="meta")
    rm, rv = torch.zeros(3, device="meta"), torch.ones(3, device="meta")
    y = batch_norm(x, rm, rv, torch.ones(3, device="meta"), None, training=False)
    assert native_calls == [(torch.float32, "meta")]
    assert y.shape == x.shape and y.device.type == "meta"


def test_module_dispatch_falls_back_to_native_for_bfloat16(native_calls, gen):
    ours = batchnorm.BatchNorm2d(3).to(torch.bfloat16)
    theirs = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    x = make_input((4, 3, 5, 6), torch.bfloat16, "channels_last", gen)
    torch.testing.assert_close(ours(x), theirs(x))
    assert native_calls == [(torch.bfloat16, "cpu")]
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, msg=labelled(key))
    ours(make_input((4, 3, 5, 6), torch.float32, "channels_last", gen).to(torch.bfloat16))
    assert len(native_calls) == 2
