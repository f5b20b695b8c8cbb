"""The layers' shortcut for the common case (``_route._plain_case``) against the full path.

The shortcut skips ``check_batch_norm_args`` and reads parameters and buffers from the module's
dicts; it must serve exactly the calls the full path would serve the same way, and hand every
other call (bad state, unusual types, errors) to the full path. Each test below either compares
the two paths on one state, or breaks one thing the shortcut tests for and expects the full
path's answer: an error in this package's words, or torch.nn's result.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm
from batchnorm import NonFiniteStatisticsError, NonFiniteStatisticsWarning, _autograd, _route
from conftest import TOL, assert_state_unchanged, make_input, randomize_bn_state, snapshot_state


@pytest.fixture
def full_path_calls(monkeypatch):
    """Count the full path's first step, the layer's input check (the shortcut makes none)."""
    calls = []
    check = _route.check_layer_input

    def counting(*args, **kwargs):
        calls.append(args[0])
        return check(*args, **kwargs)

    monkeypatch.setattr(_route, "check_layer_input", counting)
    return calls


def _without_shortcut(monkeypatch):
    monkeypatch.setattr(_route, "_plain_case", lambda layer, x, activation=None: None)


def _run(layer, batches, grad_out):
    """Training steps: outputs, input/parameter gradients, state and warnings, per step."""
    record = []
    for x in batches:
        layer.zero_grad(set_to_none=True)
        x = x.detach().clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
        y.backward(grad_out)
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        record.append((y.detach(), grads, snapshot_state(layer), [str(w.message) for w in caught]))
    return record


CONFIGS = {
    "default": {},
    "cumulative": {"momentum": None},
    "no-affine": {"affine": False},
    "no-bias": {"bias": False},
    "untracked": {"track_running_stats": False},
    "momentum-0": {"momentum": 0.0},
}


def _compare_paths(monkeypatch, full_path_calls, gen, config, dtype, layout, training):
    """Run the same steps through the shortcut and the full path; assert bit-equal results.

    In training the second of three batches holds a NaN, for the non-finite guard to skip.
    Returns the two layers, for what the caller checks beyond that.
    """
    shape = (6, 3, 4, 5)
    batches = [make_input(shape, dtype, layout, gen) for _ in range(3 if training else 2)]
    if training:
        batches[1][0, 1, 0, 0] = float("nan")
    grad_out = make_input(shape, dtype, "contiguous", gen)
    fast = batchnorm.BatchNorm2d(3, dtype=dtype, **config)
    randomize_bn_state(fast, gen)
    full = batchnorm.BatchNorm2d(3, dtype=dtype, **config)
    full.load_state_dict(fast.state_dict())
    fast.train(training), full.train(training)

    got = _run(fast, batches, grad_out)
    assert full_path_calls == []
    _without_shortcut(monkeypatch)
    want = _run(full, batches, grad_out)
    assert len(full_path_calls) == len(batches)

    for (y, grads, state, msgs), (y_w, grads_w, state_w, msgs_w) in zip(got, want, strict=True):
        torch.testing.assert_close(y, y_w, rtol=0, atol=0, equal_nan=True)
        for g, g_w in zip(grads, grads_w, strict=True):
            torch.testing.assert_close(g, g_w, rtol=0, atol=0, equal_nan=True)
        assert state.keys() == state_w.keys()
        for key in state:
            torch.testing.assert_close(state[key], state_w[key], rtol=0, atol=0, msg=key)
        assert msgs == msgs_w
    return fast, full


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_shortcut_and_full_path_agree_step_by_step(
    config, dtype, layout, full_path_calls, monkeypatch, gen
):
    fast, full = _compare_paths(monkeypatch, full_path_calls, gen, config, dtype, layout, True)
    assert fast.nonfinite_batches_skipped == full.nonfinite_batches_skipped
    assert fast.nonfinite_batches_skipped == (1 if config.get("track_running_stats", True) else 0)


@pytest.mark.parametrize("config", [{}, {"affine": False}, {"bias": False}], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_shortcut_and_full_path_agree_in_evaluation(
    eval_routing, config, dtype, layout, full_path_calls, monkeypatch, gen
):
    # Both routings: the shortcut's direct call of torch's op (shipped, small inputs) and its
    # kernel call (eval_native_bytes=0) against the full path's.
    _compare_paths(monkeypatch, full_path_calls, gen, config, dtype, layout, False)


def test_shortcut_raise_policy_raises_and_changes_nothing(full_path_calls, gen):
    layer = batchnorm.BatchNorm2d(3, nonfinite="raise")
    randomize_bn_state(layer, gen)
    before = snapshot_state(layer)
    x = make_input((4, 3, 2, 2), torch.float32, "contiguous", gen)
    x[0, 2, 1, 1] = float("inf")
    with pytest.raises(NonFiniteStatisticsError, match=r"in channels 2"):
        layer(x)
    assert_state_unchanged(layer, before)
    assert full_path_calls == []


def _break_weight_shape(layer):
    layer.weight = torch.nn.Parameter(torch.ones(4))


def _break_weight_dtype(layer):
    layer.weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))


def _break_running_var_shape(layer):
    layer.running_var = torch.ones(5)


def _break_running_mean_dtype(layer):
    layer.running_mean = torch.zeros(3, dtype=torch.float64)


def _break_counter_for_cumulative(layer):
    layer.momentum = None
    layer.num_batches_tracked = None


def _break_momentum_type(layer):
    layer.momentum = "0.1"


def _break_eps_type(layer):
    layer.eps = "1e-5"


def _break_nonfinite_policy(layer):
    layer.nonfinite = "ignore"


def _break_counter_size(layer):
    layer.num_batches_tracked = torch.zeros(2, dtype=torch.long)


BROKEN = {
    "weight-shape": (_break_weight_shape, ValueError, r"weight of shape \(3,\)"),
    "weight-dtype": (_break_weight_dtype, TypeError, r"layer's dtype float64"),
    "running-var-shape": (_break_running_var_shape, ValueError, r"running_var of shape \(3,\)"),
    "running-mean-dtype": (_break_running_mean_dtype, TypeError, r"running_mean with dtype"),
    "cumulative-no-counter": (_break_counter_for_cumulative, ValueError, r"num_batches_tracked"),
    "momentum-type": (_break_momentum_type, TypeError, r"expected momentum to be a float"),
    "eps-type": (_break_eps_type, TypeError, r"expected eps to be a float"),
    "nonfinite-policy": (_break_nonfinite_policy, ValueError, r"nonfinite"),
    "counter-size": (_break_counter_size, TypeError, r"1-element tensor"),
}


EVAL_BROKEN = ("weight-shape", "weight-dtype", "running-var-shape", "running-mean-dtype")
BROKEN_CASES = [
    pytest.param(mode, *BROKEN[name], id=f"{mode}-{name}")
    for mode in ("train", "eval")
    for name in BROKEN
    if mode == "train" or name in EVAL_BROKEN
]


@pytest.mark.parametrize(("mode", "breaking", "error", "match"), BROKEN_CASES)
def test_broken_state_reaches_the_full_checks_and_changes_nothing(
    mode, breaking, error, match, full_path_calls, gen
):
    # Without its own test for each of these, the shortcut would hand the kernels arrays of
    # the wrong size or type (out-of-bounds reads and writes), or fold a batch it should not.
    layer = batchnorm.BatchNorm2d(3).train(mode == "train")
    breaking(layer)
    before = snapshot_state(layer)
    with pytest.raises(error, match=match):
        layer(make_input((4, 3, 2, 2), torch.float32, "contiguous", gen))
    assert len(full_path_calls) == 1
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: torch.zeros(2, 4, 3, 3), ValueError, r"expected input with 3 channels"),
        (lambda: torch.zeros(2, 3, 3), ValueError, r"expected 4-D input"),
        (lambda: torch.zeros(2, 3, 3, 3, dtype=torch.float64), TypeError, r"float64"),
        (lambda: torch.zeros(1, 3, 1, 1), ValueError, r"more than 1 value per channel"),
    ],
    ids=["channels", "rank", "dtype", "one-value"],
)
def test_bad_training_input_is_reported_by_the_full_path(make, error, match, full_path_calls):
    layer = batchnorm.BatchNorm2d(3)
    before = snapshot_state(layer)
    with pytest.raises(error, match=match):
        layer(make())
    assert_state_unchanged(layer, before)


def test_running_stats_that_require_grad_take_the_full_path(full_path_calls, gen):
    # torch.nn's own layer raises here; ours updates them outside the graph (functional's
    # fallback), and says nothing about the input's layout, which is fine.
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.running_mean.requires_grad_(True)
    x = make_input((4, 3, 2, 2), torch.float32, "contiguous", gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ours(x)
    torch.testing.assert_close(y, theirs(x), **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float32])
    assert ours.running_mean.requires_grad and ours.running_mean.grad_fn is None
    assert len(full_path_calls) == 1


def test_parametrized_weight_takes_the_full_path(full_path_calls, gen):
    # A parametrization removes "weight" from _parameters and computes it on access: the
    # shortcut, which reads the dict, must not mistake the layer for one without a weight.
    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for layer in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    x = make_input((4, 3, 2, 2), torch.float32, "contiguous", gen)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    assert len(full_path_calls) == 1


def test_shortcut_sees_parameters_replaced_in_place_of_the_old_ones(full_path_calls, gen):
    # .data reassignment and set_() change the memory behind a parameter: the shortcut reads
    # the tensors anew on every call, so the next step must use the new values.
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = make_input((4, 3, 2, 2), torch.float32, "contiguous", gen)
    ours(x), theirs(x)
    new_weight = torch.rand(3, generator=gen) + 0.5
    new_mean = torch.randn(3, generator=gen)
    for layer in (ours, theirs):
        layer.weight.data = new_weight.clone()
        layer.running_mean.set_(new_mean.clone())
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL[torch.float32])
    assert full_path_calls == []


def test_warning_names_the_layer_on_the_shortcut(gen):
    layer = batchnorm.BatchNorm1d(4)
    x = make_input((5, 4), torch.float32, "contiguous", gen)
    x[0, 3] = float("nan")
    with pytest.warns(NonFiniteStatisticsWarning, match=r"BatchNorm1d\(num_features=4\)"):
        layer(x)
    assert layer.nonfinite_batches_skipped == 1
    assert int(layer.num_batches_tracked) == 0


def test_functional_call_uses_the_tensors_it_is_given(gen):
    # torch.func.functional_call swaps the module's parameters and buffers for the call: the
    # shortcut, which reads the module's dicts, must see the swapped-in tensors.
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = make_input((4, 3, 5, 5), torch.float32, "contiguous", gen)
    given = {
        "weight": torch.rand(3, generator=gen) + 0.5,
        "bias": torch.randn(3, generator=gen),
        "running_mean": torch.randn(3, generator=gen),
        "running_var": torch.rand(3, generator=gen) + 0.5,
        "num_batches_tracked": torch.tensor(3),
    }
    theirs_given = {k: v.clone() for k, v in given.items()}
    before = snapshot_state(ours)
    got = torch.func.functional_call(ours, given, (x,))
    want = torch.func.functional_call(theirs, theirs_given, (x,))
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for key in given:
        torch.testing.assert_close(given[key], theirs_given[key], **TOL[torch.float32], msg=key)
    assert int(given["num_batches_tracked"]) == 4
    assert_state_unchanged(ours, before)


def test_autograd_function_wrapper_is_used_when_the_direct_entry_is_missing(monkeypatch, gen):
    # The direct C++ entry of autograd.Function is private; without it (a future torch), the
    # public wrapper must serve, with the same result.
    x = make_input((6, 3, 4, 5), torch.float64, "contiguous", gen).requires_grad_(True)
    layer = batchnorm.BatchNorm2d(3, dtype=torch.float64)
    y = layer(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    monkeypatch.setattr(_autograd, "_direct_apply", None)
    layer.load_state_dict(batchnorm.BatchNorm2d(3, dtype=torch.float64).state_dict())
    y_wrapped = layer(x)
    (dx_wrapped,) = torch.autograd.grad(y_wrapped.square().sum(), x)
    assert type(y_wrapped.grad_fn).__name__ == type(y.grad_fn).__name__ == "TrainFnBackward"
    torch.testing.assert_close(y_wrapped, y, rtol=0, atol=0)
    torch.testing.assert_close(dx_wrapped, dx, rtol=0, atol=0)
