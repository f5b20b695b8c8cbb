"""make_mlp: the paper's layer order, our BatchNorm1d, shared initial weights, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.models import make_mlp


def test_make_mlp_layer_names_and_types_with_batchnorm():
    net = make_mlp(40, 10, hidden=5, depth=3, norm="batchnorm")
    names = [name for name, _ in net.named_children()]
    assert names == ["fc1", "bn1", "act1", "fc2", "bn2", "act2", "fc3", "bn3", "act3", "out"]
    assert all(type(net.get_submodule(f"bn{i}")) is batchnorm.BatchNorm1d for i in (1, 2, 3))
    # BN's shift replaces the bias of the affine map before it (paper, Sec. 3.2).
    assert all(net.get_submodule(f"fc{i}").bias is None for i in (1, 2, 3))
    assert net.out.bias is not None
    assert net(torch.randn(4, 40)).shape == (4, 10)


def test_make_mlp_without_norm_has_biases_and_no_bn():
    net = make_mlp(8, 3, hidden=4, depth=2)
    assert [n for n, _ in net.named_children()] == ["fc1", "act1", "fc2", "act2", "out"]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    assert all(m.bias is not None for m in net.modules() if isinstance(m, nn.Linear))


def test_make_mlp_same_generator_gives_same_weights_for_both_norms():
    kwargs = dict(hidden=6, depth=3, init_std=0.01)
    a = make_mlp(5, 3, norm="none", generator=torch.Generator().manual_seed(3), **kwargs)
    b = make_mlp(5, 3, norm="batchnorm", generator=torch.Generator().manual_seed(3), **kwargs)
    for name in ("fc1", "fc2", "fc3", "out"):
        assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight)
    assert torch.count_nonzero(a.fc1.bias) == 0
    w = torch.cat([m.weight.flatten() for m in a.modules() if isinstance(m, nn.Linear)])
    assert 0.005 < w.std().item() < 0.02


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden": 0}, "hidden"),
        ({"depth": 0}, "depth"),
        ({"activation": "gelu"}, "activation"),
        ({"norm": "layernorm"}, "norm"),
        ({"init_std": -1.0}, "init_std"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_make_mlp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mlp(4, 2, **kwargs)
