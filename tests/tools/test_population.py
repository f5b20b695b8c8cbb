"""recompute_statistics(): exact population statistics, checked against independent oracles.

The oracles never go through the code under test: a first layer's inputs are computed directly
(the preceding Linear/conv applied to each batch); a deeper layer's inputs are captured by a
pre-hook on a torch.nn copy of the model run in batch-statistics mode; the statistics are then
torch.mean/torch.var of the concatenation, or batchnorm.reference for Algorithm 2.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from _distributed import run_distributed
from batchnorm import reference
from batchnorm._validate import NonFiniteStatisticsError, NonFiniteStatisticsWarning
from batchnorm.tools import _population_pass
from batchnorm.tools.convert import convert
from batchnorm.tools.population import LayerStatistics, recompute_statistics
from conftest import (
    assert_state_unchanged,
    bn_classes,
    make_layout,
    randomize_bn_state,
    snapshot_state,
)

# float64 throughout, a few hundred values per channel: the measured disagreement with the
# concatenated oracle is ~1e-16 relative; 1e-12 leaves room for the different summation orders
# (Chan merges vs torch's one-pass reduction) without hiding a wrong formula (errors of a
# dropped batch or a biased variance are >1e-2). atol covers means that are close to 0.
TIGHT = dict(rtol=1e-12, atol=1e-12)

_BN = torch.nn.modules.batchnorm._BatchNorm

# The layer before the first BatchNorm, by kind: (factory, input rank, per-example shape).
_FIRST = {
    "linear": (lambda: nn.Linear(4, 3), 2, (4,)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), 3, (2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), 4, (2, 5, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), 5, (2, 3, 3, 3)),
}
_SECOND = {
    "linear": lambda: nn.Linear(3, 2),
    "conv1d": lambda: nn.Conv1d(3, 2, 1),
    "conv2d": lambda: nn.Conv2d(3, 2, 1),
    "conv3d": lambda: nn.Conv3d(3, 2, 1),
}


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Seeded parameters and running statistics (non-default, so that a write is visible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BN):
                randomize_bn_state(module, gen)
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
    return model


def _model(kind="linear", impl="torch", dtype=torch.float64, seed=0) -> nn.Sequential:
    """pre-layer -> BN -> ReLU -> pointwise layer -> BN, both BNs of the chosen implementation."""
    factory, rank, _ = _FIRST[kind]
    ours, theirs = bn_classes(rank)
    bn = ours if impl == "ours" else theirs
    model = nn.Sequential(factory(), bn(3), nn.ReLU(), _SECOND[kind](), bn(2))
    return _randomize(model.to(dtype), seed)


def _batches(sizes, kind="linear", dtype=torch.float64, layout="contiguous", seed=1, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    tail = _FIRST[kind][2]
    return [
        make_layout(
            (torch.randn((n, *tail), generator=gen, dtype=torch.float64) * 2.0 + offset).to(dtype),
            layout,
        )
        for n in sizes
    ]


def _concatenated_stats(inputs):
    """Mean and unbiased variance per channel of the concatenation of (N, C, *) tensors."""
    channels = inputs[0].shape[1]
    rows = torch.cat([x.double().movedim(1, -1).reshape(-1, channels) for x in inputs])
    return rows.mean(dim=0), rows.var(dim=0, correction=1), rows.shape[0]


def _captured_inputs(model: nn.Module, layer: str, batches):
    """The inputs ``layer`` sees when each batch runs with batch statistics (Alg. 2, step 10).

    Independent of the code under test: a torch.nn copy of the model, its BatchNorm layers in
    training mode without tracking, and a pre-hook that records the input.
    """
    ref = convert(copy.deepcopy(model), to="torch")
    for module in ref.modules():
        if isinstance(module, _BN):
            module.train()
            module.track_running_stats = False
    captured = []
    handle = ref.get_submodule(layer).register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().clone())
    )
    with torch.no_grad():
        for batch in batches:
            ref(batch)
    handle.remove()
    return captured


def _assert_stats(stats: LayerStatistics, module: nn.Module, mean, var, tol=TIGHT):
    torch.testing.assert_close(torch.from_numpy(stats.mean), mean.double(), **tol)
    torch.testing.assert_close(torch.from_numpy(stats.var_unbiased), var.double(), **tol)
    torch.testing.assert_close(module.running_mean, mean.to(module.running_mean.dtype), **tol)
    torch.testing.assert_close(module.running_var, var.to(module.running_var.dtype), **tol)


def _flags(model: nn.Module):
    return [
        (name, m.training, getattr(m, "track_running_stats", None), getattr(m, "momentum", None))
        for name, m in model.named_modules()
    ]


def _assert_no_hooks(model: nn.Module):
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks, f"pre-hook left on {name!r}"
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert "forward" not in m.__dict__, f"forward override left on {name!r}"


def _run(model, data, **kwargs):
    kwargs.setdefault("progress", False)
    return recompute_statistics(model, data, **kwargs)


# --- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize(
    "kind, layout",
    [
        ("linear", "contiguous"),
        ("conv1d", "contiguous"),
        ("conv2d", "contiguous"),
        ("conv2d", "channels_last"),
        ("conv3d", "contiguous"),
    ],
)
def test_recompute_statistics_pooled_first_layer_equals_concatenation(kind, layout, impl):
    model = _model(kind, impl).eval()
    batches = _batches((7, 16, 3), kind, layout=layout)
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]
    if layout == "channels_last":
        assert not inputs[0].is_contiguous()  # the BN layer really sees channels_last input
    mean, var, count = _concatenated_stats(inputs)

    stats = _run(model, batches)

    assert list(stats) == ["1", "4"]
    _assert_stats(stats["1"], model[1], mean, var)
    assert (stats["1"].batches, stats["1"].count, stats["1"].skipped) == (3, count, 0)
    assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_recompute_statistics_pooled_deeper_layer_equals_captured_inputs(kind, impl):
    model = _model(kind, impl).eval()
    batches = _batches((5, 9, 2, 4), kind, seed=2)
    mean, var, count = _concatenated_stats(_captured_inputs(model, "4", batches))

    stats = _run(model, batches)

    _assert_stats(stats["4"], model[4], mean, var)
    assert (stats["4"].batches, stats["4"].count) == (4, count)


def test_recompute_statistics_pooled_is_independent_of_batch_order():
    batches = _batches((7, 16, 3, 5), seed=3, offset=3.0)
    forward_model, backward_model = _model(), _model()

    forward_stats = _run(forward_model, batches)
    backward_stats = _run(backward_model, batches[::-1])

    for name in ("1", "4"):
        for field in ("mean", "var_unbiased"):
            torch.testing.assert_close(
                torch.from_numpy(getattr(backward_stats[name], field)),
                torch.from_numpy(getattr(forward_stats[name], field)),
                **TIGHT,
            )


def test_recompute_statistics_paper_matches_reference_algorithm_2():
    model = _model().eval()
    batches = _batches((6, 6, 6, 6), seed=4)
    with torch.no_grad():
        inputs = [model[0](x).numpy() for x in batches]
    mean, var_unbiased = reference.population_statistics(inputs, method="paper")

    stats = _run(model, batches, method="paper")

    _assert_stats(stats["1"], model[1], torch.from_numpy(mean), torch.from_numpy(var_unbiased))
    assert int(model[1].num_batches_tracked) == 4


def test_recompute_statistics_paper_weights_uneven_batches_equally():
    model = _model().eval()
    batches = _batches((7, 16, 3), seed=5)
    with torch.no_grad():
        inputs = [model[0](x) for x in batches]
    # Alg. 2 generalised to batches of m_b values: averages of the batch means and of the
    # batches' unbiased variances, each batch weighing 1/B whatever its size.
    mean = torch.stack([x.mean(dim=0) for x in inputs]).mean(dim=0)
    var = torch.stack([x.var(dim=0, correction=1) for x in inputs]).mean(dim=0)
    pooled_mean, pooled_var, _ = _concatenated_stats(inputs)

    stats = _run(model, batches, method="paper")

    _assert_stats(stats["1"], model[1], mean, var)
    assert not torch.allclose(var, pooled_var, rtol=1e-3)  # the two methods really differ here
    assert not torch.allclose(mean, pooled_mean, rtol=1e-3)


def test_recompute_statistics_paper_equals_swa_utils_update_bn():
    # update_bn is a cumulative average (momentum=None) of the batch means and unbiased batch
    # variances, every batch weighing the same: the paper's estimator at every layer, whatever
    # the batch sizes (the model has no dropout, so its model.train() changes nothing else).
    batches = _batches((7, 16, 3), seed=24)
    ours, theirs = _model(), _model()

    stats = _run(ours, batches, method="paper")
    torch.optim.swa_utils.update_bn(batches, theirs)

    for name in ("1", "4"):
        layer = theirs.get_submodule(name)
        _assert_stats(stats[name], ours.get_submodule(name), layer.running_mean, layer.running_var)
        assert int(layer.num_batches_tracked) == stats[name].batches == 3


def test_recompute_statistics_float32_layers_get_float64_statistics_rounded_once():
    model = _model(dtype=torch.float32).eval()
    batches = _batches((7, 16, 3), dtype=torch.float32, seed=6)
    with torch.no_grad():
        mean, var, _ = _concatenated_stats([model[0](x) for x in batches])

    stats = _run(model, batches)

    assert model[1].running_mean.dtype == torch.float32
    # The float64 statistics of float32 inputs agree with the float64 oracle to rounding; the
    # buffers hold them rounded once to float32 (exactly the cast of the float64 result).
    _assert_stats(stats["1"], model[1], mean, var, tol=TIGHT)
    assert torch.equal(model[1].running_var, torch.from_numpy(stats["1"].var_unbiased).float())


# --- what is changed and what is not --------------------------------------------------------


def test_recompute_statistics_restores_modes_and_leaves_parameters_alone():
    model = _model()
    model.insert(3, nn.Dropout(0.5))  # between ReLU and the second pre-layer
    model.train()
    model[1].eval()  # a BN layer in eval, another in train, dropout in train
    model[1].momentum = None
    model[5].momentum = 0.3
    before_flags = _flags(model)
    before_params = {k: v.clone() for k, v in model.named_parameters()}
    seen = []

    def record(module, args):
        seen.append((type(module).__name__, module.training, module.track_running_stats))

    spies = [model[i].register_forward_pre_hook(record) for i in (1, 5)]
    spies.append(
        model[3].register_forward_pre_hook(lambda m, a: seen.append(("Dropout", m.training, None)))
    )

    stats = _run(model, _batches((7, 16, 3), seed=7))
    for spy in spies:
        spy.remove()

    # During the pass: BN layers in training mode without tracking, dropout as it was.
    assert seen[:3] == [("BatchNorm1d", True, False), ("Dropout", True, None)] + [
        ("BatchNorm1d", True, False)
    ]
    assert _flags(model) == before_flags
    for name, p in model.named_parameters():
        assert torch.equal(p, before_params[name]), name
    assert [int(model[i].num_batches_tracked) for i in (1, 5)] == [3, 3]
    assert stats["1"].batches == stats["5"].batches == 3
    _assert_no_hooks(model)


def test_recompute_statistics_max_batches_draws_no_further_batch():
    batches = _batches((7, 16, 3), seed=8)

    def stream():
        yield from batches[:2]
        raise AssertionError("a third batch was drawn")

    limited, reference_model = _model(), _model()

    stats = _run(limited, stream(), max_batches=2)
    expected = _run(reference_model, batches[:2])

    assert stats["1"].batches == 2
    for name in ("1", "4"):
        assert np.array_equal(stats[name].var_unbiased, expected[name].var_unbiased)
    assert_state_unchanged(limited, snapshot_state(reference_model))


def test_recompute_statistics_accepts_input_target_tuples_and_lists():
    batches = _batches((7, 16, 3), seed=9)
    targets = [torch.zeros(len(x), dtype=torch.long) for x in batches]
    plain, tuples, lists = _model(), _model(), _model()

    _run(plain, batches)
    _run(tuples, list(zip(batches, targets, strict=True)))
    _run(lists, [[x, y] for x, y in zip(batches, targets, strict=True)])

    assert_state_unchanged(tuples, snapshot_state(plain))
    assert_state_unchanged(lists, snapshot_state(plain))


def test_recompute_statistics_dataloader_uneven_last_batch_equals_concatenation():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(23, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (23,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    model = _model().eval()
    with torch.no_grad():
        mean, var, _ = _concatenated_stats([model[0](x)])

    stats = _run(model, loader)

    _assert_stats(stats["1"], model[1], mean, var)
    assert (stats["1"].batches, stats["1"].count) == (5, 23)


def test_recompute_statistics_forward_runs_dict_batches_and_device_moves_them():
    batches = _batches((7, 16, 3), seed=11)
    dicts = [{"image": x, "meta": {"rows": torch.tensor(len(x))}} for x in batches]
    calls = []

    def forward(model, batch):
        calls.append(batch["meta"]["rows"].device)
        model(batch["image"])

    plain, via_forward = _model(), _model()
    _run(plain, batches)
    _run(via_forward, dicts, forward=forward, device="cpu")

    assert_state_unchanged(via_forward, snapshot_state(plain))
    assert calls == [torch.device("cpu")] * 3


def test_recompute_statistics_sync_batchnorm_runs_as_local_batchnorm():
    plain = _model()
    synced = copy.deepcopy(plain)
    for i in (1, 4):
        sync = nn.SyncBatchNorm(plain[i].num_features).double()
        sync.load_state_dict(plain[i].state_dict())
        synced[i] = sync
    batches = _batches((7, 16, 3), seed=12)

    _run(plain, batches)
    stats = _run(synced, batches)

    assert list(stats) == ["1", "4"]
    assert_state_unchanged(synced, snapshot_state(plain))
    _assert_no_hooks(synced)


def test_recompute_statistics_root_batchnorm_is_recomputed():
    bn = _randomize(nn.BatchNorm2d(2).double(), 13)
    batches = [x[:, :2] for x in _batches((4, 5), "conv2d", seed=13)]
    mean, var, _ = _concatenated_stats(batches)

    stats = _run(bn, batches)

    _assert_stats(stats[""], bn, mean, var)


def test_recompute_statistics_progress_bar_total_is_capped_by_max_batches(monkeypatch):
    created = []

    class FakeBar:
        def __init__(self, **kwargs):
            created.append(kwargs)
            self.updates = 0

        def update(self, n=1):
            self.updates += n

        def close(self):
            pass

    monkeypatch.setattr(_population_pass, "tqdm", FakeBar)
    batches = _batches((3, 4, 5), seed=14)

    recompute_statistics(_model(), batches, max_batches=2)
    recompute_statistics(_model(), iter(batches), progress=False)

    assert created[0]["total"] == 2 and created[0]["disable"] is False
    assert created[1]["total"] is None and created[1]["disable"] is True


# --- non-finite batches ----------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_recompute_statistics_skips_nonfinite_batch_and_counts_it(bad_value):
    batches = _batches((7, 16, 3, 5), seed=15)
    poisoned = batches[2].clone()
    poisoned[1, 2] = bad_value
    skipping, reference_model = _model(), _model()

    with pytest.warns(NonFiniteStatisticsWarning, match=r"'1': 1 of 4, '4': 1 of 4"):
        stats = _run(skipping, [*batches[:2], poisoned, batches[3]])
    expected = _run(reference_model, [*batches[:2], batches[3]])

    # The skipped batch leaves the accumulators untouched: the same merges, the same bits.
    assert_state_unchanged(skipping, snapshot_state(reference_model))
    assert [(s.batches, s.skipped) for s in stats.values()] == [(3, 1), (3, 1)]
    for name in ("1", "4"):
        assert np.array_equal(stats[name].mean, expected[name].mean)


def test_recompute_statistics_nonfinite_raise_names_layer_and_batch_and_changes_nothing():
    model = _model()
    batches = _batches((7, 16, 3), seed=16)
    batches[1][0, 0] = float("nan")
    before, flags = snapshot_state(model), _flags(model)

    with pytest.raises(NonFiniteStatisticsError, match=r"layer '1' in batch 1"):
        _run(model, batches, nonfinite="raise")

    assert_state_unchanged(model, before)
    assert _flags(model) == flags
    _assert_no_hooks(model)


def test_recompute_statistics_layer_with_only_nonfinite_batches_is_left_unchanged():
    model = _model()
    batches = _batches((7, 16), seed=17)
    for x in batches:
        x[0, 0] = float("inf")
    before = snapshot_state(model)

    with pytest.warns(NonFiniteStatisticsWarning, match=r"left unchanged .*'1', '4'"):
        stats = _run(model, batches)

    assert stats == {}
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_recompute_statistics_statistics_overflowing_float32_buffers_follow_policy(nonfinite):
    bn = _randomize(nn.BatchNorm1d(2), 23).float()
    gen = torch.Generator().manual_seed(23)
    # Values of ~1e20 are fine in float32, but their variance (~1e40) exceeds float32's
    # largest value (~3.4e38): finite in the float64 summaries, Inf once cast to the buffers.
    batches = [torch.randn(6, 2, generator=gen) * 1e20 for _ in range(2)]
    before = snapshot_state(bn)

    if nonfinite == "raise":
        with pytest.raises(NonFiniteStatisticsError, match=r"overflow it at layer\(s\) \[''\]"):
            _run(bn, batches, nonfinite="raise")
    else:
        with pytest.warns(NonFiniteStatisticsWarning, match=r"\[''\] overflow their running"):
            assert _run(bn, batches) == {}

    assert_state_unchanged(bn, before)


# --- bad input: a clear error, nothing changed -----------------------------------------------


def test_recompute_statistics_rejects_empty_data_without_touching_state():
    model = _model()
    before, flags = snapshot_state(model), _flags(model)

    with pytest.raises(ValueError, match=r"expected data with at least one batch, got none"):
        _run(model, [])

    assert_state_unchanged(model, before)
    assert _flags(model) == flags
    _assert_no_hooks(model)


def test_recompute_statistics_warns_and_returns_empty_for_model_without_batchnorm():
    model = _randomize(nn.Sequential(nn.Linear(4, 3), nn.ReLU()).double(), 18)
    before = snapshot_state(model)

    with pytest.warns(UserWarning, match=r"expected a model with BatchNorm layers .* got none"):
        stats = _run(model, _batches((3,), seed=18))

    assert stats == {}
    assert_state_unchanged(model, before)


def test_recompute_statistics_ignores_layers_without_running_buffers():
    model = _model()
    model[4] = nn.BatchNorm1d(2, track_running_stats=False).double()

    stats = _run(model, _batches((7, 3), seed=19))

    assert list(stats) == ["1"]


@pytest.mark.parametrize("impl", ["torch", "ours"])
def test_recompute_statistics_failing_batch_restores_everything(impl):
    ours, theirs = bn_classes(2)
    bn = ours if impl == "ours" else theirs
    model = _randomize(nn.Sequential(bn(4), nn.Linear(4, 3), bn(3)).double(), 20)
    model.eval()
    model[0].train()
    before, flags = snapshot_state(model), _flags(model)
    batches = _batches((7, 16), seed=20) + [torch.randn(5, 6, dtype=torch.float64)]

    # The layer's own error comes through: ours names the channel count, torch's is its own.
    if impl == "ours":
        error, match = ValueError, r"expected input with 4 channels"
    else:
        error, match = RuntimeError, r"weight should contain 6 elements not 4"
    with pytest.raises(error, match=match):
        _run(model, batches)

    assert_state_unchanged(model, before)
    assert _flags(model) == flags
    _assert_no_hooks(model)


def test_recompute_statistics_rejects_unrunnable_batch_type_without_touching_state():
    model = _model()
    before = snapshot_state(model)

    with pytest.raises(TypeError, match=r"got dict\. Pass forward="):
        _run(model, [{"image": torch.randn(4, 4, dtype=torch.float64)}])

    assert_state_unchanged(model, before)
    _assert_no_hooks(model)


class _Branches(nn.Module):
    """A model whose ``unused`` BatchNorm layer is registered but never called."""

    def __init__(self):
        super().__init__()
        self.body = _model()
        self.unused = nn.BatchNorm1d(2).double()

    def forward(self, x):
        return self.body(x)


def test_recompute_statistics_warns_about_layer_that_never_ran():
    model = _Branches()
    before = snapshot_state(model.unused)

    with pytest.warns(UserWarning, match=r"got no batch at \['unused'\]; their running statistics"):
        stats = _run(model, _batches((7, 3), seed=21))

    assert list(stats) == ["body.1", "body.4"]
    assert_state_unchanged(model.unused, before)


def test_recompute_statistics_rejects_uninitialized_lazy_layer():
    model = nn.Sequential(nn.Linear(4, 3), nn.LazyBatchNorm1d())

    with pytest.raises(ValueError, match=r"uninitialized LazyBatchNorm1d at '1'"):
        _run(model, [torch.randn(4, 4)])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(method="mean"),
            ValueError,
            r"^recompute_statistics\(\): expected method='pooled', 'paper' or 'sequential', "
            r"got 'mean'\.$",
        ),
        (dict(nonfinite="ignore"), ValueError, r"expected nonfinite to be one of"),
        (dict(max_batches=0), ValueError, r"expected max_batches to be a positive int"),
        (dict(max_batches=1.5), TypeError, r"expected max_batches to be a positive int"),
        (dict(max_batches=True), TypeError, r"expected max_batches to be a positive int"),
        (dict(forward=3), TypeError, r"expected forward to be a callable"),
        (dict(progress="yes"), TypeError, r"expected progress to be a bool"),
        (dict(device="nowhere"), ValueError, r"expected device to be a torch.device"),
        (dict(process_group=object()), RuntimeError, r"expected torch.distributed to be init"),
    ],
    ids=[
        "method",
        "nonfinite",
        "max_batches_zero",
        "max_batches_float",
        "max_batches_bool",
        "forward",
        "progress",
        "device",
        "process_group",
    ],
)
def test_recompute_statistics_rejects_bad_argument_before_drawing_a_batch(kwargs, error, match):
    model = _model()
    before = snapshot_state(model)
    drawn = []

    def stream():
        drawn.append(True)
        yield from _batches((3,), seed=22)

    with pytest.raises(error, match=match):
        recompute_statistics(model, stream(), **kwargs)

    assert drawn == []
    assert_state_unchanged(model, before)


@pytest.mark.parametrize(
    "model, data, match",
    [
        ("net", [torch.randn(3, 4)], r"expected a torch.nn.Module, got str"),
        (None, torch.randn(3, 4), r"got a single Tensor of shape \(3, 4\)\. Pass \[tensor\]"),
        (None, 5, r"expected an iterable of batches .* got int"),
    ],
    ids=["model", "tensor", "int"],
)
def test_recompute_statistics_rejects_wrong_types(model, data, match):
    with pytest.raises(TypeError, match=match):
        recompute_statistics(_model() if model is None else model, data, progress=False)


# --- method="sequential": the statistics the inference network computes --------------------


def _pooled(x: torch.Tensor):
    """Mean and unbiased variance per channel (axis 1) of ``x``, in float64."""
    dims = [0, *range(2, x.dim())]
    return x.double().mean(dim=dims), x.double().var(dim=dims, unbiased=True)


def _eval_bn(x, mean, var, bn):
    """An evaluation-mode BatchNorm computed by hand (no library code)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = bn.weight.double() / torch.sqrt(var + bn.eps)
    return (x - mean.reshape(shape)) * scale.reshape(shape) + bn.bias.double().reshape(shape)


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_recompute_statistics_sequential_matches_inference_network_inputs(impl, kind, mode):
    """Layer 2's statistics are those of its input when layer 1 normalises with its new
    (exact) statistics, computed here by hand from the concatenated data."""
    model = _model(kind, impl).train(mode == "train")
    batches = _batches((7, 16, 3), kind)
    flags = _flags(model)
    stats = _run(model, batches, method="sequential")
    x = torch.cat(batches)
    with torch.no_grad():
        h1 = model[0](x)
        mean1, var1 = _pooled(h1)
        h2 = model[3](torch.relu(_eval_bn(h1, mean1, var1, model[1])))
        mean2, var2 = _pooled(h2)
    for name, mean, var in (("1", mean1, var1), ("4", mean2, var2)):
        torch.testing.assert_close(model.get_submodule(name).running_mean, mean, **TIGHT)
        torch.testing.assert_close(model.get_submodule(name).running_var, var, **TIGHT)
        np.testing.assert_allclose(stats[name].var_unbiased, var.numpy(), **TIGHT)
        assert stats[name].batches == 3 and int(model.get_submodule(name).num_batches_tracked) == 3
    assert _flags(model) == flags
    _assert_no_hooks(model)


def test_recompute_statistics_sequential_differs_from_pooled_past_the_first_layer():
    """The point of the method: pooled's deeper inputs were normalised batch by batch."""
    batches = _batches((7, 16, 3))
    pooled = _run(_model(), batches, method="pooled")
    sequential = _run(_model(), batches, method="sequential")
    np.testing.assert_allclose(sequential["1"].var_unbiased, pooled["1"].var_unbiased, **TIGHT)
    assert not np.allclose(sequential["4"].var_unbiased, pooled["4"].var_unbiased, rtol=1e-6)


def test_recompute_statistics_sequential_follows_call_order_not_registration_order():
    """Registered second, called first: layer 'late' must be measured before 'early'."""

    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
            self.first = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    model = _randomize(Swapped().double(), seed=3).eval()
    batches = _batches((7, 16, 3))
    _run(model, batches, method="sequential")
    x = torch.cat(batches)
    with torch.no_grad():
        h1 = model.first[0](x)
        mean1, var1 = _pooled(h1)
        h2 = model.second[0](torch.relu(_eval_bn(h1, mean1, var1, model.first[1])))
        mean2, var2 = _pooled(h2)
    torch.testing.assert_close(model.second[1].running_var, var2, **TIGHT)
    torch.testing.assert_close(model.second[1].running_mean, mean2, **TIGHT)


def test_recompute_statistics_sequential_refuses_one_shot_iterator_without_change():
    model = _model()
    before = snapshot_state(model)
    with pytest.raises(TypeError, match=r"method='sequential'.*one-shot iterator"):
        _run(model, iter(_batches((4, 5))), method="sequential")
    assert_state_unchanged(model, before)


def test_recompute_statistics_sequential_failure_in_a_later_pass_restores_everything():
    model = _model().train()
    before, flags = snapshot_state(model), _flags(model)
    batches = _batches((4, 5, 6))
    calls = []

    def forward(m, batch):
        calls.append(1)
        if len(calls) > len(batches):  # the second pass, after pass 1 wrote its results
            raise RuntimeError("boom in pass 2")
        m(batch)

    with pytest.raises(RuntimeError, match="boom in pass 2"):
        _run(model, batches, method="sequential", forward=forward)
    assert_state_unchanged(model, before)
    assert _flags(model) == flags
    _assert_no_hooks(model)


# --- distributed: 2 gloo processes on CPU ----------------------------------------------------

_SIZES = (5, 3, 7, 2, 4, 6)
# rank -> indices of the batches it holds
_SHARDS = {
    "uneven": {0: [0, 2, 4], 1: [1, 3, 5]},  # 16 and 11 rows
    "empty_rank": {0: [0, 1, 2, 3, 4, 5], 1: []},
    "nothing": {0: [], 1: []},
}


def _sync_model(cls=nn.SyncBatchNorm) -> nn.Sequential:
    model = _model()
    for i in (1, 4):
        sync = cls(model[i].num_features).double()
        sync.load_state_dict(model[i].state_dict())
        model[i] = sync
    return model


def _summary(model, stats):
    """A picklable record of a pass: the returned statistics and the buffers written."""
    return {
        "stats": {
            k: (s.batches, s.count, s.skipped, s.mean, s.var_unbiased) for k, s in stats.items()
        },
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _distributed_case(rank, case):
    """One scenario on one rank; failures are returned (as text) for the test to assert on."""
    batches = _batches(_SIZES, seed=30)
    if case == "nonfinite":
        batches[3] = batches[3].clone()
        batches[3][0, 1] = float("nan")
    if case == "failure":
        batches[3] = torch.randn(2, 9, dtype=torch.float64)  # rank 1's second batch is bad
    shards = _SHARDS.get(case, _SHARDS["uneven"])
    mine = [batches[i] for i in shards[rank]]
    if case in ("syncbn", "our_syncbn"):
        model = _sync_model(nn.SyncBatchNorm if case == "syncbn" else batchnorm.SyncBatchNorm)
    else:
        model = _model()
    before, flags = snapshot_state(model), _flags(model)
    method = case if case in ("paper", "sequential") else "pooled"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stats = recompute_statistics(model, mine, method=method, progress=False)
        except Exception as err:  # reported to the parent, which asserts on it
            unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            return {
                "error": (type(err).__name__, str(err)),
                "unchanged": unchanged and _flags(model) == flags,
            }
    result = _summary(model, stats)
    result["warnings"] = [str(w.message) for w in caught]
    return result


def _distributed_worker(rank, world_size, cases):
    assert world_size == 2, world_size
    return {case: _distributed_case(rank, case) for case in cases}


_CASES = (
    "uneven",
    "empty_rank",
    "paper",
    "sequential",
    "syncbn",
    "our_syncbn",
    "nonfinite",
    "failure",
    "nothing",
)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every distributed scenario, run once in one pair of processes (start-up is the cost)."""
    return run_distributed(
        _distributed_worker,
        world_size=2,
        args=(_CASES,),
        timeout=90.0,
        rendezvous_dir=tmp_path_factory.mktemp("population-rdzv"),
    )


def _single_process(method="pooled", nonfinite_batch=None):
    batches = _batches(_SIZES, seed=30)
    if nonfinite_batch is not None:
        batches = [b for i, b in enumerate(batches) if i != nonfinite_batch]
    model = _model()
    return _summary(model, _run(model, batches, method=method))


def _assert_ranks_agree_with(two_ranks, case, expected, skipped=0):
    rank0, rank1 = (two_ranks[r][case] for r in (0, 1))
    assert "error" not in rank0 and "error" not in rank1, (rank0.get("error"), rank1.get("error"))
    # Both ranks merge the same gathered blocks in the same order: identical bits.
    for key, value in rank0["state"].items():
        assert torch.equal(rank1["state"][key], value), key
    for name, (batches, count, expected_skipped, mean, var) in expected["stats"].items():
        got = rank0["stats"][name]
        assert got[:3] == (batches, count, skipped + expected_skipped), name
        np.testing.assert_allclose(got[3], mean, **TIGHT)
        np.testing.assert_allclose(got[4], var, **TIGHT)
        assert np.array_equal(rank1["stats"][name][4], got[4])
    for key, value in expected["state"].items():
        torch.testing.assert_close(rank0["state"][key], value, **TIGHT)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["uneven", "empty_rank", "syncbn", "our_syncbn"])
def test_recompute_statistics_two_ranks_pooled_equals_single_pass_over_union(two_ranks, case):
    _assert_ranks_agree_with(two_ranks, case, _single_process())


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["paper", "sequential"])
def test_recompute_statistics_two_ranks_method_equals_single_process_over_union(two_ranks, method):
    _assert_ranks_agree_with(two_ranks, method, _single_process(method=method))


@pytest.mark.distributed
def test_recompute_statistics_two_ranks_skip_nonfinite_batch_of_one_rank(two_ranks):
    # Rank 1 skips the batch at both layers; rank 0 learns of it through the collective.
    _assert_ranks_agree_with(two_ranks, "nonfinite", _single_process(nonfinite_batch=3), 1)
    for rank in (0, 1):
        assert any("'1': 1 of 6" in w for w in two_ranks[rank]["nonfinite"]["warnings"])


@pytest.mark.distributed
def test_recompute_statistics_two_ranks_failure_on_one_raises_on_both(two_ranks):
    failed, other = two_ranks[1]["failure"], two_ranks[0]["failure"]
    assert failed["error"][0] == "RuntimeError" and "mat1 and mat2" in failed["error"][1]
    assert other["error"][0] == "RuntimeError"
    assert "got a failure on rank(s) [1]" in other["error"][1]
    assert failed["unchanged"] and other["unchanged"]


@pytest.mark.distributed
def test_recompute_statistics_two_ranks_without_any_batch_raise_value_error(two_ranks):
    for rank in (0, 1):
        error = two_ranks[rank]["nothing"]["error"]
        assert error[0] == "ValueError" and "at least one batch on any process" in error[1]
        assert two_ranks[rank]["nothing"]["unchanged"]
