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


# --- the norms, inits, dropout and the 1-D CNN of the claims experiments ------------------------


@pytest.mark.parametrize(
    ("norm", "cls", "name"),
    [
        ("batchnorm", batchnorm.BatchNorm1d, "bn"),
        ("ghost", batchnorm.GhostBatchNorm1d, "bn"),
        ("renorm", batchnorm.BatchRenorm1d, "bn"),
        ("groupnorm", nn.GroupNorm, "gn"),
    ],
)
def test_each_norm_sits_between_the_affine_map_and_the_activation(norm, cls, name):
    net = make_mlp(8, 3, hidden=12, depth=2, activation="relu", norm=norm)
    names = [n for n, _ in net.named_children()]
    assert names == ["fc1", f"{name}1", "act1", "fc2", f"{name}2", "act2", "out"]
    assert type(net.get_submodule(f"{name}1")) is cls
    assert net.fc1.bias is None
    assert net(torch.randn(16, 8)).shape == (16, 3)


def test_groupnorm_groups_are_lowered_until_they_divide_the_width():
    from batchnorm.lab.models import make_norm

    assert make_norm("groupnorm", 12, {"groups": 8}).num_groups == 6
    assert make_norm("groupnorm", 4).num_groups == 4
    assert make_norm("none", 4) is None
    with pytest.raises(ValueError, match="norm"):
        make_norm("layer", 4)


def test_dropout_after_every_hidden_layer_or_only_the_last():
    every = make_mlp(8, 3, hidden=4, depth=3, dropout=0.5)
    last = make_mlp(8, 3, hidden=4, depth=3, dropout=0.5, dropout_layers="last")
    drops = lambda net: [n for n, m in net.named_children() if isinstance(m, nn.Dropout)]  # noqa: E731
    assert drops(every) == ["drop1", "drop2", "drop3"]
    assert drops(last) == ["drop3"]
    assert [n for n, _ in last.named_children()][-2:] == ["drop3", "out"]
    assert drops(make_mlp(8, 3, hidden=4, depth=3)) == []


def test_he_init_and_weight_scale_set_the_weights_standard_deviation():
    g = torch.Generator().manual_seed(0)
    net = make_mlp(400, 10, hidden=400, depth=1, activation="relu", init="he", generator=g)
    assert net.fc1.weight.std().item() == pytest.approx((2 / 400) ** 0.5, rel=0.02)
    g = torch.Generator().manual_seed(0)
    scaled = make_mlp(
        400, 10, hidden=400, depth=1, activation="relu", init="he", generator=g, weight_scale=10.0
    )
    assert torch.allclose(scaled.fc1.weight, 10 * net.fc1.weight)


def test_cnn1d_layers_shapes_and_same_weights_for_every_norm():
    from batchnorm.lab.models import make_cnn1d

    nets = {
        norm: make_cnn1d(
            40,
            10,
            channels=(8, 16),
            norm=norm,
            init="he",
            generator=torch.Generator().manual_seed(1),
        )
        for norm in ("none", "batchnorm", "groupnorm")
    }
    assert [n for n, _ in nets["batchnorm"].named_children()] == [
        "view",
        "conv1",
        "bn1",
        "act1",
        "conv2",
        "bn2",
        "act2",
        "pool",
        "out",
    ]
    for net in nets.values():
        assert net(torch.randn(5, 40)).shape == (5, 10)
    assert torch.equal(nets["none"].conv2.weight, nets["batchnorm"].conv2.weight)
    assert nets["none"].conv1.bias is not None and nets["batchnorm"].conv1.bias is None
    with pytest.raises(ValueError, match="kernel_size"):
        make_cnn1d(40, 10, kernel_size=4)


def test_noisy_batchnorm_is_batchnorm_in_eval_and_noisy_anew_each_training_step():
    from batchnorm.lab.models import NoisyBatchNorm1d

    torch.manual_seed(0)
    noisy, plain = NoisyBatchNorm1d(6, strength=1.0, seed=3), batchnorm.BatchNorm1d(6)
    x = torch.randn(64, 6)
    a, b = noisy(x), noisy(x)
    assert not torch.allclose(a, b)  # a new noise distribution every step
    plain(x), plain(x)
    noisy.eval(), plain.eval()
    assert torch.equal(noisy(x), plain(x))  # same running statistics, no noise in eval
    again = NoisyBatchNorm1d(6, strength=1.0, seed=3)
    assert torch.equal(again(x), a)  # the noise is seeded
    with pytest.raises(ValueError, match="strength"):
        NoisyBatchNorm1d(6, strength=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.0}, "dropout"),
        ({"dropout_layers": "first"}, "dropout_layers"),
        ({"init": "lecun"}, "init"),
        ({"weight_scale": 0.0}, "weight_scale"),
    ],
)
def test_make_mlp_rejects_bad_new_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mlp(4, 2, **kwargs)
