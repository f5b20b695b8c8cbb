"""Mistakes torch rejects are rejected here too, with an exception torch's code can catch.

torch itself is the oracle: each case makes the same mistake with torch.nn (or
``torch.nn.functional.batch_norm``) and with this package, and checks that ours raises an
instance of the class torch raised, that its message holds torch's own words for the mistake,
and that nothing changed (running statistics, counter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from conftest import assert_state_unchanged, snapshot_state


def _raised(call):
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the exception is what the test compares
        return err
    raise AssertionError("expected the call to raise")


def _key_words(torch_error: Exception) -> str:
    # torch's message up to the first line break; some end with a C++ stack in debug builds.
    return str(torch_error).splitlines()[0].strip()


def _assert_torch_compatible(ours: Exception, theirs: Exception):
    assert isinstance(ours, type(theirs)), (type(ours).__mro__, type(theirs))
    assert _key_words(theirs) in str(ours), (str(ours), _key_words(theirs))


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


FUNCTIONAL = {
    "eps-0-training": lambda f: f(_x(4, 3), None, None, training=True, eps=0.0),
    "eps-negative-eval": lambda f: f(_x(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0),
    "eval-without-statistics": lambda f: f(_x(4, 3), None, None, training=False),
    "integer-input": lambda f: f(torch.ones(4, 3, dtype=torch.int64), None, None, training=True),
    "float64-input-float32-weight": lambda f: f(
        _x(4, 3, dtype=torch.float64), None, None, torch.ones(3), None, training=True
    ),
    "float32-input-float64-statistics": lambda f: f(
        _x(4, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ),
    "weight-of-4": lambda f: f(_x(4, 3), None, None, torch.ones(4), None, training=True),
    "statistics-of-4": lambda f: f(_x(4, 3), torch.zeros(4), torch.ones(4), training=True),
    "only-running-mean": lambda f: f(_x(4, 3), torch.zeros(3), None, training=True),
    "one-dim-input": lambda f: f(_x(5), None, None, training=True),
    "zero-dim-input": lambda f: f(torch.tensor(1.0), None, None, training=True),
    "weight-on-meta": lambda f: f(
        _x(4, 3), None, None, torch.ones(3, device="meta"), None, training=True
    ),
    "momentum-none": lambda f: f(
        _x(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None
    ),
    "one-value-per-channel": lambda f: f(_x(1, 3), None, None, training=True),
}


@pytest.mark.parametrize("case", FUNCTIONAL.values(), ids=FUNCTIONAL.keys())
def test_functional_rejects_what_torch_rejects_with_torchs_class_and_words(case):
    theirs = _raised(lambda: case(F.batch_norm))
    ours = _raised(lambda: case(batchnorm.batch_norm))
    _assert_torch_compatible(ours, theirs)


MODULES = {
    "rank-1d": (lambda: torch.nn.BatchNorm1d(3), lambda: _x(2, 3, 4, 4)),
    "rank-2d": (lambda: torch.nn.BatchNorm2d(3), lambda: _x(2, 3, 4)),
    "rank-3d": (lambda: torch.nn.BatchNorm3d(3), lambda: _x(2, 3, 4, 4)),
    "channels": (lambda: torch.nn.BatchNorm2d(3), lambda: _x(2, 4, 3, 3)),
    "channels-no-running": (
        lambda: torch.nn.BatchNorm2d(3, track_running_stats=False),
        lambda: _x(2, 4, 3, 3),
    ),
    "one-value-per-channel": (lambda: torch.nn.BatchNorm1d(3), lambda: _x(1, 3)),
    "integer-input": (lambda: torch.nn.BatchNorm1d(3), lambda: torch.ones(4, 3).long()),
    "float64-input": (lambda: torch.nn.BatchNorm1d(3), lambda: _x(4, 3, dtype=torch.float64)),
    "float32-input-float64-layer": (lambda: torch.nn.BatchNorm1d(3).double(), lambda: _x(4, 3)),
    "bfloat16-input-float64-layer": (
        lambda: torch.nn.BatchNorm1d(3).double(),
        lambda: _x(4, 3).bfloat16(),
    ),
    "not-a-tensor": (lambda: torch.nn.BatchNorm1d(3), lambda: [[1.0, 2.0, 3.0]]),
    "eps-0": (lambda: torch.nn.BatchNorm1d(3, eps=0.0), lambda: _x(4, 3)),
}


@pytest.mark.parametrize(("make", "make_input"), MODULES.values(), ids=MODULES.keys())
def test_layers_reject_what_torch_rejects_with_torchs_class_and_words(make, make_input):
    theirs_layer = make()
    ours_layer = batchnorm.convert(torch.nn.Sequential(make()))[0]
    before = snapshot_state(ours_layer)
    theirs = _raised(lambda: theirs_layer(make_input()))
    ours = _raised(lambda: ours_layer(make_input()))
    _assert_torch_compatible(ours, theirs)
    assert_state_unchanged(ours_layer, before)


def test_inference_mode_buffers_are_left_untouched_by_a_rejected_training_call():
    with torch.inference_mode():
        layer = batchnorm.BatchNorm1d(3)
        theirs_layer = torch.nn.BatchNorm1d(3)
    _assert_torch_compatible(
        _raised(lambda: layer(_x(4, 3))), _raised(lambda: theirs_layer(_x(4, 3)))
    )
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert layer.num_batches_tracked.item() == 0
    with torch.inference_mode():  # where torch allows the update, so do we
        layer(_x(4, 3))
    assert layer.num_batches_tracked.item() == 1
    layer.eval()
    with torch.no_grad():  # evaluation writes nothing: fine outside inference mode
        torch.testing.assert_close(layer(_x(4, 3)), _eval(layer))


def _eval(layer):
    with torch.no_grad():
        twin = torch.nn.BatchNorm1d(3)
        twin.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
        return twin.eval()(_x(4, 3))


@pytest.mark.parametrize("momentum", [float("nan"), -0.1, 1.5], ids=["nan", "negative", "1.5"])
def test_momentum_is_checked_where_it_is_used(momentum):
    layer = batchnorm.BatchNorm1d(3)
    layer.momentum = momentum  # the constructor checks it; later assignments are not seen
    before = snapshot_state(layer)
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\] or None"):
        layer(_x(4, 3))
    assert_state_unchanged(layer, before)
    with pytest.raises(ValueError, match=r"expected momentum in \[0, 1\] or None"):
        batchnorm.batch_norm(
            _x(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=momentum
        )
    # Unused, as torch's layers: evaluation mode and training without running statistics.
    layer.eval()
    torch.testing.assert_close(layer(_x(4, 3)), torch.nn.BatchNorm1d(3).eval()(_x(4, 3)))
    layer.train()
    layer.track_running_stats = False
    layer.running_mean = layer.running_var = None
    layer(_x(4, 3))


def test_tensor_momentum_gets_an_error_naming_momentum():
    layer = batchnorm.BatchNorm1d(3)
    layer.momentum = torch.tensor(0.1)
    before = snapshot_state(layer)
    with pytest.raises(TypeError, match=r"expected momentum to be a float or None, got a tensor"):
        layer(_x(4, 3))
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")], ids=["zero", "negative", "nan"])
def test_eps_is_checked_where_it_is_used(eps):
    layer = batchnorm.BatchNorm1d(3)
    layer.eps = eps
    before = snapshot_state(layer)
    with pytest.raises(ValueError, match=r"expected a positive eps .* \(torch: batch_norm eps"):
        layer(_x(4, 3))
    assert_state_unchanged(layer, before)
