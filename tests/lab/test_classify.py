"""_classify: one measured training run, divergence marked, smoothing of the best value."""

from __future__ import annotations

import math

import pytest
import torch

from batchnorm.lab import data as lab_data
from batchnorm.lab._classify import (
    best_smoothed,
    check_curve,
    diverged,
    evaluate,
    train_classifier,
)
from batchnorm.lab.models import make_mlp


@pytest.fixture(scope="module")
def digits():
    return lab_data.load_dataset("digits").with_validation(200)


def _model(norm="none", seed=0):
    return make_mlp(
        64,
        10,
        hidden=16,
        depth=2,
        activation="relu",
        norm=norm,
        init="he",
        generator=torch.Generator().manual_seed(seed),
    )


def test_a_sane_rate_learns_and_is_not_diverged(digits):
    run = train_classifier(_model(), digits, lr=0.5, steps=60, batch_size=32, seed=0, eval_every=20)
    assert run["curve"]["steps"] == [0, 20, 40, 60]
    assert run["curve"]["train_loss"][0] is None
    assert not run["diverged"] and not diverged(run)
    assert run["test_accuracy"] > 0.5 and run["curve"]["val_accuracy"][-1] > 0.5
    check_curve(run, "run", n_measured=4)


def test_a_huge_rate_is_marked_diverged_and_stops(digits):
    advanced = []
    run = train_classifier(
        _model(),
        digits,
        lr=1e30,
        steps=50,
        batch_size=32,
        seed=0,
        eval_every=10,
        advance=advanced.append,
    )
    assert run["diverged"] and diverged(run)
    assert run["diverged_at"] is not None and run["diverged_at"] <= 50
    assert run["test_accuracy"] is None
    assert sum(advanced) == 50  # the progress bar still reaches the end


def test_a_large_rate_whose_loss_stays_finite_but_never_falls_is_diverged_too(digits):
    run = train_classifier(_model(), digits, lr=1e6, steps=50, batch_size=32, seed=0, eval_every=10)
    assert not run["diverged"] and diverged(run)


def test_a_loss_that_never_decreases_counts_as_diverged():
    run = {"diverged": False, "first_loss": 2.0, "curve": {"train_loss": [None, 2.1, 2.3]}}
    assert diverged(run)
    run["curve"]["train_loss"][-1] = 1.9
    assert not diverged(run)


def test_same_seed_same_run_and_evaluate_restores_the_mode(digits):
    a = train_classifier(
        _model("batchnorm"), digits, lr=0.1, steps=30, batch_size=16, seed=1, eval_every=10
    )
    b = train_classifier(
        _model("batchnorm"), digits, lr=0.1, steps=30, batch_size=16, seed=1, eval_every=10
    )
    assert a == b
    model = _model("batchnorm")
    model.train()
    evaluate(model, digits.x_val, digits.y_val)
    assert model.training


def test_best_smoothed():
    assert best_smoothed([0.1, 0.9, 0.1, 0.5, 0.5], 2) == pytest.approx(0.5)
    assert math.isnan(best_smoothed([None, None], 2))


def test_lr_at_sets_each_steps_rate(digits):
    seen = []

    def schedule(t):
        seen.append(t)
        return 0.5 if t < 5 else 0.0

    model = _model()
    frozen = []
    train_classifier(
        model,
        digits,
        lr=9.0,
        steps=8,
        batch_size=16,
        seed=0,
        eval_every=4,
        lr_at=schedule,
        after_step=lambda step, m: frozen.append(m.out.weight.detach().clone()),
    )
    assert seen == list(range(8))
    assert not torch.equal(frozen[3], frozen[4])  # step 5 (t = 4) moved the weights
    assert all(torch.equal(frozen[4], w) for w in frozen[5:])  # rate 0 from t = 5 on
