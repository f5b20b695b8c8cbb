"""The non-finite guard: a batch with NaN/Inf statistics never reaches the running statistics.

torch folds such a batch into ``running_mean``/``running_var`` and the NaN stays there forever
(pytorch#88474). Ours leaves the buffers and ``num_batches_tracked`` as they were and warns
(``nonfinite="skip"``, the default), or raises before touching anything (``"raise"``). Every
path is covered: serial and parallel kernels, both layouts, the autograd Function, the native
fallback, and the custom op that compiled graphs call.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm
from batchnorm import use_routing
from batchnorm._validate import NonFiniteStatisticsError, NonFiniteStatisticsWarning
from conftest import (
    TOL,
    assert_state_unchanged,
    bn_classes,
    make_input,
    randomize_bn_state,
    snapshot_state,
)

POISONS = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
}


@pytest.fixture(params=["serial", "parallel"])
def path(request):
    limit = 1 << 60 if request.param == "serial" else 0
    with use_routing(serial_max_elements=limit, eval_native_bytes=0):
        yield request.param


def _poisoned(shape, dtype, layout, gen, value, channel=1):
    x = make_input(shape, dtype, layout, gen, scale=2.0, offset=0.5)
    index = (0, channel) + (0,) * (len(shape) - 2)
    x[index] = value
    return x


def _skip_warnings(caught):
    return [w for w in caught if issubclass(w.category, NonFiniteStatisticsWarning)]


def _pair(shape, dtype, gen, momentum=0.1, **kwargs):
    ours_cls, torch_cls = bn_classes(len(shape))
    ref = torch_cls(shape[1], momentum=momentum, dtype=dtype)
    randomize_bn_state(ref, gen)
    ours = ours_cls(shape[1], momentum=momentum, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 5, 6), (3, 3, 2, 3, 4)], ids=str)
def test_module_skips_nonfinite_batch_and_keeps_tracking_torch(
    path, shape, dtype, layout, poison, momentum, gen
):
    """A clean batch, a poisoned one, a clean one: ours ends where torch.nn ends after only
    the two clean batches, and counts the skipped one."""
    ours, ref = _pair(shape, dtype, gen, momentum=momentum)
    clean = [make_input(shape, dtype, layout, gen, scale=2.0, offset=0.5) for _ in range(2)]
    bad = _poisoned(shape, dtype, layout, gen, POISONS[poison])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(clean[0])
        snapshot = snapshot_state(ours)
        y_bad = ours(bad)
        assert_state_unchanged(ours, snapshot)
        ours(clean[1])
    assert len(_skip_warnings(caught)) == 1
    assert ours.nonfinite_batches_skipped == 1
    # The poisoned batch's output is torch's: NaN/Inf stay in their channel only.
    want_bad = torch.nn.functional.batch_norm(bad, None, None, ref.weight, ref.bias, True)
    torch.testing.assert_close(y_bad, want_bad.detach(), equal_nan=True, **TOL[dtype])
    assert torch.isfinite(y_bad[:, 0]).all()
    for x in clean:
        ref(x)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **TOL[dtype], msg=key)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_raise_policy_changes_nothing(path, layout, gen):
    ours, _ = _pair((4, 3, 5, 6), torch.float32, gen, nonfinite="raise")
    ours(make_input((4, 3, 5, 6), torch.float32, layout, gen))
    snapshot = snapshot_state(ours)
    bad = _poisoned((4, 3, 5, 6), torch.float32, layout, gen, float("nan"), channel=2)
    with pytest.raises(
        NonFiniteStatisticsError, match=r"BatchNorm2d\(num_features=3\).*channels 2"
    ):
        ours(bad.requires_grad_())
    assert_state_unchanged(ours, snapshot)
    assert ours.nonfinite_batches_skipped == 0


def test_module_skips_batch_whose_variance_overflows_float32(path, gen):
    """Finite float32 values whose variance is beyond float32's range: storing it would put Inf
    in running_var, so the batch is left out like a NaN one."""
    ours, _ = _pair((8, 2), torch.float32, gen)
    x = make_input((8, 2), torch.float32, "contiguous", gen)
    x[:4, 1] = 3e19
    x[4:, 1] = -3e19
    snapshot = snapshot_state(ours)
    with pytest.warns(NonFiniteStatisticsWarning, match="too large"):
        y = ours(x)
    assert torch.isfinite(y).all()
    assert_state_unchanged(ours, snapshot)


def test_module_skip_counts_with_gradients(gen):
    """Through the autograd Function: the guard acts and the backward still runs."""
    ours, _ = _pair((6, 3), torch.float64, gen)
    snapshot = snapshot_state(ours)
    x = _poisoned((6, 3), torch.float64, "contiguous", gen, float("inf")).requires_grad_()
    with pytest.warns(NonFiniteStatisticsWarning):
        ours(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad[:, 0]).all()
    assert_state_unchanged(ours, snapshot)
    assert ours.nonfinite_batches_skipped == 1


def test_module_nonfinite_policy_is_an_attribute(gen):
    ours, _ = _pair((6, 3), torch.float32, gen)
    ours.nonfinite = "raise"
    with pytest.raises(NonFiniteStatisticsError):
        ours(_poisoned((6, 3), torch.float32, "contiguous", gen, float("nan")))
    ours.nonfinite = "ignore"
    snapshot = snapshot_state(ours)
    with pytest.raises(ValueError, match=r"expected nonfinite to be one of 'skip', 'raise'"):
        ours(make_input((6, 3), torch.float32, "contiguous", gen))
    assert_state_unchanged(ours, snapshot)


def test_module_constructor_rejects_unknown_policy():
    with pytest.raises(ValueError, match=r"BatchNorm1d\(\): expected nonfinite .* got 'warn'"):
        batchnorm.BatchNorm1d(3, nonfinite="warn")


def test_module_repr_shows_only_a_non_default_policy():
    assert "nonfinite" not in repr(batchnorm.BatchNorm2d(3))
    assert "nonfinite='raise'" in repr(batchnorm.BatchNorm2d(3, nonfinite="raise"))


def test_converted_torch_layer_gets_the_skip_policy(gen):
    layer = torch.nn.BatchNorm1d(3)
    batchnorm.convert(layer)
    assert layer.nonfinite == "skip"
    snapshot = snapshot_state(layer)
    with pytest.warns(NonFiniteStatisticsWarning):
        layer(_poisoned((6, 3), torch.float32, "contiguous", gen, float("nan")))
    assert_state_unchanged(layer, snapshot)
    assert layer.nonfinite_batches_skipped == 1


def test_eval_mode_never_warns(eval_routing, gen):
    ours, _ = _pair((6, 3), torch.float32, gen)
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ours(_poisoned((6, 3), torch.float32, "contiguous", gen, float("nan")))
    assert torch.isnan(y[0, 1])


# --- the functional op --------------------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_batch_norm_guard_on_native_fallback(nonfinite, gen):
    """float16 input runs on torch's op; the guard still keeps the float32 buffers clean."""
    x = _poisoned((6, 3, 4), torch.float32, "contiguous", gen, float("nan")).half()
    running_mean, running_var = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    nbt = torch.tensor(5)
    before = running_mean.clone(), running_var.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if nonfinite == "raise":
            with pytest.raises(NonFiniteStatisticsError, match=r"batch_norm\(\).*channels 1"):
                batchnorm.batch_norm(
                    x,
                    running_mean,
                    running_var,
                    training=True,
                    momentum=None,
                    num_batches_tracked=nbt,
                    nonfinite=nonfinite,
                )
        else:
            batchnorm.batch_norm(
                x,
                running_mean,
                running_var,
                training=True,
                momentum=None,
                num_batches_tracked=nbt,
                nonfinite=nonfinite,
            )
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    assert int(nbt) == 5
    assert len(_skip_warnings(caught)) == (1 if nonfinite == "skip" else 0)


def test_batch_norm_fallback_still_updates_like_torch_on_clean_batches(gen):
    x = make_input((6, 3, 4), torch.float32, "contiguous", gen).half()
    ours = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    theirs = ours[0].clone(), ours[1].clone()
    nbt = torch.tensor(2)
    batchnorm.batch_norm(x, *ours, training=True, momentum=None, num_batches_tracked=nbt)
    torch.nn.functional.batch_norm(x, *theirs, training=True, momentum=1 / 3)
    assert int(nbt) == 3
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_batch_norm_rejects_unknown_policy_before_any_change(gen):
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"batch_norm\(\): expected nonfinite"):
        batchnorm.batch_norm(
            torch.randn(4, 3), running_mean, running_var, training=True, nonfinite=None
        )
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_update_running_stats_op_guards_compiled_graphs(nonfinite):
    """The op an exported graph calls for the running update has the same guard (there is no
    module to count the batch, so only the warning or the error)."""
    running_mean, running_var, nbt = torch.zeros(2), torch.ones(2), torch.tensor(4)
    mean = torch.tensor([0.5, float("nan")], dtype=torch.float64)
    var = torch.tensor([1.0, 2.0], dtype=torch.float64)
    args = (running_mean, running_var, nbt, mean, var, 10, None, nonfinite, "BatchNorm1d(2)")
    if nonfinite == "raise":
        with pytest.raises(NonFiniteStatisticsError, match=r"BatchNorm1d\(2\).*channels 1"):
            torch.ops.batchnorm.update_running_stats(*args)
    else:
        with pytest.warns(NonFiniteStatisticsWarning, match=r"BatchNorm1d\(2\)"):
            torch.ops.batchnorm.update_running_stats(*args)
    assert torch.equal(running_mean, torch.zeros(2)) and torch.equal(running_var, torch.ones(2))
    assert int(nbt) == 4
    mean[1] = 1.0
    torch.ops.batchnorm.update_running_stats(*args)
    assert int(nbt) == 5
    torch.testing.assert_close(running_mean, torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("poison", [None, float("nan")], ids=["clean", "nan"])
def test_batch_norm_fallback_with_bfloat16_buffers(poison, gen):
    """Buffers NumPy cannot view (bfloat16) take the scratch statistics as a torch tensor."""
    x = make_input((6, 3, 4), torch.float32, "contiguous", gen)
    if poison is not None:
        x[0, 1, 0] = poison
    x = x.bfloat16()
    ours = torch.randn(3, generator=gen).bfloat16(), (torch.rand(3, generator=gen) + 0.5).bfloat16()
    theirs = ours[0].clone(), ours[1].clone()
    nbt = torch.tensor(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batchnorm.batch_norm(x, *ours, training=True, momentum=0.25, num_batches_tracked=nbt)
    if poison is None:
        torch.nn.functional.batch_norm(x, *theirs, training=True, momentum=0.25)
        assert int(nbt) == 5 and not _skip_warnings(caught)
    else:
        assert int(nbt) == 4 and len(_skip_warnings(caught)) == 1
    for got, want in zip(ours, theirs, strict=True):
        tol = 1e-2 if poison is None else 0.0  # a skipped batch leaves them exactly as they were
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
