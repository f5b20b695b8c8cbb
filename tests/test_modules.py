"""``batchnorm.BatchNorm1d/2d/3d`` against ``torch.nn.BatchNorm1d/2d/3d`` and reference.py.

Both layers start from one state (ours loads torch's ``state_dict``), see the same batches and
the same output gradients; outputs, input/weight/bias gradients and every buffer are compared
after each step, and the same quantities are recomputed from ``reference.py`` in float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import batchnorm
from batchnorm import reference
from conftest import (
    DTYPES,
    LAYOUTS,
    SHAPES,
    TOL,
    assert_state_unchanged,
    bn_classes,
    from_np,
    labelled,
    make_input,
    make_layout,
    randomize_bn_state,
    shape_id,
    snapshot_state,
    to_np64,
)

EPS = 1e-5
OURS = {"1d": batchnorm.BatchNorm1d, "2d": batchnorm.BatchNorm2d, "3d": batchnorm.BatchNorm3d}


def _module_pair(shape, dtype, gen, **kwargs):
    """(ours, torch's) BatchNorm for ``shape`` with one random state, ours loaded from torch's."""
    ours_cls, torch_cls = bn_classes(len(shape))
    theirs = torch_cls(shape[1], dtype=dtype, **kwargs)
    randomize_bn_state(theirs, gen)
    ours = ours_cls(shape[1], dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(module, x, layout, grad):
    """One forward/backward; returns the output, the gradients and a copy of the state."""
    module.zero_grad(set_to_none=True)
    xl = make_layout(x.detach().clone(), layout).requires_grad_(True)
    y = module(xl)
    y.backward(grad)
    grads = {"input": xl.grad}
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return y.detach(), grads, snapshot_state(module)


def _assert_step_matches(ours, theirs, dtype):
    (y, grads, state), (ty, tgrads, tstate) = ours, theirs
    tol = TOL[dtype]
    assert y.dtype == ty.dtype == dtype
    torch.testing.assert_close(y, ty, **tol)
    assert grads.keys() == tgrads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], tgrads[name], **tol, msg=labelled(name))
    assert state.keys() == tstate.keys()
    for key in state:
        if key == "num_batches_tracked":
            assert torch.equal(state[key], tstate[key])
        else:
            torch.testing.assert_close(state[key], tstate[key], **tol, msg=labelled(key))


class _ReferenceLayer:
    """The module's behaviour rebuilt from reference.py (float64 NumPy), step by step."""

    def __init__(self, module):
        sd = module.state_dict()
        self.gamma = to_np64(sd["weight"]) if "weight" in sd else None
        self.beta = to_np64(sd["bias"]) if "bias" in sd else None
        self.mean = to_np64(sd["running_mean"]) if "running_mean" in sd else None
        self.var = to_np64(sd["running_var"]) if "running_var" in sd else None
        self.steps = int(sd["num_batches_tracked"]) if "num_batches_tracked" in sd else None
        self.momentum = module.momentum

    def step(self, x, grad, training):
        x64, g64 = to_np64(x), to_np64(grad)
        if training or self.mean is None:
            y, mu_B, sigma2_B = reference.batch_norm_train(x64, self.gamma, self.beta, EPS)
            dx, dgamma, dbeta = reference.batch_norm_train_backward(g64, x64, self.gamma, EPS)
            if training and self.mean is not None:
                self.steps += 1
                momentum = 1.0 / self.steps if self.momentum is None else self.momentum
                m = x.numel() // x.shape[1]
                self.mean, self.var = reference.update_running_statistics(
                    self.mean, self.var, mu_B, sigma2_B, m, momentum
                )
        else:
            y = reference.batch_norm_inference(x64, self.mean, self.var, self.gamma, self.beta, EPS)
            dx, dgamma, dbeta = reference.batch_norm_inference_backward(
                g64, x64, self.mean, self.var, self.gamma, EPS
            )
        return y, {"input": dx, "weight": dgamma, "bias": dbeta}

    def assert_matches(self, ours, ref_out, dtype):
        (y, grads, state), (ry, rgrads) = ours, ref_out
        tol = TOL[dtype]
        torch.testing.assert_close(y.double(), from_np(ry), **tol)
        for name, got in grads.items():
            torch.testing.assert_close(
                got.double(), from_np(rgrads[name]), **tol, msg=labelled(name)
            )
        if self.mean is not None:
            torch.testing.assert_close(state["running_mean"].double(), from_np(self.mean), **tol)
            torch.testing.assert_close(state["running_var"].double(), from_np(self.var), **tol)
            assert state["num_batches_tracked"].item() == self.steps


def _run_schedule(shape, dtype, layout, gen, modes, **kwargs):
    ours, theirs = _module_pair(shape, dtype, gen, **kwargs)
    ref = _ReferenceLayer(theirs)
    for training in modes:
        ours.train(training)
        theirs.train(training)
        x = make_input(shape, dtype, layout, gen, scale=1.5, offset=0.5)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        got = _step(ours, x, layout, grad)
        _assert_step_matches(got, _step(theirs, x, layout, grad), dtype)
        ref.assert_matches(got, ref.step(x, grad, training), dtype)


# --- parity with torch.nn and with the reference ------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_module_matches_torch_and_reference_train_then_eval(shape, dtype, layout, gen):
    _run_schedule(shape, dtype, layout, gen, modes=[True, True, False])


@pytest.mark.parametrize(
    "config",
    ["affine", "no_affine", "no_bias", "no_running_stats"],
)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((7, 3), "contiguous"), ((4, 3, 5, 6), "channels_last")],
    ids=["7x3", "4x3x5x6-channels_last"],
)
def test_module_matches_torch_and_reference_over_steps(shape, layout, dtype, momentum, config, gen):
    kwargs = {
        "affine": dict(),
        "no_affine": dict(affine=False),
        "no_bias": dict(bias=False),
        "no_running_stats": dict(track_running_stats=False),
    }[config]
    _run_schedule(
        shape,
        dtype,
        layout,
        gen,
        modes=[True, True, True, False, True],
        momentum=momentum,
        **kwargs,
    )


def test_module_is_a_torch_batchnorm_subclass():
    for name, cls in OURS.items():
        torch_cls = getattr(torch.nn, f"BatchNorm{name}")
        assert issubclass(cls, torch_cls)
        assert isinstance(cls(3), torch_cls)


@pytest.mark.parametrize("name", ["1d", "2d", "3d"])
def test_module_constructor_signature_matches_torch(name):
    # Names, kinds and defaults; annotations may be strings (postponed evaluation) in ours.
    def params(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    # Ours adds keyword-only arguments at the end only, so every call that works with torch's
    # class works with ours.
    extra = [
        ("nonfinite", inspect.Parameter.KEYWORD_ONLY, "skip"),
        ("single_value", inspect.Parameter.KEYWORD_ONLY, "raise"),
    ]
    assert params(OURS[name]) == params(getattr(torch.nn, f"BatchNorm{name}")) + extra


def test_module_bias_false_has_no_bias_parameter():
    ours, theirs = batchnorm.BatchNorm2d(3, bias=False), torch.nn.BatchNorm2d(3, bias=False)
    assert ours.bias is None and ours.weight is not None
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


# --- evaluation mode is exact ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(7, 3), (3, 5, 7), (4, 3, 5, 6), (5, 2, 3, 4, 3)], ids=shape_id)
def test_module_eval_leaves_buffers_exactly_unchanged(eval_routing, shape, layout, gen):
    ours, _ = _module_pair(shape, torch.float32, gen)
    ours(make_input(shape, torch.float32, layout, gen))  # one training step: nbt = 1
    ours.eval()
    snapshot = snapshot_state(ours)
    x = make_input(shape, torch.float32, layout, gen).requires_grad_(True)
    ours(x).sum().backward()
    assert_state_unchanged(ours, snapshot)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (3, 5, 7), (4, 3, 5, 6), (5, 2, 3, 4, 3)], ids=shape_id)
def test_module_eval_output_of_one_example_ignores_the_batch(
    eval_routing, shape, dtype, layout, gen
):
    ours, _ = _module_pair(shape, dtype, gen)
    ours.eval()
    x = make_input(shape, dtype, layout, gen)
    with torch.no_grad():
        y = ours(x)
        for k in range(shape[0]):
            assert torch.equal(ours(x[k : k + 1]), y[k : k + 1]), f"example {k}"
        # Replacing the rest of the batch changes nothing for example 0.
        other = make_input(shape, dtype, layout, gen, scale=100.0)
        other[0] = x[0]
        assert torch.equal(ours(other)[0], y[0])


def test_module_eval_without_running_stats_uses_batch_statistics(eval_routing, gen):
    # track_running_stats=False: torch.nn normalizes with the batch's statistics in eval too.
    ours, theirs = _module_pair((6, 4, 3, 3), torch.float64, gen, track_running_stats=False)
    ours.eval(), theirs.eval()
    x = make_input((6, 4, 3, 3), torch.float64, "contiguous", gen, scale=3.0, offset=2.0)
    y, _, _ = reference.batch_norm_train(to_np64(x), to_np64(ours.weight), to_np64(ours.bias), EPS)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])
    torch.testing.assert_close(ours(x).detach(), from_np(y), **TOL[torch.float64])


# --- rejection leaves every buffer and parameter untouched -------------------------------------


def _trained_module(name, dtype=torch.float32, **kwargs):
    """A layer with 3 channels, random state and num_batches_tracked = 1."""
    gen = torch.Generator().manual_seed(7)
    module = OURS[name](3, dtype=dtype, **kwargs)
    randomize_bn_state(module, gen)
    shape = {"1d": (4, 3), "2d": (4, 3, 2, 2), "3d": (4, 3, 2, 2, 2)}[name]
    module(make_input(shape, dtype, "contiguous", gen))
    assert module.num_batches_tracked.item() == 1
    return module


def _assert_rejected(module, x, error, match):
    snapshot = snapshot_state(module)
    with pytest.raises(error, match=match):
        module(x)
    assert_state_unchanged(module, snapshot)


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("1d", (4,), r"expected 2-D or 3-D input"),
        ("1d", (4, 3, 2, 2), r"expected 2-D or 3-D input"),
        ("2d", (4, 3, 5), r"expected 4-D input"),
        ("2d", (4, 3, 2, 2, 2), r"expected 4-D input"),
        ("3d", (4, 3, 2, 2), r"expected 5-D input"),
    ],
    ids=["1d-1D", "1d-4D", "2d-3D", "2d-5D", "3d-4D"],
)
def test_forward_rejects_wrong_rank_without_touching_state(name, shape, match):
    module = _trained_module(name)
    prefix = rf"^BatchNorm{name}\(num_features=3\): "
    _assert_rejected(module, torch.ones(shape), ValueError, prefix + match)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("1d", (4, 5)), ("1d", (4, 2, 6)), ("2d", (4, 5, 2, 2)), ("3d", (2, 1, 2, 2, 2))],
    ids=["1d-4x5", "1d-4x2x6", "2d-4x5x2x2", "3d-2x1x2x2x2"],
)
def test_forward_rejects_wrong_channels_without_touching_state(name, shape):
    module = _trained_module(name)
    match = rf"^BatchNorm{name}\(num_features=3\): expected .*\b3 channels"
    _assert_rejected(module, torch.ones(shape), ValueError, match)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_forward_rejects_non_floating_dtype_without_touching_state(dtype):
    module = _trained_module("2d")
    match = r"^BatchNorm2d\(num_features=3\): .*floating"
    _assert_rejected(module, torch.ones(4, 3, 2, 2, dtype=dtype), TypeError, match)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("1d", (1, 3)), ("1d", (1, 3, 1)), ("2d", (1, 3, 1, 1)), ("3d", (1, 3, 1, 1, 1))],
    ids=["1d-1x3", "1d-1x3x1", "2d-1x3x1x1", "3d-1x3x1x1x1"],
)
def test_forward_rejects_one_value_per_channel_in_training_without_touching_state(name, shape):
    # torch 2.13 raises too, but only after incrementing num_batches_tracked.
    module = _trained_module(name)
    match = rf"^BatchNorm{name}\(num_features=3\): .*more than 1 value per channel"
    _assert_rejected(module, torch.ones(shape), ValueError, match)


def test_forward_rejects_one_value_per_channel_in_eval_without_running_stats():
    module = OURS["1d"](3, track_running_stats=False).eval()
    _assert_rejected(module, torch.ones(1, 3), ValueError, r"more than 1 value per channel")


def test_forward_accepts_one_value_per_channel_in_eval_with_running_stats(eval_routing, gen):
    ours, theirs = _module_pair((1, 3), torch.float32, gen)
    ours.eval(), theirs.eval()
    x = make_input((1, 3), torch.float32, "contiguous", gen)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


@pytest.mark.parametrize(
    ("module_dtype", "input_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["float32_module-float64_input", "float64_module-float32_input"],
)
def test_forward_rejects_dtype_mismatch_without_touching_state(module_dtype, input_dtype):
    module = _trained_module("2d", dtype=module_dtype)
    match = r"^BatchNorm2d\(num_features=3\): .*dtype"
    _assert_rejected(module, torch.ones(4, 3, 2, 2, dtype=input_dtype), TypeError, match)


@pytest.mark.parametrize(
    ("module_dtype", "input_dtype"),
    [
        (torch.float64, torch.bfloat16),
        (torch.float64, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
    ids=[
        "float64_module-bfloat16_input",
        "float64_module-float16_input",
        "float16_module-bfloat16_input",
    ],
)
def test_forward_rejects_half_input_with_unsupported_parameter_dtype_without_touching_state(
    module_dtype, input_dtype
):
    # torch's native op (the fallback for half inputs) takes parameters of the input's dtype or
    # float32, nothing else; the check must happen before num_batches_tracked moves, and a
    # wrong dtype is a TypeError (STYLE b.4), not the native op's RuntimeError.
    module = _trained_module("2d", dtype=module_dtype)
    match = r"^BatchNorm2d\(num_features=3\): .*dtype"
    _assert_rejected(module, torch.ones(4, 3, 2, 2, dtype=input_dtype), TypeError, match)


@pytest.mark.parametrize(
    ("module_dtype", "input_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float16, torch.float16),
    ],
    ids=[
        "float32_module-bfloat16_input",
        "float32_module-float16_input",
        "float16_module-float16_input",
    ],
)
def test_forward_accepts_half_input_with_dtypes_torch_accepts(module_dtype, input_dtype, gen):
    ours, theirs = _module_pair((4, 3, 2, 2), module_dtype, gen)
    x = make_input((4, 3, 2, 2), input_dtype, "contiguous", gen)
    torch.testing.assert_close(ours(x), theirs(x))
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, msg=labelled(key))


@pytest.mark.parametrize("name", ["1d", "2d", "3d"])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_features=0), ValueError, "num_features"),
        (dict(num_features=-2), ValueError, "num_features"),
        (dict(num_features=2.5), TypeError, "num_features"),
        (dict(num_features=3, eps=-1e-5), ValueError, "eps"),
        (dict(num_features=3, momentum=-0.1), ValueError, "momentum"),
        (dict(num_features=3, momentum=1.5), ValueError, "momentum"),
    ],
    ids=[
        "features_0",
        "features_negative",
        "features_float",
        "eps_negative",
        "momentum_negative",
        "momentum_above_1",
    ],
)
def test_constructor_rejects_bad_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=rf"^BatchNorm{name}\(.*\): .*{match}"):
        OURS[name](**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=0.0), dict(momentum=1.0), dict(momentum=None), dict(eps=0.0)],
    ids=["momentum_0", "momentum_1", "momentum_None", "eps_0"],
)
def test_constructor_accepts_boundary_arguments(kwargs):
    ours, theirs = batchnorm.BatchNorm2d(3, **kwargs), torch.nn.BatchNorm2d(3, **kwargs)
    assert (ours.eps, ours.momentum) == (theirs.eps, theirs.momentum)


# --- empty batch -------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (0, 3, 2, 2, 2)], ids=shape_id)
def test_module_empty_batch_returns_empty_and_keeps_state(eval_routing, shape, training):
    name = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[len(shape)]
    module = _trained_module(name).train(training)
    snapshot = snapshot_state(module)
    x = torch.empty(shape, requires_grad=True)
    y = module(x)
    assert y.shape == shape and y.dtype == torch.float32
    # Deliberate difference from torch 2.13, which counts the empty batch in num_batches_tracked.
    assert_state_unchanged(module, snapshot)
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(module.weight.grad, torch.zeros(3))  # no values, no gradient (as torch)
    assert torch.equal(module.bias.grad, torch.zeros(3))


# --- state_dict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(affine=False), dict(bias=False), dict(track_running_stats=False)],
    ids=["default", "no_affine", "no_bias", "no_running_stats"],
)
@pytest.mark.parametrize("name", ["1d", "2d", "3d"])
def test_state_dict_keys_and_version_match_torch(name, kwargs):
    ours = OURS[name](4, **kwargs)
    theirs = getattr(torch.nn, f"BatchNorm{name}")(4, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours._version == theirs._version == 2
    assert ours.state_dict()._metadata[""]["version"] == 2


def test_state_dict_loads_torch_state_into_ours(eval_routing, gen):
    theirs = torch.nn.BatchNorm2d(5)
    randomize_bn_state(theirs, gen)
    theirs(make_input((4, 5, 3, 3), torch.float32, "contiguous", gen))  # nbt = 1
    ours = batchnorm.BatchNorm2d(5)
    ours.load_state_dict(theirs.state_dict())
    assert_state_unchanged(ours, snapshot_state(theirs))
    ours.eval(), theirs.eval()
    x = make_input((4, 5, 3, 3), torch.float32, "contiguous", gen)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


def test_state_dict_loads_our_state_into_torch(eval_routing, gen):
    ours = batchnorm.BatchNorm2d(5)
    randomize_bn_state(ours, gen)
    for _ in range(3):
        ours(make_input((4, 5, 3, 3), torch.float32, "channels_last", gen))
    theirs = torch.nn.BatchNorm2d(5)
    theirs.load_state_dict(ours.state_dict())
    assert_state_unchanged(theirs, snapshot_state(ours))
    assert theirs.num_batches_tracked.item() == 3
    ours.eval(), theirs.eval()
    x = make_input((4, 5, 3, 3), torch.float32, "contiguous", gen)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])


@pytest.mark.parametrize("nested", [False, True], ids=["root", "nested"])
def test_state_dict_version_1_without_num_batches_tracked_loads_zero(nested, gen):
    # Checkpoints written before version 2 have no num_batches_tracked; it loads as 0.
    def wrap(bn):
        return torch.nn.Sequential(torch.nn.Identity(), bn) if nested else bn

    source = wrap(torch.nn.BatchNorm2d(3))
    randomize_bn_state(source[1] if nested else source, gen)
    prefix, meta_key = ("1.", "1") if nested else ("", "")
    sd = source.state_dict()
    del sd[prefix + "num_batches_tracked"]
    sd._metadata[meta_key]["version"] = 1

    ours, theirs = wrap(batchnorm.BatchNorm2d(3)), wrap(torch.nn.BatchNorm2d(3))
    result = ours.load_state_dict(sd, strict=True)
    theirs.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = snapshot_state(ours)
    assert loaded[prefix + "num_batches_tracked"].dtype == torch.long
    assert loaded[prefix + "num_batches_tracked"].item() == 0
    assert_state_unchanged(theirs, loaded)
    torch.testing.assert_close(loaded[prefix + "running_mean"], sd[prefix + "running_mean"])


def test_state_dict_missing_num_batches_tracked_at_version_2_is_reported():
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        batchnorm.BatchNorm2d(3).load_state_dict(sd, strict=True)


# --- finite differences through the module ---------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [((4, 2), "contiguous"), ((3, 2, 2, 2), "contiguous"), ((3, 2, 2, 2), "channels_last")],
    ids=["4x2", "3x2x2x2-contiguous", "3x2x2x2-channels_last"],
)
def test_module_gradcheck_and_gradgradcheck(eval_routing, shape, layout, training, gen):
    dtype = torch.float64
    module, _ = _module_pair(shape, dtype, gen)
    module.train(training)
    x = make_input(shape, dtype, layout, gen).requires_grad_(True)
    weight = module.weight.detach().clone().requires_grad_(True)
    bias = module.bias.detach().clone().requires_grad_(True)

    def fn(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((4, 3, 5, 6), torch.channels_last), ((2, 3, 2, 4, 3), torch.channels_last_3d)],
    ids=["2d", "3d"],
)
def test_module_output_keeps_channels_last_like_torch(
    eval_routing, shape, memory_format, training, gen
):
    ours, theirs = _module_pair(shape, torch.float32, gen)
    ours.train(training), theirs.train(training)
    x = make_input(shape, torch.float32, "contiguous", gen).contiguous(memory_format=memory_format)
    y, ty = ours(x), theirs(x)
    assert ty.is_contiguous(memory_format=memory_format)
    assert y.is_contiguous(memory_format=memory_format)
    assert y.stride() == ty.stride()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_output_takes_an_in_place_activation_as_torch_nns_does(training, memory_format):
    # BatchNorm2d then ReLU(inplace=True) is torch.nn's everyday pattern; a channels-last output
    # that was a view made inside our autograd Function made autograd refuse it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    results = []
    for layer in (
        batchnorm.BatchNorm2d(3, dtype=torch.float64),
        torch.nn.BatchNorm2d(3, dtype=torch.float64),
    ):
        model = torch.nn.Sequential(layer, torch.nn.ReLU(inplace=True)).train(training)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        assert y.is_contiguous(memory_format=memory_format)
        results.append((y.detach(), xi.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
