"""fuse_activations(): which pairs fuse, what comes back, and that the fused model computes
what the model computed.

The oracle is the model before fusing: torch.nn's BatchNorm (or ours) followed by torch's own
activation modules and functions, run on a deep copy in float64. Outputs, input gradients,
parameter gradients and the running buffers after a training step must agree with the fused
model's (TOL[float64]), and in evaluation mode too.
"""

from __future__ import annotations

import copy
import doctest
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
import batchnorm.tools.fuse as fuse_module
from batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from batchnorm.tools.fuse import fuse_activations
from conftest import TOL, randomize_bn_state

DT = torch.float64

# (BatchNorm rank) -> (torch.nn class, our class, fused class, the layer before it, input shape)
RANKS = {
    "1d-2D": (
        nn.BatchNorm1d,
        batchnorm.BatchNorm1d,
        BatchNormAct1d,
        lambda: nn.Linear(4, 3),
        (8, 4),
    ),
    "1d-3D": (
        nn.BatchNorm1d,
        batchnorm.BatchNorm1d,
        BatchNormAct1d,
        lambda: nn.Conv1d(2, 3, 1),
        (4, 2, 5),
    ),
    "2d": (
        nn.BatchNorm2d,
        batchnorm.BatchNorm2d,
        BatchNormAct2d,
        lambda: nn.Conv2d(2, 3, 1),
        (4, 2, 3, 5),
    ),
    "3d": (
        nn.BatchNorm3d,
        batchnorm.BatchNorm3d,
        BatchNormAct3d,
        lambda: nn.Conv3d(2, 3, 1),
        (3, 2, 2, 3, 4),
    ),
}

# activation module -> (activation, activation_param) the fused layer must carry
MODULES = {
    "ReLU": (nn.ReLU, "relu", None),
    "ReLU-inplace": (lambda: nn.ReLU(inplace=True), "relu", None),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    "LeakyReLU-inplace": (lambda: nn.LeakyReLU(0.05, inplace=True), "leaky_relu", 0.05),
    "ELU": (lambda: nn.ELU(0.5), "elu", 0.5),
    "SiLU": (nn.SiLU, "silu", None),
    "GELU": (nn.GELU, "gelu", None),
}

# a call in forward -> (activation, activation_param)
FUNCTIONS = {
    "torch.relu": (lambda z: torch.relu(z), "relu", None),
    "torch.relu_": (lambda z: torch.relu_(z), "relu", None),
    "F.relu": (lambda z: F.relu(z), "relu", None),
    "F.relu-inplace": (lambda z: F.relu(z, inplace=True), "relu", None),
    "x.relu()": (lambda z: z.relu(), "relu", None),
    "x.relu_()": (lambda z: z.relu_(), "relu", None),
    "F.leaky_relu-default": (lambda z: F.leaky_relu(z), "leaky_relu", 0.01),
    "F.leaky_relu-positional": (lambda z: F.leaky_relu(z, 0.2), "leaky_relu", 0.2),
    "F.leaky_relu-keyword": (
        lambda z: F.leaky_relu(z, negative_slope=0.3, inplace=True),
        "leaky_relu",
        0.3,
    ),
    "F.leaky_relu_": (lambda z: F.leaky_relu_(z, 0.1), "leaky_relu", 0.1),
    "F.elu": (lambda z: F.elu(z, 0.5), "elu", 0.5),
    "F.elu_": (lambda z: F.elu_(z), "elu", 1.0),
    "F.silu": (lambda z: F.silu(z), "silu", None),
    "F.gelu": (lambda z: F.gelu(z), "gelu", None),
    "F.gelu-none": (lambda z: F.gelu(z, approximate="none"), "gelu", None),
}

# calls that look like activations but are not one of the table's (exactly)
NOT_FUSED = {
    "F.gelu-tanh": lambda z: F.gelu(z, approximate="tanh"),
    "F.relu6": lambda z: F.relu6(z),
    "F.elu_-scaled": lambda z: F.elu_(z, 1.0, 2.0),
    "torch.sigmoid": lambda z: torch.sigmoid(z),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, and every BatchNorm with seeded non-default parameters and statistics."""
    model.to(DT)
    gen = _gen(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            randomize_bn_state(module, gen)
    return model


def _step(model: nn.Module, x: torch.Tensor, dy_seed: int = 5) -> dict[str, torch.Tensor]:
    """One forward and backward: output, input gradient, parameter gradients, buffers after."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    dy = torch.randn(y.shape, generator=_gen(dy_seed), dtype=DT)
    y.backward(dy)
    got = {"output": y.detach(), "input.grad": x.grad}
    got |= {f"{k}.grad": p.grad for k, p in model.named_parameters()}
    got |= {k: b.detach().clone() for k, b in model.named_buffers()}
    return got


def assert_same_computation(original: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """``fused`` computes what ``original`` computes: a training step, then evaluation."""
    for training in (True, False):
        original.train(training)
        fused.train(training)
        want, got = _step(original, x), _step(fused, x)
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, **TOL[DT], msg=key)


def _input(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=DT) * 2.0 + 0.5


def _fuse_quietly(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pair that should fuse warns about nothing
        return fuse_activations(model, **kwargs)


class Functional(nn.Module):
    """conv -> BatchNorm -> an activation called in forward."""

    def __init__(self, fn, bn_cls=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = bn_cls(3)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.bn(self.conv(x)))


class TwoActivated(nn.Module):
    """Two BatchNorms, each followed by the same activation module (one object)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = batchnorm.BatchNorm2d(3)
        self.act = nn.ELU(0.5)

    def forward(self, x):
        return self.act(self.bn2(self.act(self.bn1(self.conv(x)))))


class OwnModules(nn.Module):
    """Activation modules, each called once: the model keeps its class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.GELU())

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(2, 3, 1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Conv2d(3, 3, 1),
            batchnorm.BatchNorm2d(3),
            nn.LeakyReLU(0.2),
        )
        self.head = nn.Sequential(nn.BatchNorm2d(3), nn.SiLU())

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            return self.head(y)
        return self.head(-y)


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("source", ["torch", "ours"])
@pytest.mark.parametrize("act", MODULES, ids=str)
@pytest.mark.parametrize("rank", RANKS, ids=str)
def test_fuse_activation_module_keeps_class_and_computes_the_same(rank, act, source):
    theirs, ours, fused_cls, before, shape = RANKS[rank]
    factory, name, param = MODULES[act]
    bn_cls = theirs if source == "torch" else ours
    model = _prepare(nn.Sequential(before(), bn_cls(3), factory()))
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert type(fused) is nn.Sequential and fused is not model
    assert type(fused[1]) is fused_cls
    assert (fused[1].activation, fused[1].activation_param) == (name, param)
    assert type(fused[2]) is nn.Identity
    assert fused.state_dict().keys() == original.state_dict().keys()
    assert_same_computation(original, fused, _input(shape))


def test_fuse_keeps_the_layer_settings_and_policies():
    bn = batchnorm.BatchNorm2d(3, eps=1e-3, momentum=None, affine=False, nonfinite="raise")
    model = nn.Sequential(bn, nn.ReLU()).eval()
    fused = _fuse_quietly(model)[0]
    assert (fused.eps, fused.momentum, fused.affine, fused.nonfinite) == (
        1e-3,
        None,
        False,
        "raise",
    )
    assert fused.training is False and fused.weight is None


def test_fuse_model_of_own_class_with_modules_called_once():
    model = _prepare(OwnModules())
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert type(fused) is OwnModules
    assert type(fused.bn) is BatchNormAct2d and fused.bn.activation == "leaky_relu"
    assert type(fused.head[1]) is BatchNormAct2d and fused.head[1].activation == "gelu"
    assert type(fused.act) is nn.Identity and type(fused.head[2]) is nn.Identity
    # Same keys: a checkpoint of either loads into the other.
    original.load_state_dict(fused.state_dict(), strict=True)
    assert_same_computation(original, fused, _input((4, 2, 3, 3)))


# --------------------------------------------------------------------------- functions (fx)


@pytest.mark.parametrize("call", FUNCTIONS, ids=str)
def test_fuse_function_in_forward_through_fx(call):
    fn, name, param = FUNCTIONS[call]
    model = _prepare(Functional(fn))
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert isinstance(fused, torch.fx.GraphModule) and type(fused).__name__ == "Functional"
    assert type(fused.bn) is BatchNormAct2d
    assert (fused.bn.activation, fused.bn.activation_param) == (name, param)
    ops = [n for n in fused.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops == []  # the activation left forward
    assert_same_computation(original, fused, _input((4, 2, 3, 5)))


@pytest.mark.parametrize("call", NOT_FUSED, ids=str)
def test_fuse_leaves_other_functions_alone(call):
    model = _prepare(Functional(NOT_FUSED[call]))
    with pytest.warns(UserWarning, match=r"fuse_activations\(\): expected a model with a Batch"):
        fused = fuse_activations(model)
    assert type(fused) is Functional and type(fused.bn) is nn.BatchNorm2d


def test_fuse_shared_activation_module_rewrites_forward():
    model = _prepare(TwoActivated())
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert type(fused.bn1) is BatchNormAct2d and type(fused.bn2) is BatchNormAct2d
    assert fused.bn1.activation_param == fused.bn2.activation_param == 0.5
    assert_same_computation(original, fused, _input((4, 2, 3, 3)))


def test_fuse_ignores_our_layers_already_fused_and_traces_them_as_one_call():
    model = _prepare(
        nn.Sequential(
            nn.Conv2d(2, 3, 1),
            BatchNormAct2d(3, activation="leaky_relu", activation_param=0.3),
            nn.BatchNorm2d(3),
            nn.SiLU(),
        )
    )
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert type(fused[1]) is BatchNormAct2d and fused[1].activation_param == 0.3
    assert type(fused[2]) is BatchNormAct2d and fused[2].activation == "silu"
    assert_same_computation(original, fused, _input((4, 2, 3, 3)))


# --------------------------------------------------------------------------- untraceable


def test_fuse_untraceable_model_fuses_adjacent_sequential_children():
    model = _prepare(Untraceable())
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(copy.deepcopy(model))  # the case this test is about
    original = copy.deepcopy(model)
    fused = _fuse_quietly(model)
    assert type(fused) is Untraceable
    assert [type(m).__name__ for m in fused.block] == [
        "Conv2d",
        "BatchNormAct2d",
        "Identity",
        "Conv2d",
        "BatchNormAct2d",
        "Identity",
    ]
    assert type(fused.head[0]) is BatchNormAct2d and type(fused.head[1]) is nn.Identity
    assert fused.block[4].activation_param == 0.2
    assert fused.state_dict().keys() == original.state_dict().keys()
    for sign in (1.0, -1.0):  # both branches
        assert_same_computation(original, fused, sign * _input((4, 2, 3, 3)))


def test_fuse_untraceable_model_leaves_a_hooked_pair_with_a_warning():
    model = _prepare(Untraceable())
    model.block[1].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"'block\.1' followed by ReLU .* hooks"):
        fused = fuse_activations(model)
    assert type(fused.block[1]) is nn.BatchNorm2d and type(fused.block[2]) is nn.ReLU
    assert type(fused.block[4]) is BatchNormAct2d


# --------------------------------------------------------------------------- not fused


class UsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return F.relu(y) + y


class InPlaceOnShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        z = F.relu(y, inplace=True)  # also changes y, which is used again below
        return z * 2.0 + y


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(x)) + self.act(self.bn(2.0 * x))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.same = self.bn

    def forward(self, x):
        return F.silu(self.bn(x))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = batchnorm.BatchNorm2d(3)

    def forward(self, x, mask):
        return torch.relu(self.bn(x, mask=mask))


class _Block(nn.Module):
    __module__ = "torch.nn.test_block"  # torch.fx calls it as a whole, as it calls torch.nn's

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) * 2.0


class UsedInsideALeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        return F.relu(self.block.bn(x)) + self.block(x)


def test_fuse_refuses_a_batchnorm_inside_a_module_fx_does_not_trace():
    model = _prepare(UsedInsideALeaf())
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"'block\.bn' .* it is inside 'block', a _Block that"):
        fused = fuse_activations(model)
    assert type(fused.block.bn) is nn.BatchNorm2d
    assert_same_computation(original, fused, _input((4, 3, 2, 2)))


@pytest.mark.parametrize(
    "model, reason",
    [
        (UsedTwice(), "its output is also used elsewhere"),
        (InPlaceOnShared(), "its output is also used elsewhere"),
        (CalledTwice(), "it is called 2 times"),
        (Shared(), "it is reachable under 2 names"),
    ],
    ids=["used-twice", "inplace-on-shared", "called-twice", "shared"],
)
def test_fuse_refuses_inexact_pairs_with_a_warning(model, reason):
    model = _prepare(model)
    original = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=rf"'bn' followed by .* left unfused: {reason}"):
        fused = fuse_activations(model)
    assert type(fused) is type(model) and type(fused.bn) is nn.BatchNorm2d
    assert_same_computation(original, fused, _input((4, 3, 2, 2)))


def test_fuse_refuses_a_masked_call():
    model = Masked().to(DT)
    with pytest.warns(UserWarning, match=r"'bn' followed by .* called with more than its input"):
        fused = fuse_activations(model)
    assert type(fused.bn) is batchnorm.BatchNorm2d


@pytest.mark.parametrize("where", ["bn", "act"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_fuse_refuses_pairs_with_hooks(kind, where):
    model = _prepare(OwnModules())
    module = model.bn if where == "bn" else model.act
    getattr(module, f"register_{kind}_hook")(lambda *args: None)
    with pytest.warns(
        UserWarning, match=r"'bn' followed by LeakyReLU 'act', left unfused: .*hooks"
    ):
        fused = fuse_activations(model)
    assert type(fused.bn) is nn.BatchNorm2d and type(fused.act) is nn.LeakyReLU
    assert type(fused.head[1]) is BatchNormAct2d  # the other pair fuses


def test_fuse_refuses_everything_under_a_global_module_hook():
    model = _prepare(OwnModules())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with pytest.warns(UserWarning, match=r"left unfused: global module hooks"):
            fused = fuse_activations(model)
    finally:
        handle.remove()
    assert type(fused.bn) is nn.BatchNorm2d and type(fused.head[1]) is nn.BatchNorm2d


@pytest.mark.parametrize(
    "make",
    [
        lambda: batchnorm.SyncBatchNorm(3),
        lambda: batchnorm.FrozenBatchNorm2d(3),
        lambda: batchnorm.GhostBatchNorm2d(3, virtual_batch_size=2),
        lambda: batchnorm.BatchRenorm2d(3),
        lambda: type("MyBatchNorm2d", (nn.BatchNorm2d,), {})(3),
        lambda: nn.LazyBatchNorm2d(),
    ],
    ids=["sync", "frozen", "ghost", "renorm", "subclass", "lazy"],
)
def test_fuse_only_plain_batchnorm_classes(make):
    model = nn.Sequential(make(), nn.ReLU())
    before = [type(m) for m in model]
    # inplace: an uninitialized lazy layer cannot be deep-copied (torch refuses).
    with pytest.warns(UserWarning, match=r"expected a model with a BatchNorm followed by"):
        fused = fuse_activations(model, inplace=True)
    assert [type(m) for m in fused] == before


# --------------------------------------------------------------------------- inplace


def test_fuse_default_leaves_the_original_untouched():
    model = _prepare(OwnModules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    fused = _fuse_quietly(model)
    fused.train()(_input((4, 2, 3, 3)))  # updates the fused model's running statistics
    assert [type(m) for m in model.modules()] == classes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert fused.bn.weight is not model.bn.weight


def test_fuse_inplace_changes_the_model_itself_and_keeps_its_parameters():
    model = _prepare(OwnModules())
    original = copy.deepcopy(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = _fuse_quietly(model, inplace=True)
    assert fused is model and type(model.bn) is BatchNormAct2d
    assert dict(fused.named_parameters()) == params  # the same Parameter objects
    assert_same_computation(original, fused, _input((4, 2, 3, 3)))
    optimizer.step()  # the optimizer built before fusing trains the fused model


def test_fuse_inplace_graph_module_shares_tensors_and_leaves_the_model_computing():
    model = _prepare(Functional(lambda z: F.leaky_relu(z, 0.2)))
    x = _input((4, 2, 3, 5))
    want = model.eval()(x)
    fused = _fuse_quietly(model, inplace=True)
    assert isinstance(fused, torch.fx.GraphModule) and type(model.bn) is nn.BatchNorm2d
    torch.testing.assert_close(model(x), want, **TOL[DT])  # still the unfused computation
    assert fused.bn is not model.bn and fused.conv is model.conv
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(fused.bn, name) is getattr(model.bn, name), name
    fused.train()(x)
    assert int(model.bn.num_batches_tracked) == 1  # the very same buffers


def test_fuse_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"fuse_activations\(\): expected a torch.nn.Module"):
        fuse_activations([nn.BatchNorm2d(3)])
    with pytest.raises(TypeError, match=r"expected inplace to be True or False, got 1"):
        fuse_activations(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), inplace=1)


def test_fuse_is_exported_by_the_package_and_tools():
    assert batchnorm.fuse_activations is fuse_activations
    assert batchnorm.tools.fuse_activations is fuse_activations


def test_fuse_docstring_example_runs():
    result = doctest.testmod(fuse_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
