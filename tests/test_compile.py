"""``torch.compile`` and ``torch.export`` over our BatchNorm2d match eager mode.

Each compilation costs ~20-60 s on a 2-core machine, so there are few of them; they are marked
``slow`` but run in the default suite.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import batchnorm
from batchnorm import NonFiniteStatisticsError, NonFiniteStatisticsWarning, reference
from batchnorm.routing import use_routing
from conftest import (
    TOL,
    assert_state_unchanged,
    from_np,
    labelled,
    make_input,
    randomize_bn_state,
    snapshot_state,
    to_np64,
)

pytestmark = pytest.mark.slow


def _model(dtype, gen, **bn_kwargs):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        batchnorm.BatchNorm2d(4, **bn_kwargs),
        torch.nn.ReLU(),
    ).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64) * 0.3)
    randomize_bn_state(model[1], gen)
    return model


def _step(model, x, grad, forward=None):
    """Forward/backward through ``forward`` (default ``model``); grads and state of ``model``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (forward or model)(x)
    y.backward(grad)
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return y.detach(), grads, snapshot_state(model)


def _assert_same_step(got, want, dtype):
    (y, grads, state), (ty, tgrads, tstate) = got, want
    tol = TOL[dtype]
    torch.testing.assert_close(y, ty, **tol)
    for name in tgrads:
        torch.testing.assert_close(grads[name], tgrads[name], **tol, msg=labelled(name))
    for key in tstate:
        torch.testing.assert_close(state[key], tstate[key], **tol, msg=labelled(key))


@pytest.mark.parametrize(
    ("training", "momentum", "dtype", "affine"),
    [
        (True, 0.1, torch.float32, True),
        # float64 so that a cumulative-average factor rounded to float32 would show, and the
        # compiled backward's formula is checked to float64 precision.
        (True, None, torch.float64, True),
        (True, 1.0, torch.float64, False),
        (False, 0.1, torch.float32, True),
    ],
    ids=[
        "train-momentum0.1-float32",
        "train-momentumNone-float64",
        "train-momentum1-float64-no-affine",
        "eval-float32",
    ],
)
def test_compile_fullgraph_matches_eager(training, momentum, dtype, affine):
    gen = torch.Generator().manual_seed(3)
    eager = _model(dtype, gen, momentum=momentum, affine=affine).train(training)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(3):
        x = make_input((5, 3, 7, 6), dtype, "contiguous", gen, scale=2.0, offset=1.0)
        grad = torch.randn(5, 4, 5, 4, generator=gen, dtype=torch.float64).to(dtype)
        got = _step(compiled_model, x, grad, forward=compiled)
        _assert_same_step(got, _step(eager, x, grad), dtype)
    expected_count = 3 if training else 0
    assert compiled_model[1].num_batches_tracked.item() == expected_count


def test_export_eval_model_runs_and_matches_eager():
    gen = torch.Generator().manual_seed(4)
    model = _model(torch.float32, gen).eval()
    x = make_input((2, 3, 7, 6), torch.float32, "contiguous", gen)
    exported = torch.export.export(model, (x,))
    # The contract: under export the kernels are reached through torch.ops.batchnorm.*.
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any(t.startswith("batchnorm.") for t in targets), targets
    x_new = make_input((2, 3, 7, 6), torch.float32, "contiguous", gen)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x_new), model(x_new), **TOL[torch.float32])


# --------------------------------------------------------------------------- what the compiler sees


def _dynamo_targets(model, x) -> list[str]:
    """The call targets of the graph dynamo hands to the compiler (no compilation)."""
    targets: list[str] = []

    def record(gm, example_inputs):
        # The graph and its subgraphs (an autograd.Function's forward and backward, the
        # branches of a cond), by the name each is held under.
        for name, module in gm.named_modules():
            if isinstance(module, torch.fx.GraphModule):
                targets.extend(
                    f"{name}:{n.target}" for n in module.graph.nodes if n.op == "call_function"
                )
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(x)
    return targets


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_graph_is_torch_ops_the_compiler_can_fuse(training):
    """An opaque kernel call would stop the compiler's fusion at every BatchNorm (a compiled
    MLP step ran at 0.84x compiled torch.nn's): under torch.compile the normalization is torch
    ops; only a batch left out reaches an opaque op (the report, inside a ``cond``)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), batchnorm.BatchNorm1d(6)).train(training)
    targets = _dynamo_targets(model, torch.randn(8, 4))
    opaque = [t for t in targets if ":batchnorm." in t]
    # The report, in the branch for a batch left out (dynamo names the branches of a cond
    # cond_true_* / cond_false_*; ok is the predicate, so the report is the false branch).
    assert all(t.startswith("cond_false") and "batch_verdict" in t for t in opaque), opaque
    assert bool(opaque) == training
    assert any("var_mean" in t for t in targets) == training, targets


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_statistics_stay_accurate_for_a_large_mean(layout):
    """Mean 1e4, spread 1e-2 in float32: a plain float32 sum would put an error of ~1e-3 in the
    mean and of ~1% in the variance; the compiled path centres each channel on its first value."""
    gen = torch.Generator().manual_seed(5)
    layer = batchnorm.BatchNorm2d(3, momentum=1.0)
    x = make_input((16, 3, 6, 6), torch.float32, layout, gen, scale=1e-2, offset=1e4)
    y = torch.compile(layer, fullgraph=True)(x)
    ry, mean, var = reference.batch_norm_train(to_np64(x), eps=layer.eps)
    m = x.numel() // 3
    torch.testing.assert_close(y.double(), from_np(ry), **TOL[torch.float32])
    torch.testing.assert_close(layer.running_mean.double(), from_np(mean), rtol=1e-7, atol=0)
    torch.testing.assert_close(
        layer.running_var.double(), from_np(var * m / (m - 1)), rtol=1e-4, atol=0
    )
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_compiled_nonfinite_batch_changes_no_state_and_is_reported(nonfinite):
    gen = torch.Generator().manual_seed(6)
    layer = batchnorm.BatchNorm1d(3, nonfinite=nonfinite, momentum=None)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(torch.randn(8, 3, generator=gen))
    before = snapshot_state(layer)
    x = torch.randn(8, 3, generator=gen)
    x[2, 1] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(NonFiniteStatisticsError, match=r"channels 1"):
            compiled(x)
    else:
        with pytest.warns(NonFiniteStatisticsWarning, match="left out"):
            compiled(x)
    assert_state_unchanged(layer, before)
    # The next finite batch is the second counted: its weight in the average is 1/2.
    x = torch.randn(8, 3, generator=gen)
    compiled(x)
    assert int(layer.num_batches_tracked) == 2
    want = (before["running_mean"].double() + x.double().mean(0)) / 2
    torch.testing.assert_close(layer.running_mean.double(), want, rtol=1e-6, atol=1e-7)


def test_compiled_functional_without_counter_still_reports():
    running_mean, running_var = torch.zeros(2), torch.ones(2)

    def step(x):
        return batchnorm.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)

    x = torch.randn(6, 2)
    x[0, 0] = float("inf")
    with pytest.warns(NonFiniteStatisticsWarning):
        torch.compile(step, fullgraph=True)(x)
    assert torch.equal(running_mean, torch.zeros(2)) and torch.equal(running_var, torch.ones(2))


def test_kernels_flag_is_marked_as_torch_marks_a_constant_result():
    """routing.kernels_enabled carries the mark torch.compiler.assume_constant_result would set
    (set directly, so that importing the package does not import torch._dynamo): if a torch
    release changes what the decorator does, this fails."""
    from batchnorm.routing import kernels_enabled

    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe)
    assert {k: getattr(kernels_enabled, k, None) for k in vars(probe)} == vars(probe)


def test_importing_and_running_a_layer_does_not_import_dynamo():
    code = (
        "import sys, torch, batchnorm\n"
        "batchnorm.BatchNorm2d(3)(torch.randn(4, 3, 2, 2)).sum().backward()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_with_kernels_off_is_the_same_fused_graph(training):
    """use_routing(kernels=False) names torch's op for eager calls; in a compiled graph, where
    no kernel runs, the layer is the same torch ops (before, reading the policy broke
    fullgraph compilation)."""
    gen = torch.Generator().manual_seed(8)
    eager = _model(torch.float32, gen).train(training)
    compiled_model = copy.deepcopy(eager)
    with use_routing(kernels=False):
        compiled = torch.compile(compiled_model, fullgraph=True)
        x = make_input((5, 3, 7, 6), torch.float32, "contiguous", gen, scale=2.0, offset=1.0)
        grad = torch.randn(5, 4, 5, 4, generator=gen)
        got = _step(compiled_model, x, grad, forward=compiled)
    _assert_same_step(got, _step(eager, x, grad), torch.float32)


def test_export_with_kernels_off_holds_no_kernel_ops():
    gen = torch.Generator().manual_seed(9)
    model = _model(torch.float32, gen).eval()
    x = make_input((2, 3, 7, 6), torch.float32, "contiguous", gen)
    with use_routing(kernels=False):
        exported = torch.export.export(model, (x,))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert not any(t.startswith("batchnorm.") for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), **TOL[torch.float32])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_compiled_nonfinite_first_value_gives_eager_outputs_and_skips(bad):
    """The compiled path centres each channel on its first value, even a non-finite one (the
    kernels use 0 there): the outputs and the untouched state must still be eager's."""
    gen = torch.Generator().manual_seed(10)
    eager = batchnorm.BatchNorm1d(3)
    compiled_layer = copy.deepcopy(eager)
    x = torch.randn(8, 3, generator=gen)
    x[0, 1] = bad
    before = snapshot_state(eager)
    with pytest.warns(NonFiniteStatisticsWarning):
        want = eager(x.clone().requires_grad_(True))
    with pytest.warns(NonFiniteStatisticsWarning):
        got = torch.compile(compiled_layer, fullgraph=True)(x.clone().requires_grad_(True))
    torch.testing.assert_close(got, want, equal_nan=True)
    assert_state_unchanged(compiled_layer, before)
    assert_state_unchanged(eager, before)
