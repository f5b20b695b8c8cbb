"""InPlaceABN1d/2d/3d: values, statistics and gradients against torch.nn's BatchNorm followed by
the activation; the recovery's fallback; the in-place contract; memory; refusals."""

from __future__ import annotations

import doctest

import pytest
import torch

import batchnorm
from batchnorm import inplace
from batchnorm.activations import ACTIVATIONS, activation_module
from conftest import TOL, make_input, shape_id, snapshot_state

ACTIVATION_CASES = [
    ("identity", None),
    ("leaky_relu", 0.01),
    ("leaky_relu", 0.2),
    ("leaky_relu", 3.0),
    ("elu", 1.0),
    ("elu", 0.5),
    ("elu", 2.5),
]


def act_id(case) -> str:
    name, param = case
    return name if param is None else f"{name}-{param}"


# (shape, layout): 1d as (N, C) and (N, C, L), 2d contiguous and channels-last, 3d.
INPUT_CASES = [
    ((7, 3), "contiguous"),
    ((3, 5, 7), "contiguous"),
    ((4, 3, 5, 6), "contiguous"),
    ((4, 3, 5, 6), "channels_last"),
    ((5, 2, 3, 4, 3), "contiguous"),
]


def input_id(case) -> str:
    shape, layout = case
    return f"{shape_id(shape)}-{layout}"


# input rank -> (our class, torch.nn's BatchNorm class)
RANK = {
    2: (batchnorm.InPlaceABN1d, torch.nn.BatchNorm1d),
    3: (batchnorm.InPlaceABN1d, torch.nn.BatchNorm1d),
    4: (batchnorm.InPlaceABN2d, torch.nn.BatchNorm2d),
    5: (batchnorm.InPlaceABN3d, torch.nn.BatchNorm3d),
}


def make_pair(rank, channels, activation, param, dtype, gen, weight=None, bias=None, **kwargs):
    """An InPlaceABN layer and torch.nn's (BatchNorm, activation) with the same state.

    The weight has both signs (a negative gamma flips z, which the inverse must handle).
    """
    ours_cls, torch_cls = RANK[rank]
    layer = ours_cls(channels, activation=activation, activation_param=param, dtype=dtype, **kwargs)
    bn = torch_cls(
        channels, dtype=dtype, **{k: v for k, v in kwargs.items() if k != "single_value"}
    )
    with torch.no_grad():
        if layer.weight is not None:
            if weight is None:
                sign = torch.where(torch.rand(channels, generator=gen) < 0.3, -1.0, 1.0)
                weight = (torch.rand(channels, generator=gen) + 0.5) * sign
            layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float64))
            layer.bias.copy_(
                torch.randn(channels, generator=gen)
                if bias is None
                else torch.as_tensor(bias, dtype=torch.float64)
            )
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(channels, generator=gen))
            layer.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    bn.load_state_dict(layer.state_dict())
    return layer, torch.nn.Sequential(bn, activation_module(activation, param))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN included)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}
    return a.shape == b.shape and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def assert_state_equal(layer, snapshot):
    now = layer.state_dict()
    assert now.keys() == snapshot.keys()
    for key, before in snapshot.items():
        assert torch.equal(now[key], before), f"{key} changed"


class SavedTensors:
    """The tensors autograd saves while the block runs (saved_tensors_hooks)."""

    def __init__(self):
        self.tensors = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.tensors.append(t)
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def storage_bytes(self, exclude=()) -> int:
        """Bytes of the distinct storages saved, those of ``exclude`` tensors left out."""
        seen = {t.untyped_storage().data_ptr() for t in exclude}
        total = 0
        for t in self.tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


# --------------------------------------------------------------------------------------------
# Values and running statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", INPUT_CASES, ids=input_id)
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_matches_torch_nn_composite_train_then_eval(activation, case, dtype, gen):
    shape, layout = case
    layer, reference = make_pair(len(shape), shape[1], *activation, dtype, gen)
    for _ in range(3):
        a = make_input(shape, dtype, layout, gen, scale=2.0, offset=0.5)
        x = a.clone()
        out = layer(x)
        assert out is x
        torch.testing.assert_close(out, reference(a), **TOL[dtype])
    bn = reference[0]
    torch.testing.assert_close(layer.running_mean, bn.running_mean, **TOL[dtype])
    torch.testing.assert_close(layer.running_var, bn.running_var, **TOL[dtype])
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    layer.eval()
    reference.eval()
    a = make_input(shape, dtype, layout, gen)
    x = a.clone()
    assert layer(x) is x
    torch.testing.assert_close(x, reference(a), **TOL[dtype])
    if layout == "channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_is_our_batchnorm_then_the_activation_bit_for_bit(
    activation, dtype, gen, eval_routing
):
    # The forward is the package's BatchNorm stages: the same numbers as our BatchNorm2d
    # followed by the table's activation, running statistics included (evaluation on torch's
    # op and on the kernels).
    layer, _ = make_pair(4, 3, *activation, dtype, gen)
    bn = batchnorm.BatchNorm2d(3, dtype=dtype)
    bn.load_state_dict(layer.state_dict())
    spec = ACTIVATIONS[activation[0]]
    for training in (True, True, False):
        layer.train(training)
        bn.train(training)
        a = make_input((6, 3, 4, 4), dtype, "contiguous", gen)
        want = spec.forward(bn(a), activation[1])
        assert torch.equal(layer(a), want)
    for key, value in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_inplace_abn_cumulative_momentum_and_untracked_statistics_match_torch_nn(gen):
    layer, reference = make_pair(4, 3, "elu", None, torch.float64, gen, momentum=None)
    for _ in range(4):
        a = make_input((5, 3, 2, 3), torch.float64, generator=gen)
        torch.testing.assert_close(layer(a.clone()), reference(a), **TOL[torch.float64])
    torch.testing.assert_close(layer.running_var, reference[0].running_var)
    assert int(layer.num_batches_tracked) == 4
    # Without running statistics: batch statistics in both modes, nothing to update.
    layer, reference = make_pair(
        4, 3, "leaky_relu", 0.1, torch.float64, gen, track_running_stats=False
    )
    for training in (True, False):
        layer.train(training)
        reference.train(training)
        a = make_input((5, 3, 2, 3), torch.float64, generator=gen)
        torch.testing.assert_close(layer(a.clone()), reference(a), **TOL[torch.float64])


def test_inplace_abn_defaults_and_class_relations():
    layer = batchnorm.InPlaceABN2d(4)
    assert (layer.activation, layer.activation_param) == ("leaky_relu", 0.01)
    assert batchnorm.InPlaceABN1d(4, activation="elu").activation_param == 1.0
    assert batchnorm.InPlaceABN3d(4, activation="identity").activation_param is None
    assert isinstance(layer, batchnorm.BatchNorm2d)
    assert isinstance(layer, torch.nn.BatchNorm2d)
    assert not isinstance(layer, batchnorm.BatchNormAct2d)  # not a drop-in: it overwrites
    assert "activation='leaky_relu'" in repr(layer)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def grads(module, a, dy, params):
    """Gradients of input, weight and bias for ``module`` applied to a copy of ``a``."""
    a = a.detach().clone().requires_grad_()
    out = module(a * 1.0)  # a non-leaf, as a layer's output is
    return torch.autograd.grad(out, [a, *params], dy)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", INPUT_CASES, ids=input_id)
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_gradients_match_torch_nn_composite_float64(activation, case, training, gen):
    shape, layout = case
    layer, reference = make_pair(len(shape), shape[1], *activation, torch.float64, gen)
    layer.train(training)
    reference.train(training)
    a = make_input(shape, torch.float64, layout, gen, scale=1.5, offset=-0.3)
    dy = make_input(shape, torch.float64, layout, gen)
    got = grads(layer, a, dy, [layer.weight, layer.bias])
    want = grads(reference, a, dy, [reference[0].weight, reference[0].bias])
    for name, g, w in zip(("input", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_gradients_float32_match_float64_reference(activation, training, gen):
    layer, reference = make_pair(4, 3, *activation, torch.float32, gen)
    reference = reference.double()
    layer.train(training)
    reference.train(training)
    a = make_input((4, 3, 5, 5), torch.float32, "channels_last", gen)
    dy = make_input((4, 3, 5, 5), torch.float32, "contiguous", gen)
    got = grads(layer, a, dy, [layer.weight, layer.bias])
    want = grads(reference, a.double(), dy.double(), [reference[0].weight, reference[0].bias])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), **TOL[torch.float32])


def gradcheck_layer(layer, x):
    """gradcheck over (input, weight, bias); the wrapper clones the input, which the layer
    then overwrites (gradcheck's own input must stay as it is)."""
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x.clone(),))

    return torch.autograd.gradcheck(f, (x.requires_grad_(), weight, bias))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 2, 3), (2, 2, 2, 2, 2)], ids=shape_id)
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_gradcheck_float64(activation, shape, training, gen):
    layer, _ = make_pair(len(shape), shape[1], *activation, torch.float64, gen)
    layer.train(training)
    assert gradcheck_layer(layer, make_input(shape, torch.float64, generator=gen))


def test_inplace_abn_gradients_through_a_convolution_match_torch_nn(gen):
    # The intended use: a convolution's output (the convolution saves its input, not its
    # output), several layers deep.
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64) for _ in range(3)]
    ours = torch.nn.Sequential(
        *[m for c in convs for m in (c, batchnorm.InPlaceABN2d(4, dtype=torch.float64))]
    )
    theirs = torch.nn.Sequential(
        *[
            m
            for c in convs
            for m in (c, torch.nn.BatchNorm2d(4, dtype=torch.float64), torch.nn.LeakyReLU(0.01))
        ]
    )
    a = make_input((3, 4, 6, 6), torch.float64, generator=gen)
    params = [c.weight for c in convs]
    got = torch.autograd.grad(ours(a).square().sum(), params)
    want = torch.autograd.grad(theirs(a).square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_inplace_abn_refuses_double_backward(gen):
    layer, _ = make_pair(2, 3, "elu", None, torch.float64, gen)
    a = make_input((6, 3), torch.float64, generator=gen).requires_grad_()
    (g,) = torch.autograd.grad(layer(a * 1.0).square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        g.sum().backward()


# --------------------------------------------------------------------------------------------
# The recovery and its fallback
# --------------------------------------------------------------------------------------------

# gamma = 0 (twice: beta != 0 and beta = 0), tiny against beta, tiny and negative, subnormal.
SMALL_WEIGHT = [1.3, 0.0, 0.0, 1e-9, -2e-12, 1e-310]
SMALL_BIAS = [0.1, 0.5, 0.0, 1.0, -3.0, 0.0]


def test_unrecoverable_channels_follow_the_documented_rule():
    weight = torch.tensor(SMALL_WEIGHT + [0.02, 0.015, float("nan")], dtype=torch.float64)
    bias = torch.tensor(SMALL_BIAS + [1.0, 1.0, 0.0], dtype=torch.float64)
    got = inplace.unrecoverable_channels(weight, bias, 9, torch.float64, 0.01)
    # 64 * 0.02 = 1.28 >= 1 (recoverable), 64 * 0.015 = 0.96 < 1 (not); NaN never is.
    assert got.tolist() == [False, True, True, True, True, True, False, True, True]
    # The floor is the dtype's: 1e-37 is a fine gamma in float64; in float32, with a slope of
    # 0.01, z = 1e-37 x_hat and 0.01 z come near the subnormals (tiny = 1.2e-38).
    tiny = torch.tensor([1e-37], dtype=torch.float64)
    assert not inplace.unrecoverable_channels(tiny, None, 1, torch.float64, None).item()
    assert inplace.unrecoverable_channels(tiny.float(), None, 1, torch.float32, 0.01).item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATION_CASES[::2], ids=act_id)
def test_inplace_abn_gradients_exact_with_zero_and_tiny_weight(activation, training, gen):
    layer, reference = make_pair(
        4, 6, *activation, torch.float64, gen, weight=SMALL_WEIGHT, bias=SMALL_BIAS
    )
    layer.train(training)
    reference.train(training)
    a = make_input((4, 6, 3, 3), torch.float64, "channels_last", gen)
    dy = make_input((4, 6, 3, 3), torch.float64, generator=gen)
    with SavedTensors() as saved:
        out = layer(a * 1.0)
    # The five unrecoverable channels' x_hat is saved, as one (N, 5, H, W) slice.
    assert any(t.shape == (4, 5, 3, 3) for t in saved.tensors)
    got = torch.autograd.grad(out, [layer.weight, layer.bias], dy)
    want = grads(reference, a, dy, [reference[0].weight, reference[0].bias])[1:]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    # gradcheck's central differences straddle the kink of a(gamma x_hat) at gamma = 0 when
    # beta = 0 (for every activation but identity and ELU with alpha 1): beta = 0.3 there.
    with torch.no_grad():
        layer.bias[2] = layer.bias[5] = 0.3
    assert gradcheck_layer(layer, make_input((3, 6, 2, 2), torch.float64, generator=gen))


def test_inplace_abn_small_weight_gradients_need_the_fallback(gen, monkeypatch):
    # The test above can fail: without the fallback (every channel declared recoverable), the
    # weight's gradient is wrong for gamma = 1e-9 and NaN for gamma = 0.
    monkeypatch.setattr(
        inplace, "unrecoverable_channels", lambda w, *args: torch.zeros(w.shape, dtype=torch.bool)
    )
    layer, reference = make_pair(
        4, 6, "leaky_relu", 0.01, torch.float64, gen, weight=SMALL_WEIGHT, bias=SMALL_BIAS
    )
    a = make_input((4, 6, 3, 3), torch.float64, generator=gen)
    dy = make_input((4, 6, 3, 3), torch.float64, generator=gen)
    got = grads(layer, a, dy, [layer.weight])[1]
    want = grads(reference, a, dy, [reference[0].weight])[1]
    assert got[1:3].isnan().all()
    assert not torch.allclose(got[3], want[3], **TOL[torch.float64])


def test_inplace_abn_float32_small_weight_against_float64_reference(gen):
    layer, reference = make_pair(
        4, 6, "elu", 1.0, torch.float32, gen, weight=[1.0, 0.0, 1e-6, 3e-3, 1.0, 1e-20],
        bias=[0.2, 1.0, 1.0, 1.0, -2.0, 0.0],
    )  # fmt: skip
    reference = reference.double()
    a = make_input((4, 6, 3, 3), torch.float32, generator=gen)
    dy = make_input((4, 6, 3, 3), torch.float32, generator=gen)
    got = grads(layer, a, dy, [layer.weight, layer.bias])
    want = grads(reference, a.double(), dy.double(), [reference[0].weight, reference[0].bias])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, saturating", [(torch.float64, -40.0), (torch.float32, -30.0)])
def test_inplace_abn_elu_saturated_values_use_the_saved_values(dtype, saturating, layout, gen):
    # ELU's output is exactly -alpha once e^z < u: z = log1p(-1) = -inf, and x_hat with it.
    # Channel 1 saturates entirely, channel 2 in part (z < ~-4: x_hat < ~-0.5 for gamma = 8).
    layer, reference = make_pair(
        4, 3, "elu", 1.0, dtype, gen, weight=[1.0, 1.0, 8.0], bias=[0.0, saturating, 0.0]
    )
    reference = reference.double()
    a = make_input((5, 3, 4, 4), dtype, layout, gen).requires_grad_()
    dy = make_input((5, 3, 4, 4), dtype, generator=gen)
    with SavedTensors() as saved:
        out = layer(a * 1.0)
    indices = [t for t in saved.tensors if t.dtype == torch.int64 and t.dim() == 1]
    assert len(indices) == 1 and indices[0].numel() > 80  # channel 1's 80 values, and more
    got = torch.autograd.grad(out, [a, layer.weight, layer.bias], dy)
    want = grads(reference, a.double(), dy.double(), [reference[0].weight, reference[0].bias])
    for g, w in zip(got, want, strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g, w.to(dtype), **TOL[dtype])


def test_inplace_abn_elu_saturation_needs_the_fallback(gen, monkeypatch):
    # The test above can fail: with an infinite budget nothing is saved, and the saturated
    # channel's gradient is NaN.
    monkeypatch.setattr(inplace, "RECOVERY_ULPS", float("inf"))
    layer, _ = make_pair(4, 2, "elu", 1.0, torch.float64, gen, weight=[1.0, 1.0], bias=[0.0, -40.0])
    a = make_input((5, 2, 4, 4), torch.float64, generator=gen)
    (dw,) = grads(layer, a, torch.ones_like(a), [layer.weight])[1:]
    assert dw[0].isfinite() and dw[1].isnan()


@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_inplace_abn_saves_only_its_output_and_per_channel_tensors(activation, gen):
    layer, _ = make_pair(4, 8, *activation, torch.float32, gen)
    x = make_input((16, 8, 8, 8), torch.float32, generator=gen).requires_grad_() * 1.0
    with SavedTensors() as saved:
        out = layer(x)
    assert any(t.untyped_storage().data_ptr() == out.data_ptr() for t in saved.tensors)
    # Besides the output: weight, bias and invstd, a few bytes per channel.
    assert saved.storage_bytes(exclude=[out]) <= 8 * 8 * 3
    out.sum().backward()


def test_inplace_abn_eval_without_weight_grad_saves_no_fallback(gen):
    layer, _ = make_pair(4, 3, "elu", None, torch.float64, gen, weight=[0.0, 1.0, 1.0])
    layer.eval()
    layer.weight.requires_grad_(False)
    x = make_input((4, 3, 5, 5), torch.float64, generator=gen).requires_grad_() * 1.0
    with SavedTensors() as saved:
        out = layer(x)
    # dx = gamma / sigma * dz needs no x_hat: only the output and per-channel tensors.
    assert saved.storage_bytes(exclude=[out]) <= 3 * 8 * 3


def test_ten_conv_inplace_abn_blocks_save_at_most_0_6_of_torch_nn(gen):
    # The measure, counted as autograd's saved storages: 10 x (Conv3x3 -> BatchNorm ->
    # LeakyReLU) save the convolution's input, BatchNorm's input and LeakyReLU's input per
    # block; with InPlaceABN the convolution's input is the previous block's output, which is
    # all the block saves.
    def blocks(norm):
        layers = []
        for _ in range(10):
            layers += [torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), *norm()]
        return torch.nn.Sequential(*layers)

    ours = blocks(lambda: [batchnorm.InPlaceABN2d(16)])
    theirs = blocks(lambda: [torch.nn.BatchNorm2d(16), torch.nn.LeakyReLU(0.01)])
    x = make_input((8, 16, 16, 16), torch.float32, generator=gen)
    measured = []
    for model in (ours, theirs):
        with SavedTensors() as saved:
            out = model(x)
        measured.append(saved.storage_bytes())
        out.sum().backward()
    assert measured[0] <= 0.6 * measured[1], measured


# --------------------------------------------------------------------------------------------
# The in-place contract
# --------------------------------------------------------------------------------------------


def test_inplace_abn_output_shares_the_input_storage(gen):
    layer, reference = make_pair(4, 3, "leaky_relu", 0.01, torch.float32, gen)
    a = make_input((4, 3, 5, 5), torch.float32, "channels_last", gen)
    x = a.clone(memory_format=torch.channels_last)
    pointer = x.data_ptr()
    out = layer(x)
    assert out is x and out.data_ptr() == pointer
    torch.testing.assert_close(x, reference(a), **TOL[torch.float32])


# A strided view is not a kernel layout: torch's op normalizes it, with a one-time warning.
@pytest.mark.filterwarnings("ignore:batch_norm\\(\\). input with strides:RuntimeWarning")
def test_inplace_abn_overwrites_a_view_outside_autograd(gen):
    layer, reference = make_pair(4, 3, "elu", None, torch.float64, gen)
    base = make_input((4, 5, 3, 3), torch.float64, generator=gen)
    expected = reference(base[:, 1:4])
    with torch.no_grad():
        out = layer(base[:, 1:4])
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(base[:, 1:4], expected, **TOL[torch.float64])


def test_inplace_abn_input_saved_by_another_node_fails_at_backward(gen):
    # sigmoid saves its output; overwriting it is caught by torch's version counter.
    layer, _ = make_pair(4, 3, "leaky_relu", 0.01, torch.float64, gen)
    a = make_input((4, 3, 2, 2), torch.float64, generator=gen).requires_grad_()
    out = layer(torch.sigmoid(a))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# torch's forward-AD decompositions script functions (deprecated), and bfloat16 goes to
# torch's op with a one-time warning: neither is this layer's.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:batch_norm\\(\\). bfloat16:RuntimeWarning")
def test_inplace_abn_not_in_place_under_forward_ad_or_other_dtypes(gen):
    layer, reference = make_pair(4, 3, "elu", None, torch.float64, gen)
    a = make_input((4, 3, 2, 2), torch.float64, generator=gen)
    x = a.clone()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        out = torch.autograd.forward_ad.unpack_dual(layer(dual)).primal
    assert torch.equal(x, a)
    torch.testing.assert_close(out, reference(a), **TOL[torch.float64])
    layer.bfloat16()
    x = a.bfloat16()
    out = layer(x)
    assert out is not x and torch.equal(x, a.bfloat16())


def test_inplace_abn_traces_with_torch_fx_inside_a_model_and_as_the_root(gen):
    layer, reference = make_pair(4, 3, "leaky_relu", 0.1, torch.float64, gen)
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    traced = torch.fx.symbolic_trace(model)
    assert [n.op for n in traced.graph.nodes].count("call_module") == 2
    a = make_input((4, 3, 2, 2), torch.float64, generator=gen)
    x = a.clone()
    assert traced(x) is x  # the node runs the layer itself: in place
    torch.testing.assert_close(x, reference(a), **TOL[torch.float64])
    root = torch.fx.symbolic_trace(layer)  # torch ops: BatchNorm, then the activation
    torch.testing.assert_close(root(a), reference(a), **TOL[torch.float64])


def test_inplace_abn_state_dict_loads_both_ways_with_torch_nn_strictly(gen):
    layer, _ = make_pair(4, 5, "leaky_relu", 0.01, torch.float32, gen)
    layer(make_input((4, 5, 3, 3), torch.float32, generator=gen))
    bn = torch.nn.BatchNorm2d(5)
    bn.load_state_dict(layer.state_dict(), strict=True)
    assert bn.state_dict().keys() == layer.state_dict().keys()
    for key, value in layer.state_dict().items():
        assert torch.equal(bn.state_dict()[key], value)
    torch.nn.init.uniform_(bn.weight)
    bn.running_var.fill_(3.0)
    fresh = batchnorm.InPlaceABN2d(5)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    for key, value in bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

NOT_INVERTIBLE = [
    ("relu", None),
    ("silu", None),
    ("gelu", None),
    ("leaky_relu", 0.0),
    ("leaky_relu", -0.1),
    ("elu", 0.0),
    ("elu", -1.0),
]


@pytest.mark.parametrize("cls, act", [(1, "1d"), (2, "2d"), (3, "3d")], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("activation", NOT_INVERTIBLE, ids=act_id)
def test_inplace_abn_refuses_non_invertible_activation_first(activation, cls, act):
    name, param = activation
    layer_cls = getattr(batchnorm, f"InPlaceABN{act}")
    # num_features=-1 is wrong too: the activation is what the message is about.
    with pytest.raises(ValueError) as info:
        layer_cls(-1, activation=name, activation_param=param)
    message = str(info.value)
    assert message.startswith(f"InPlaceABN{act}(): expected activation")
    assert f"got {param!r}" in message if param is not None else f"got {name!r}" in message
    assert f"BatchNormAct{act}" in message and "num_features" not in message


def test_inplace_abn_refuses_unknown_activation_and_bad_parameters_first():
    with pytest.raises(
        ValueError, match=r"expected activation in \('identity', 'leaky_relu', 'elu'\).*'tanh'"
    ):
        batchnorm.InPlaceABN2d(-1, activation="tanh")
    with pytest.raises(TypeError, match="activation_param"):
        batchnorm.InPlaceABN2d(-1, activation_param="steep")
    with pytest.raises(ValueError, match="takes no activation_param"):
        batchnorm.InPlaceABN2d(-1, activation="identity", activation_param=0.5)


def bad_calls():
    """(id, layer change, input maker, exception, message) for each failure mode."""
    shape = (4, 3, 2, 2)

    def plain(gen):
        return make_input(shape, torch.float32, generator=gen) * 1.0

    def leaf(gen):
        return make_input(shape, torch.float32, generator=gen).requires_grad_()

    def real_view(gen):
        base = make_input((4, 5, 2, 2), torch.float32, generator=gen) * 1.0
        base.requires_grad_()
        return base[:, :3]

    def expanded(gen):
        return make_input((1, 3, 2, 2), torch.float32, generator=gen).expand(shape)

    def nan(gen):
        x = plain(gen)
        x[0, 1, 0, 0] = float("nan")
        return x

    def inference(gen):
        with torch.inference_mode():
            return make_input(shape, torch.float32, generator=gen)

    def relu_attribute(layer):
        layer.activation = "relu"

    def raise_nonfinite(layer):
        layer.nonfinite = "raise"

    def bad_momentum(layer):
        layer.momentum = 2.0

    def none(layer):
        pass

    def gen_shape(s, dtype=torch.float32):
        return lambda gen: make_input(s, dtype, generator=gen)

    return [
        ("channels", none, gen_shape((4, 5, 2, 2)), ValueError, r"expected input with 3 channels"),
        ("rank", none, gen_shape((4, 3, 2)), ValueError, r"expected 4-D input"),
        ("dtype", none, gen_shape(shape, torch.float64), TypeError, r"layer's dtype float32"),
        ("one-value", none, gen_shape((1, 3, 1, 1)), ValueError, r"more than 1 value"),
        ("leaf", none, leaf, RuntimeError, r"leaf tensor that requires grad"),
        ("view", none, real_view, RuntimeError, r"not a view"),
        ("expanded", none, expanded, RuntimeError, r"memory of their own"),
        ("inference", none, inference, RuntimeError, r"inference_mode"),
        ("relu", relu_attribute, plain, ValueError, r"expected activation in .*BatchNormAct2d"),
        ("nonfinite", raise_nonfinite, nan, batchnorm.NonFiniteStatisticsError, r"finite"),
        ("momentum", bad_momentum, plain, ValueError, r"momentum"),
        ("mask", none, plain, NotImplementedError, r"expected mask=None"),
    ]


@pytest.mark.parametrize(
    "case", bad_calls(), ids=[c[0] for c in bad_calls()]
)  # fmt: skip
def test_inplace_abn_rejection_changes_neither_state_nor_input(case, gen):
    name, change, make, error, message = case
    layer, _ = make_pair(4, 3, "leaky_relu", 0.01, torch.float32, gen)
    layer(make_input((4, 3, 2, 2), torch.float32, generator=gen))  # a counter above 0
    change(layer)
    state = snapshot_state(layer)
    x = make(gen)
    before = x.detach().clone()
    kwargs = {"mask": torch.ones(4, 2, 2, dtype=torch.bool)} if name == "mask" else {}
    with pytest.raises(error, match=message):
        layer(x, **kwargs)
    assert_state_equal(layer, state)
    assert same_bits(x.detach(), before)
    assert layer.nonfinite_batches_skipped == 0


def test_inplace_abn_non_finite_batch_is_skipped_as_batchnorm_skips_it(gen):
    layer, _ = make_pair(4, 3, "elu", None, torch.float32, gen)
    state = snapshot_state(layer)
    x = make_input((4, 3, 2, 2), torch.float32, generator=gen)
    x[1, 2, 0, 1] = float("inf")
    with pytest.warns(batchnorm.NonFiniteStatisticsWarning):
        layer(x)
    assert_state_equal(layer, state)
    assert layer.nonfinite_batches_skipped == 1


def test_inplace_abn_single_value_use_running_normalizes_with_running_statistics(gen):
    layer, reference = make_pair(
        4, 3, "leaky_relu", 0.1, torch.float64, gen, single_value="use_running"
    )
    state = snapshot_state(layer)
    a = make_input((1, 3, 1, 1), torch.float64, generator=gen)
    out = layer(a.clone())
    assert_state_equal(layer, state)
    torch.testing.assert_close(out, reference.eval()(a), **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------


def test_inplace_docstring_examples_run():
    result = doctest.testmod(inplace, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


# --------------------------------------------------------------------------- on the kernels
# Inputs as small as the tests' run on the serial route; this policy sends them to the path
# large inputs take: the moments, then one kernel call normalizing and activating over the input.
KERNEL_ROUTE = dict(serial_max_elements=0, eval_native_bytes=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", INPUT_CASES, ids=input_id)
@pytest.mark.parametrize("activation", ACTIVATION_CASES, ids=act_id)
def test_kernel_path_matches_torch_nn_and_batchnormact(activation, case, dtype, gen):
    shape, layout = case
    name, param = activation
    layer, reference = make_pair(len(shape), shape[1], name, param, dtype, gen)
    fused = type(reference[0])  # a BatchNormAct of the same state, on its fused kernels
    fused = {
        torch.nn.BatchNorm1d: batchnorm.BatchNormAct1d,
        torch.nn.BatchNorm2d: batchnorm.BatchNormAct2d,
        torch.nn.BatchNorm3d: batchnorm.BatchNormAct3d,
    }[fused](shape[1], name, param, dtype=dtype)
    fused.load_state_dict(layer.state_dict())
    tol = TOL[dtype]
    with batchnorm.use_routing(**KERNEL_ROUTE):
        for training in (True, True, False):
            for m in (layer, reference, fused):
                m.train(training)
                m.zero_grad(set_to_none=True)
            a = make_input(shape, dtype, layout, gen)
            g = torch.randn(shape, dtype=dtype, generator=gen)
            x = a.clone().requires_grad_(True)
            h = x * 1.0  # not a leaf: it may be overwritten
            y = layer(h)
            assert y is h
            want_x = a.clone().requires_grad_(True)
            want = reference(want_x)
            f_x = a.clone().requires_grad_(True)
            got_fused = fused(f_x)
            torch.testing.assert_close(y.detach(), got_fused.detach(), **tol)
            torch.testing.assert_close(y.detach(), want.detach(), **tol)
            y.backward(g)
            want.backward(g)
            m = a.numel() // shape[1]
            torch.testing.assert_close(x.grad, want_x.grad, **tol)
            grads = ((layer.weight.grad, reference[0].weight.grad),
                     (layer.bias.grad, reference[0].bias.grad))  # fmt: skip
            for got, expected in grads:
                torch.testing.assert_close(got, expected, rtol=tol["rtol"], atol=tol["atol"] * m)
        for key, value in reference[0].state_dict().items():
            torch.testing.assert_close(layer.state_dict()[key], value, **tol)


def test_kernel_path_keeps_the_fallback_of_a_zero_gamma_channel(gen):
    weight = torch.tensor([0.0, 1.5, -0.7], dtype=torch.float64)
    layer, reference = make_pair(4, 3, "leaky_relu", 0.1, torch.float64, gen, weight=weight)
    a = make_input((6, 3, 4, 5), torch.float64, "contiguous", gen)
    g = torch.randn(a.shape, dtype=torch.float64, generator=gen)
    with batchnorm.use_routing(**KERNEL_ROUTE):
        x = a.clone().requires_grad_(True)
        layer(x * 1.0).backward(g)
    want_x = a.clone().requires_grad_(True)
    reference(want_x).backward(g)
    torch.testing.assert_close(x.grad, want_x.grad)
    torch.testing.assert_close(layer.weight.grad, reference[0].weight.grad)


def test_kernel_path_refusing_non_finite_statistics_leaves_the_input(gen):
    layer = batchnorm.InPlaceABN2d(3, nonfinite="raise")
    a = make_input((4, 3, 5, 5), torch.float32, "contiguous", gen)
    a[0, 1, 0, 0] = float("inf")
    x = a.clone()
    before = snapshot_state(layer)
    with batchnorm.use_routing(**KERNEL_ROUTE), pytest.raises(Exception, match="finite"):
        layer(x)
    assert same_bits(x, a)
    assert_state_equal(layer, before)
