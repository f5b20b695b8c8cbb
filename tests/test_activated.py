"""BatchNormAct1d/2d/3d against torch.nn's BatchNorm followed by the activation."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm import routing
from batchnorm.activations import ACTIVATIONS, activation_module
from conftest import TOL

ACTS = [
    ("identity", None),
    ("relu", None),
    ("leaky_relu", None),
    ("leaky_relu", 0.2),
    ("elu", None),
    ("elu", 0.5),
    ("silu", None),
    ("gelu", None),
]
# (rank, shape, channels_last): the three classes, short and long rows, (N, C) data.
SHAPES = [
    (1, (64, 6), False),
    (1, (16, 4, 37), False),
    (2, (8, 5, 6, 7), False),
    (2, (8, 5, 6, 7), True),
    (3, (4, 3, 3, 4, 5), False),
]
CLASSES = {1: batchnorm.BatchNormAct1d, 2: batchnorm.BatchNormAct2d, 3: batchnorm.BatchNormAct3d}
TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
# Routes: "kernels" forces the fused kernels whatever the size; "default" is the policy in force
# (small inputs take the serial kernels and the activation in torch ops).
ROUTES = {
    "kernels": dict(serial_max_elements=0, eval_native_bytes=0),
    "default": {},
}


def _pair(rank, c, name, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fused = CLASSES[rank](c, name, p, dtype=dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.rand(c, generator=gen, dtype=dtype) + 0.5)
        fused.bias.copy_(torch.randn(c, generator=gen, dtype=dtype) * 0.5)
    ref = TORCH[rank](c, dtype=dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref, activation_module(name, p)


def _input(shape, channels_last, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    offset = torch.randn((1, c) + (1,) * (len(shape) - 2), generator=gen, dtype=dtype)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2.0 + offset
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _step(module, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank,shape,channels_last", SHAPES)
@pytest.mark.parametrize("name,p", ACTS)
def test_matches_torch_batchnorm_then_activation(name, p, rank, shape, channels_last, dtype, route):
    c = shape[1]
    fused, ref, act = _pair(rank, c, name, p, dtype)
    composite = torch.nn.Sequential(ref, act)
    tol = TOL[dtype]
    with routing.use_routing(**ROUTES[route]):
        for step in range(3):  # training steps: outputs, gradients, running statistics
            x = _input(shape, channels_last, dtype, seed=step)
            g = torch.randn(shape, dtype=dtype)
            for m in (fused, composite):
                m.zero_grad(set_to_none=True)
            y, dx = _step(fused, x, g)
            want_y, want_dx = _step(composite, x, g)
            torch.testing.assert_close(y, want_y, **tol)
            torch.testing.assert_close(dx, want_dx, **tol)
            m = x.numel() // c
            for got, want in (
                (fused.weight.grad, ref.weight.grad),
                (fused.bias.grad, ref.bias.grad),
            ):
                torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * m)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
        for key, want in ref.state_dict().items():
            torch.testing.assert_close(fused.state_dict()[key], want, **tol)
        fused.eval()
        composite.eval()
        x = _input(shape, channels_last, dtype, seed=9)
        g = torch.randn(shape, dtype=dtype)
        y, dx = _step(fused, x, g)
        want_y, want_dx = _step(composite, x, g)
        torch.testing.assert_close(y, want_y, **tol)
        torch.testing.assert_close(dx, want_dx, **tol)


@pytest.mark.parametrize("name,p", ACTS)
def test_gradcheck_on_the_fused_kernels(name, p):
    from batchnorm._autograd import ActEvalFn, ActTrainFn

    spec = ACTIVATIONS[name]
    param = ACTIVATIONS[name].default_param if p is None else p
    w = torch.tensor([0.7, 1.3, -0.9], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.4, 0.3], dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64)
    var = torch.tensor([1.5, 0.8, 2.0], dtype=torch.float64)
    # The first seed whose values stay away from the activations' kinks at z = 0, where finite
    # differences do not hold.
    gen = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen) * 2
        if all((_z(x, w, b, s).abs() > 1e-3).all() for s in (None, (mean, var))):
            break
    x.requires_grad_(True)

    def train(x, w, b):
        return ActTrainFn.apply(x, w, b, None, None, 0.0, 1e-5, spec, param)[0]

    def evaluate(x, w, b):
        return ActEvalFn.apply(x, mean, var, w, b, 1e-5, spec, param)

    for f in (train, evaluate):
        assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
    # The layer end to end (input gradient), on the kernels.
    layer = batchnorm.BatchNormAct2d(3, name, p, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    with routing.use_routing(**ROUTES["kernels"]):
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


def _z(x, w, b, stats):
    with torch.no_grad():
        if stats is None:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        else:
            mean, var = stats
        s = (1, -1, 1, 1)
        return (x - mean.view(s)) / torch.sqrt(var.view(s) + 1e-5) * w.view(s) + b.view(s)


@pytest.mark.parametrize("name,p", [("relu", None), ("gelu", None), ("elu", 0.5)])
def test_double_backward_matches_the_composite(name, p):
    fused, ref, act = _pair(2, 3, name, p, torch.float64)
    composite = torch.nn.Sequential(ref, act)
    x = _input((6, 3, 4, 4), False, torch.float64, seed=3)
    grads = []
    with routing.use_routing(**ROUTES["kernels"]):
        for m in (fused, composite):
            xi = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(m(xi).pow(2).sum(), xi, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.pow(2).sum(), xi)
            grads.append((gx.detach(), ggx))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_saves_the_input_and_not_the_normalized_values():
    # Autograd of the fused layer keeps x (one activation-sized tensor); the unfused pair keeps
    # x and z = BatchNorm(x) (two).
    def saved_bytes(module, x):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.numel() >= x.numel() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(total)

    x = torch.randn(16, 8, 32, 32, requires_grad=True)
    fused = batchnorm.BatchNormAct2d(8, "relu")
    pair = torch.nn.Sequential(batchnorm.BatchNorm2d(8), torch.nn.ReLU())
    with routing.use_routing(**ROUTES["kernels"]):
        assert saved_bytes(fused, x) == x.numel() * 4
        assert saved_bytes(pair, x) >= 2 * x.numel() * 4


def test_state_dict_is_batchnorms_both_ways():
    fused, ref, _ = _pair(2, 4, "leaky_relu", 0.3, torch.float32)
    fused(torch.randn(8, 4, 3, 3))
    plain = torch.nn.BatchNorm2d(4)
    assert plain.load_state_dict(fused.state_dict(), strict=True)
    back = batchnorm.BatchNormAct2d(4, "leaky_relu", 0.3)
    back.load_state_dict(plain.state_dict(), strict=True)
    assert list(back.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert isinstance(back, torch.nn.BatchNorm2d) and isinstance(back, batchnorm.BatchNorm2d)


def test_defaults_and_repr():
    layer = batchnorm.BatchNormAct2d(4)
    assert (layer.activation, layer.activation_param) == ("relu", None)
    assert batchnorm.BatchNormAct1d(4, "leaky_relu").activation_param == 0.01
    assert batchnorm.BatchNormAct3d(4, "elu").activation_param == 1.0
    assert "activation='elu', activation_param=0.5" in repr(batchnorm.BatchNormAct1d(2, "elu", 0.5))
    assert ACTIVATIONS["gelu"].make_module(None).approximate == "none"


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(activation="tanh"), ValueError, "expected activation in"),
        (dict(activation="relu", activation_param=0.1), ValueError, "takes no activation_param"),
        (dict(activation="elu", activation_param=float("nan")), TypeError, "finite number"),
        (dict(activation="leaky_relu", activation_param="0.1"), TypeError, "finite number"),
    ],
)
def test_bad_activation_arguments_raise_naming_them(kwargs, exc, words):
    with pytest.raises(exc, match=words) as info:
        batchnorm.BatchNormAct2d(4, **kwargs)
    assert "BatchNormAct2d()" in str(info.value)


def test_bad_input_changes_no_state():
    layer = batchnorm.BatchNormAct2d(3, "relu")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError):
        layer(torch.randn(4, 5, 3, 3))  # wrong channel count
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_single_value_use_running_applies_the_activation():
    layer = batchnorm.BatchNormAct1d(3, "relu", single_value="use_running")
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.tensor([[-1.0, 2.0, 0.5]])
    y = layer(x)
    want = torch.relu((x - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps))
    torch.testing.assert_close(y, want)
    assert layer.num_batches_tracked.item() == 0


def test_mask_leaves_padding_out_and_applies_the_activation():
    layer = batchnorm.BatchNormAct1d(2, "leaky_relu", 0.1, dtype=torch.float64)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([5, 2, 4])[:, None]
    y = layer(x, mask=mask)
    real = x.permute(0, 2, 1)[mask]  # (real positions, C)
    z = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + layer.eps)
    torch.testing.assert_close(y.permute(0, 2, 1)[mask], torch.nn.functional.leaky_relu(z, 0.1))
    assert (y.permute(0, 2, 1)[~mask] == 0).all()


def test_traces_as_one_leaf_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), batchnorm.BatchNormAct2d(3, "silu"))
    traced = torch.fx.symbolic_trace(model)
    ops = [n.op for n in traced.graph.nodes]
    assert ops == ["placeholder", "call_module", "call_module", "output"]
    x = torch.randn(4, 2, 5, 5)
    model.eval()
    traced.eval()
    torch.testing.assert_close(traced(x), model(x))


def test_torch_route_for_another_dtype_applies_the_activation(monkeypatch):
    from batchnorm import _route

    monkeypatch.setattr(_route, "_warned", set())  # the fallback warns once per process
    layer = batchnorm.BatchNormAct1d(3, "gelu", dtype=torch.bfloat16)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.bfloat16)
    x = torch.randn(16, 3, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="native op"):
        y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.gelu(ref(x)))


def test_traced_as_the_root_applies_the_activation():
    layer = batchnorm.BatchNormAct2d(3, "silu").eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0]))
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 3, 4, 4)
    want = torch.nn.functional.silu(torch.nn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps
    ))  # fmt: skip
    torch.testing.assert_close(traced(x), want)


def test_torch_jit_script_compiles_batchnorm_then_the_activation():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), batchnorm.BatchNormAct2d(3, "elu", 0.5))
    x = torch.randn(4, 2, 5, 5)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))  # training: batch statistics
    model.eval()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
