"""``fold``: BatchNorm folded into the preceding Conv/ConvTranspose/Linear, and ``check_fold``.

The oracle is always the eval-mode original model's output on the same input; the folded
parameters are never compared with numbers computed the way ``fold`` computes them.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
import batchnorm.tools.fold as fold_module
from batchnorm.frozen import FrozenBatchNorm2d
from batchnorm.tools.fold import check_fold, fold
from conftest import (
    DTYPES,
    TOL,
    assert_state_unchanged,
    bn_classes,
    labelled,
    make_input,
    randomize_bn_state,
    snapshot_state,
)

IMPLS = ["torch", "ours"]


def _bn(rank: int, impl: str, num_features: int, **kwargs) -> nn.Module:
    ours, theirs = bn_classes(rank)
    return (ours if impl == "ours" else theirs)(num_features, **kwargs)


def _seeded(model: nn.Module, gen: torch.Generator, dtype=torch.float64) -> nn.Module:
    """``model`` with every parameter and BatchNorm buffer drawn from ``gen``, in eval mode."""
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                randomize_bn_state(m, gen)
    return model.eval()


def _norm_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _eval_output(model: nn.Module, *inputs):
    with torch.no_grad():
        return model(*inputs)


def _fold_quietly(model: nn.Module, **kwargs) -> nn.Module:
    """``fold`` with warnings turned into errors: these models must fold."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fold(model, **kwargs)


# --------------------------------------------------------------------------- each layer kind

# name -> (layer factory, input shape); output channels differ from input channels and, for the
# transposed convolutions, in/groups differs from out/groups so that a wrong channel mapping
# shows up in the outputs.
LAYER_CASES = {
    "conv1d-stride-padding": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 9)),
    "conv1d-depthwise-nobias": (lambda: nn.Conv1d(4, 4, 3, groups=4, bias=False), (3, 4, 7)),
    "conv2d-groups-dilation-reflect-nobias": (
        lambda: nn.Conv2d(
            4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect", bias=False
        ),
        (2, 4, 7, 6),
    ),
    "conv2d-depthwise-stride": (lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6), (2, 6, 7, 7)),
    "conv3d-groups-nobias": (
        lambda: nn.Conv3d(4, 6, (2, 3, 3), groups=2, padding=1, bias=False),
        (2, 4, 3, 5, 4),
    ),
    "convtranspose1d-groups-nobias": (
        lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False),
        (3, 4, 5),
    ),
    "convtranspose2d-groups3-stride": (
        lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, output_padding=1, groups=3),
        (2, 6, 4, 5),
    ),
    "convtranspose3d-groups": (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), (2, 4, 2, 3, 3)),
    "linear": (lambda: nn.Linear(5, 6), (7, 5)),
    "linear-nobias": (lambda: nn.Linear(5, 6, bias=False), (7, 5)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not-affine"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_fold_matches_eval_original(case, impl, affine, dtype, gen):
    make_layer, shape = LAYER_CASES[case]
    layer = make_layer()
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    norm = _bn(len(shape), impl, channels, eps=1e-3, affine=affine)
    model = _seeded(nn.Sequential(layer, norm), gen, dtype)
    x = make_input(shape, dtype, generator=gen)
    want = _eval_output(model, x)

    folded = _fold_quietly(model)

    assert isinstance(folded[1], nn.Identity)
    assert _norm_paths(folded) == []
    assert isinstance(folded[0].bias, nn.Parameter) and folded[0].bias.dtype == dtype
    assert folded[0].weight.dtype == dtype
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[dtype])


# --------------------------------------------------------------------------- traced models


class _BasicBlock(nn.Module):
    """A ResNet basic block written with attributes, a residual add and a 1x1 shortcut."""

    def __init__(self, impl: str, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(4, impl, cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _bn(4, impl, cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _bn(4, impl, cout)
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_fold_resnet_block_folds_every_norm(impl, gen, caplog):
    model = _seeded(_BasicBlock(impl, 3, 4, stride=2), gen)
    x = make_input((2, 3, 8, 8), torch.float64, generator=gen)
    want = _eval_output(model, x)

    with caplog.at_level(logging.INFO, logger=fold_module.__name__):
        folded = _fold_quietly(model)

    assert type(folded) is _BasicBlock
    assert _norm_paths(folded) == []
    assert "folded 3 BatchNorm" in caplog.text and "torch.fx" in caplog.text
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


class _TwiceApplied(nn.Module):
    """One conv+bn block applied twice: every conv output still feeds only the bn."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh())

    def forward(self, x):
        return self.block(self.block(x))


def test_fold_block_applied_twice_folds_once(gen):
    # Folding the shared pair twice (once per call) would apply the BatchNorm's scale twice.
    model = _seeded(_TwiceApplied(), gen)
    x = make_input((2, 3, 5, 5), torch.float64, generator=gen)
    want = _eval_output(model, x)

    folded = _fold_quietly(model)

    assert _norm_paths(folded) == []
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- untraceable models


class _Branchy(nn.Module):
    """Data-dependent control flow (fx cannot trace it) around Sequentials and a bare pair."""

    def __init__(self, impl: str):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            _bn(4, impl, 4),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 1), _bn(4, impl, 4)),
        )
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = _bn(4, impl, 4)

    def forward(self, x):
        y = self.features(x)
        if x.sum() > 0:
            return self.bn(self.conv(y))
        return -self.bn(self.conv(y))


def _user_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("impl", IMPLS)
def test_fold_untraceable_model_folds_nothing_and_warns_per_pair(impl, gen, caplog):
    # This forward happens to call the Sequentials only as a whole, but nothing short of a
    # trace shows that (the next test has forwards that do not), so no pair is folded.
    model = _seeded(_Branchy(impl), gen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen).abs()
    wants = [_eval_output(model, x), _eval_output(model, -x)]  # both branches
    norms_before = _norm_paths(model)

    with (
        caplog.at_level(logging.INFO, logger=fold_module.__name__),
        pytest.warns(UserWarning, match="does not trace with torch.fx") as record,
    ):
        folded = fold(model)

    messages = _user_warnings(record)
    assert len(messages) == 2  # one per Sequential pair; 'bn' follows no visible layer
    assert "'features.1' after 'features.0'" in messages[0]
    assert "'features.3.1' after 'features.3.0'" in messages[1]
    assert all("TraceError" in m for m in messages)
    assert "left 'bn'" in caplog.text
    assert _norm_paths(folded) == norms_before
    for got, want in zip([_eval_output(folded, x), _eval_output(folded, -x)], wants, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


class _ReachesIntoBlock(nn.Module):
    """A Sequential (conv, bn) registered once, that an untraceable forward also reaches into."""

    def __init__(self, reach: str):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.reach = reach

    def forward(self, x):
        y = self.block(x)
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace past this
            y = y + self._reach(x)
        return y

    def _reach(self, x):
        if self.reach == "layer-called-directly":
            return self.block[0](x)
        if self.reach == "norm-called-directly":
            return self.block[1](x)
        if self.reach == "sequential-sliced":
            return self.block[1:](x)  # a new Sequential holding the norm without the conv
        return x * self.block[0].weight.sum()


@pytest.mark.parametrize(
    "reach",
    ["layer-called-directly", "norm-called-directly", "sequential-sliced", "layer-weight-read"],
)
def test_fold_untraceable_model_leaves_sequential_pair_reached_from_forward(reach, gen):
    # Every module is registered once, so the module tree looks clean; folding would still be
    # off by the BatchNorm's shift and scale on the second path.
    model = _seeded(_ReachesIntoBlock(reach), gen)
    x = make_input((2, 3, 5, 5), torch.float64, generator=gen).abs()
    want = _eval_output(model, x)

    left = r"'block\.1' after 'block\.0', left unfolded: the model does not trace with torch\.fx"
    with pytest.warns(UserWarning, match=left):
        folded = fold(model)

    assert isinstance(folded.block[1], nn.BatchNorm2d)
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- traced: hidden uses


class _LeafUsesLayer(nn.Module):
    """A Linear inside a torch.nn layer that torch.fx keeps whole (a leaf), also called alone."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        seq = x[:, None]
        out, _ = self.attn(seq, seq, seq)  # uses attn.out_proj's weight: one call fx cannot see
        return out[:, 0] + self.bn(self.attn.out_proj(x))


def test_fold_leaves_layer_that_an_untraced_leaf_also_uses(gen):
    model = _seeded(_LeafUsesLayer(), gen)
    x = make_input((3, 4), torch.float64, generator=gen)
    want = _eval_output(model, x)

    with pytest.warns(UserWarning, match=r"'bn' after 'attn\.out_proj', left unfolded: .*'attn'"):
        folded = fold(model)

    assert isinstance(folded.bn, nn.BatchNorm1d)
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


class _CleanAndReused(nn.Module):
    """A clean (conv, bn) pair, then a second pair that forward also uses in another way."""

    def __init__(self, use: str):
        super().__init__()
        self.clean = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.use = use

    def forward(self, x):
        y = self.clean(x)
        if self.use == "layer-called-twice":
            return self.bn(self.conv(y)) + self.conv(2 * y)
        if self.use == "norm-called-twice":
            return self.bn(self.conv(y)) + self.bn(y)
        z = self.conv(y)
        return self.bn(z) + z


# use -> reason expected in the warning
REUSES = {
    "layer-called-twice": r"'conv' is called 2 times",
    "norm-called-twice": r"also called on",
    "layer-output-reused": r"also used elsewhere",
}


@pytest.mark.parametrize("use", list(REUSES))
def test_fold_warns_for_each_pair_left_while_others_fold(use, gen):
    model = _seeded(_CleanAndReused(use), gen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _eval_output(model, x)

    with pytest.warns(
        UserWarning, match=rf"'bn' after 'conv', left unfolded: .*{REUSES[use]}"
    ) as r:
        folded = fold(model)

    assert len(_user_warnings(r)) == 1
    assert _norm_paths(folded) == ["bn"]
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- hooks


def _two_pairs() -> nn.Sequential:
    """Two conv+bn pairs in a row; the hooks go on the first, the second must still fold."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )


def _seen_and_doubled(seen: list, value: torch.Tensor) -> torch.Tensor:
    seen.append(value.detach().clone())
    return 2 * value


def _backward_hook(seen: list):
    """A (full or legacy) backward hook: records grad_output, doubles grad_input."""

    def hook(module, grad_input, grad_output):
        seen.append(grad_output[0].detach().clone())
        return tuple(None if g is None else 2 * g for g in grad_input)

    return hook


def _backward_pre_hook(seen: list):
    return lambda module, grad_output: (_seen_and_doubled(seen, grad_output[0]),)


# kind -> (register(module, seen): a hook that records what it sees and doubles it, reason)
HOOKS = {
    "forward-pre": (
        lambda m, seen: m.register_forward_pre_hook(
            lambda mod, args: (_seen_and_doubled(seen, args[0]),)
        ),
        "forward pre-hooks",
    ),
    "forward": (
        lambda m, seen: m.register_forward_hook(
            lambda mod, args, out: _seen_and_doubled(seen, out)
        ),
        "forward hooks",
    ),
    "forward-with-kwargs": (
        lambda m, seen: m.register_forward_hook(
            lambda mod, args, kwargs, out: _seen_and_doubled(seen, out), with_kwargs=True
        ),
        "forward hooks",
    ),
    "full-backward": (
        lambda m, seen: m.register_full_backward_hook(_backward_hook(seen)),
        "backward hooks",
    ),
    "full-backward-pre": (
        lambda m, seen: m.register_full_backward_pre_hook(_backward_pre_hook(seen)),
        "backward pre-hooks",
    ),
    "legacy-backward": (
        lambda m, seen: m.register_backward_hook(_backward_hook(seen)),
        "backward hooks",
    ),
}


def _run_with_hooks(model: nn.Module, x: torch.Tensor, seen: list):
    """Output, input gradient of a weighted sum of it, and what the hooks saw meanwhile."""
    seen.clear()
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), x.grad, list(seen)


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@pytest.mark.parametrize("kind", list(HOOKS))
@pytest.mark.parametrize("where", ["layer", "norm"])
def test_fold_leaves_pair_with_any_module_hook_and_warns(where, kind, gen):
    model = _seeded(_two_pairs(), gen)
    register, reason = HOOKS[kind]
    seen = []
    register(model[0] if where == "layer" else model[1], seen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _run_with_hooks(model, x, seen)

    with pytest.warns(UserWarning, match=rf"'1' after '0', left unfolded: .*{reason}") as record:
        folded = fold(model)

    assert len(_user_warnings(record)) == 1
    assert _norm_paths(folded) == ["1"]  # the hooked pair stays, the other one is folded
    got = _run_with_hooks(folded, x, seen)
    for name, a, b in zip(["output", "input grad", "seen by hook"], got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=labelled(name))


def _on_norms(hook):
    """A global hook that acts on BatchNorm layers only (as a statistics monitor might)."""
    return lambda module, *args: hook(module, *args) if isinstance(module, _BatchNorm) else None


_MODULE = torch.nn.modules.module

# kind -> (register(seen): a global hook on BatchNorm calls that records and doubles, reason)
GLOBAL_HOOKS = {
    "forward-pre": (
        lambda seen: _MODULE.register_module_forward_pre_hook(
            _on_norms(lambda mod, args: (_seen_and_doubled(seen, args[0]),))
        ),
        "forward pre-hooks",
    ),
    "forward": (
        lambda seen: _MODULE.register_module_forward_hook(
            _on_norms(lambda mod, args, out: _seen_and_doubled(seen, out))
        ),
        "forward hooks",
    ),
    "full-backward": (
        lambda seen: _MODULE.register_module_full_backward_hook(_on_norms(_backward_hook(seen))),
        "backward hooks",
    ),
    "full-backward-pre": (
        lambda seen: _MODULE.register_module_full_backward_pre_hook(
            _on_norms(_backward_pre_hook(seen))
        ),
        "backward pre-hooks",
    ),
    # register_module_backward_hook (legacy) fills the same dict as the full one, and torch
    # refuses it for the rest of the process once a full global backward hook was registered.
}


@pytest.mark.parametrize("kind", list(GLOBAL_HOOKS))
def test_fold_leaves_every_pair_while_a_global_module_hook_is_registered(kind, gen):
    # A global hook runs on every module call: after folding it would meet an Identity and the
    # folded layer where it met the BatchNorm and the layer.
    model = _seeded(_two_pairs(), gen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    register, reason = GLOBAL_HOOKS[kind]
    seen = []
    handle = register(seen)
    try:
        want = _run_with_hooks(model, x, seen)
        with pytest.warns(UserWarning, match=rf"global module {reason} are registered") as record:
            folded = fold(model)
        got = _run_with_hooks(folded, x, seen)
    finally:
        handle.remove()

    assert len(_user_warnings(record)) == 2
    assert _norm_paths(folded) == ["1", "3"]
    for name, a, b in zip(["output", "input grad", "seen by hook"], got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=labelled(name))


def test_fold_ignores_state_dict_hooks(gen):
    # state_dict hooks act on saving and loading, which folding changes by design (the
    # BatchNorm's keys go away), not on the forward computation: they do not block.
    model = _seeded(_two_pairs(), gen)
    model[1].register_state_dict_pre_hook(lambda mod, prefix, keep_vars: None)
    model[0].register_load_state_dict_post_hook(lambda mod, incompatible_keys: None)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _eval_output(model, x)

    folded = _fold_quietly(model)

    assert _norm_paths(folded) == []
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- left unfolded


class _UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _CalledTwice(_UsedTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(2 * x)


class _ReadsWeight(_UsedTwice):
    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


class _Aliased(nn.Module):
    """The conv of a Sequential also registered under a second name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.features = nn.Sequential(self.conv, nn.BatchNorm2d(4))

    def forward(self, x):
        return self.features(x)


class _SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.other = nn.Conv2d(3, 4, 3)
        self.other.weight = self.features[0].weight

    def forward(self, x):
        return self.features(x) + self.other(x)


class _ActBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass that does more than normalise (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _hooked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    return model


# name -> (model factory, reason expected in the warning)
NOT_FOLDED = {
    "after-relu": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
        r"follows a ReLU",
    ),
    "conv-output-used-twice": (_UsedTwice, r"also used elsewhere"),
    "conv-called-twice": (_CalledTwice, r"'conv' is called 2 times"),
    "weight-read-by-forward": (_ReadsWeight, r"reads the tensors of 'conv'"),
    "no-running-stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        r"no running statistics",
    ),
    "conv-reachable-twice": (_Aliased, r"reachable under 2 names"),
    "shared-weight": (_SharedWeight, r"shares a parameter"),
    "norm-overrides-forward": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _ActBatchNorm2d(4)),
        r"_ActBatchNorm2d that overrides forward",
    ),
    "norm-has-hook": (_hooked, r"forward hooks"),
}


@pytest.mark.parametrize("case", list(NOT_FOLDED))
def test_fold_leaves_unsafe_pairs_and_warns(case, gen):
    make_model, reason = NOT_FOLDED[case]
    model = _seeded(make_model(), gen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _eval_output(model, x)
    norms_before = {path: type(m) for path, m in model.named_modules() if isinstance(m, _BatchNorm)}

    with pytest.warns(UserWarning, match=reason):
        folded = fold(model)

    assert {p: type(folded.get_submodule(p)) for p in _norm_paths(folded)} == norms_before
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


def test_fold_model_without_batchnorm_warns_and_keeps_outputs(gen):
    model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), gen)
    x = make_input((2, 3, 5, 5), torch.float64, generator=gen)
    want = _eval_output(model, x)

    with pytest.warns(UserWarning, match="with none"):
        folded = fold(model)

    assert folded is not model
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- rejection, copies


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("where", ["whole-model", "one-nested-norm"])
def test_fold_rejects_training_mode_without_touching_model(where, inplace, gen):
    model = _seeded(_BasicBlock("torch", 3, 4, stride=1), gen)
    if where == "whole-model":
        model.train()
        expected = r"got 'bn1' \(and 2 more\) in training mode; call model.eval\(\) first"
    else:
        model.downsample[1].train()
        expected = r"got 'downsample.1' in training mode"
    snapshot, modes = snapshot_state(model), _modes(model)

    with pytest.raises(ValueError, match=r"^fold\(\): expected a model in evaluation mode, "):
        fold(model, inplace=inplace)
    with pytest.raises(ValueError, match=expected):
        fold(model, inplace=inplace)

    assert_state_unchanged(model, snapshot)
    assert _modes(model) == modes
    assert _norm_paths(model) == ["bn1", "bn2", "downsample.1"]


def test_fold_rejects_training_root_without_batchnorm():
    with pytest.raises(ValueError, match="got the model in training mode"):
        fold(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("bad", [None, "model", [nn.Linear(2, 2)]], ids=["None", "str", "list"])
def test_fold_rejects_non_module(bad):
    with pytest.raises(TypeError, match=r"fold\(\): expected a torch.nn.Module, got"):
        fold(bad)


def test_fold_rejects_non_bool_inplace():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    with pytest.raises(TypeError, match="expected inplace to be True or False, got 1"):
        fold(model, inplace=1)
    assert isinstance(model[1], nn.BatchNorm1d)


def test_fold_copy_leaves_original_untouched(gen):
    model = _seeded(_BasicBlock("ours", 3, 4, stride=1), gen)
    snapshot, modes = snapshot_state(model), _modes(model)

    folded = _fold_quietly(model)

    assert folded is not model
    assert folded.conv1.weight is not model.conv1.weight
    assert_state_unchanged(model, snapshot)
    assert _modes(model) == modes
    assert _norm_paths(model) == ["bn1", "bn2", "downsample.1"]


def test_fold_inplace_changes_and_returns_the_same_model(gen):
    model = _seeded(_BasicBlock("ours", 3, 4, stride=1), gen)
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _eval_output(model, x)
    weight = model.conv1.weight

    folded = _fold_quietly(model, inplace=True)

    assert folded is model
    assert model.conv1.weight is weight  # rewritten in place: same Parameter object
    assert _norm_paths(model) == []
    assert not any(_modes(model))
    torch.testing.assert_close(_eval_output(model, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- frozen norms


@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"trainable_affine": True}],
    ids=["buffers", "not-affine", "trainable-affine"],
)
def test_fold_folds_frozen_batchnorm_in_either_mode(options, gen):
    norm = FrozenBatchNorm2d(4, eps=1e-3, **options)
    model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm), gen)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
            norm.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    norm.train()  # a frozen layer has no mode-dependent behaviour: still folded
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    want = _eval_output(model, x)

    folded = _fold_quietly(model)

    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(_eval_output(folded, x), want, **TOL[torch.float64])


# --------------------------------------------------------------------------- check_fold


def test_check_fold_is_zero_for_a_copy(gen):
    model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), gen)
    x = make_input((2, 3, 5, 5), torch.float64, generator=gen)
    assert check_fold(model, copy.deepcopy(model), x) == 0.0


def test_check_fold_reports_a_perturbation_and_restores_modes(eval_routing, gen):
    model = _seeded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), gen, torch.float32)
    x = make_input((2, 3, 5, 5), torch.float32, generator=gen)
    folded = _fold_quietly(model)
    folded_error = check_fold(model, folded, x)
    with torch.no_grad():
        folded[0].bias[2] += 0.25  # shifts every output of channel 2 by 0.25
    model.train()
    folded[0].train()

    diff = check_fold(model, folded, x)

    # float32 outputs of magnitude ~10: rounding is ~1e-6, the shift 0.25.
    assert 0 < folded_error < 1e-5
    assert diff == pytest.approx(0.25, abs=1e-5)
    assert all(_modes(model)) and _modes(folded) == [False, True, False]
    with torch.no_grad():
        manual = (model.eval()(x).double() - folded(x).double()).abs().max().item()
    assert diff == manual


class _Structured(nn.Module):
    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift

    def forward(self, x, *, scale=1.0):
        return {"a": x * scale, "b": (x, [x + self.shift])}


def test_check_fold_handles_nested_outputs_and_kwargs():
    x = torch.arange(6.0).reshape(2, 3)
    assert check_fold(_Structured(0.0), _Structured(0.5), x, scale=2.0) == 0.5


def test_check_fold_rejects_mismatched_outputs():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"output of the same shape .* \(2, 3\) and \(2, 2\)"):
        check_fold(nn.Linear(3, 3), nn.Linear(3, 2), x)
    with pytest.raises(TypeError, match="expected folded to be a torch.nn.Module, got str"):
        check_fold(nn.Linear(3, 3), "folded", x)


def test_fold_folds_our_sync_batchnorm_in_eval_mode(eval_routing, gen):
    """In evaluation mode batchnorm.SyncBatchNorm never synchronises: it folds like BatchNorm."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), batchnorm.SyncBatchNorm(4), nn.ReLU())
    randomize_bn_state(model[1], gen)
    model = model.double().eval()
    x = make_input((2, 3, 6, 6), torch.float64, generator=gen)
    with torch.no_grad():
        want = model(x)
    folded = fold(model)
    assert isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, **TOL[torch.float64])
