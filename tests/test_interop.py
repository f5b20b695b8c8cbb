"""torch's model tooling over our layers: fx tracing, TorchScript, quantization fusion, lazy layers.

Each works as it does with torch.nn's layers, checked against the same model with torch.nn's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.ao.quantization import fuse_modules, fuse_modules_qat

import batchnorm
from conftest import TOL, make_input

F32 = TOL[torch.float32]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
        torch.nn.BatchNorm1d(5),
    )


def _pair():
    """(ours, torch's): the same model, with trained-looking running statistics."""
    theirs = _model()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        theirs(torch.randn(8, 3, 8, 8, generator=gen))
    ours = batchnorm.convert(_model())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fx_traces_our_layers_as_leaves_and_the_graph_follows_their_mode(mode):
    ours, theirs = _pair()
    graph_ours = torch.fx.symbolic_trace(ours)
    graph_theirs = torch.fx.symbolic_trace(theirs)
    nodes = [(n.op, str(n.target)) for n in graph_ours.graph.nodes]
    assert nodes == [(n.op, str(n.target)) for n in graph_theirs.graph.nodes]
    assert ("call_module", "1") in nodes and ("call_module", "5") in nodes
    # The graph calls the layers at run time: a mode set after tracing applies, as for torch's.
    graph_ours.train(mode == "train"), theirs.train(mode == "train")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(graph_ours(x), theirs(x), **F32)


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"])
def test_fx_traces_a_layer_as_the_root(kind, gen):
    # torch.nn's layer as the root is refused by fx (its rank check branches on the Proxy);
    # ours is traced through torch's forward without that check, and the graph computes the
    # layer's output in the mode it was traced in.
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(getattr(torch.nn, kind)(3))
    layer = getattr(batchnorm, kind)(3).eval()
    x = make_input((4, 3) if kind == "BatchNorm1d" else (4, 3, 2, 2), torch.float32, generator=gen)
    torch.testing.assert_close(torch.fx.symbolic_trace(layer)(x), layer(x), **F32)


def test_fx_traces_frozen_layers(gen):
    ours = batchnorm.freeze(_pair()[0].eval())
    x = make_input((2, 3, 8, 8), torch.float32, generator=gen)
    torch.testing.assert_close(torch.fx.symbolic_trace(ours)(x), ours(x), **F32)
    root = ours[1]
    y = make_input((2, 4, 6, 6), torch.float32, generator=gen)
    torch.testing.assert_close(torch.fx.symbolic_trace(root)(y), root(y), **F32)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_script_compiles_our_layers_as_their_torch_twins(mode):
    ours, theirs = _pair()
    ours.train(mode == "train"), theirs.train(mode == "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
        scripted = torch.jit.script(ours)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(scripted(x), theirs(x), **F32)
    if mode == "train":  # the scripted layer updates the very same buffers
        assert ours[1].num_batches_tracked.item() == theirs[1].num_batches_tracked.item()


@pytest.mark.parametrize("affine", [True, False])
def test_jit_script_compiles_frozen_layers(affine, gen):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=affine))
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1, generator=gen)
        model[0].running_var.uniform_(0.5, 2, generator=gen)
    frozen = batchnorm.freeze(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(frozen)
    x = make_input((2, 4, 3, 3), torch.float32, generator=gen)
    torch.testing.assert_close(scripted.train()(x), frozen(x), **F32)


def test_quantization_fuse_modules_fuses_our_layers_as_torchs():
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    groups = [["0", "1", "2"], ["4", "5"]]
    fused_ours = fuse_modules(ours, groups)
    fused_theirs = fuse_modules(theirs, groups)
    assert [type(m) for m in fused_ours] == [type(m) for m in fused_theirs]
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fused_ours(x), fused_theirs(x), **F32)


def test_quantization_aware_fusion_takes_our_layers_too():
    ours, theirs = _pair()
    fused_ours = fuse_modules_qat(ours.train(), [["0", "1", "2"]], inplace=True)
    fused_theirs = fuse_modules_qat(theirs.train(), [["0", "1", "2"]], inplace=True)
    assert type(fused_ours[0]) is type(fused_theirs[0])
    # The fused module holds torch's layer class, with our layer's very tensors.
    assert type(fused_ours[0][1]) is torch.nn.BatchNorm2d


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_lazy_layers_become_ours_on_the_first_call_like_torchs(kind, gen):
    shape = {"BatchNorm1d": (4, 3), "BatchNorm2d": (4, 3, 5, 5), "BatchNorm3d": (4, 3, 2, 3, 3)}
    ours = getattr(batchnorm, f"Lazy{kind}")(momentum=0.2)
    theirs = getattr(torch.nn, f"Lazy{kind}")(momentum=0.2)
    assert isinstance(ours, getattr(torch.nn, f"Lazy{kind}"))
    x = make_input(shape[kind], torch.float32, generator=gen, scale=2.0, offset=1.0)
    torch.testing.assert_close(ours(x), theirs(x), **F32)
    assert type(ours) is getattr(batchnorm, kind) and type(theirs) is getattr(torch.nn, kind)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, want in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], want, **F32, msg=key)


def test_lazy_layer_first_call_is_checked_by_this_package():
    layer = batchnorm.LazyBatchNorm1d(nonfinite="raise")
    with pytest.raises(batchnorm.NonFiniteStatisticsError):
        layer(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert layer.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel"):
        batchnorm.LazyBatchNorm1d()(torch.randn(1, 3))


def test_lazy_layer_refuses_bad_constructor_arguments_like_ours():
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d\(\): expected momentum in \[0, 1\]"):
        batchnorm.LazyBatchNorm2d(momentum=2.0)
    with pytest.raises(ValueError, match=r"LazyBatchNorm2d\(\): expected nonfinite"):
        batchnorm.LazyBatchNorm2d(nonfinite="ignore")
