"""``torch.compile`` and ``torch.export`` over our BatchNorm2d match eager mode.

Each compilation costs ~20-60 s on a 2-core machine, so there are few of them; they are marked
``slow`` but run in the default suite.
"""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm
from conftest import TOL, labelled, make_input, randomize_bn_state, snapshot_state

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
    ("training", "momentum", "dtype"),
    [
        (True, 0.1, torch.float32),
        # float64 so that a cumulative-average factor rounded to float32 would show.
        (True, None, torch.float64),
        (False, 0.1, torch.float32),
    ],
    ids=["train-momentum0.1-float32", "train-momentumNone-float64", "eval-float32"],
)
def test_compile_fullgraph_matches_eager(training, momentum, dtype):
    gen = torch.Generator().manual_seed(3)
    eager = _model(dtype, gen, momentum=momentum).train(training)
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
