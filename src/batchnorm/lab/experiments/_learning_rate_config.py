"""Settings and measures of the learning-rate experiment: its claims' pass rules :data:`RULES`,
:class:`LearningRateConfig` and its :data:`PRESETS`, the plan of a seed's units, and the pure
functions the verdicts are computed with. See :mod:`batchnorm.lab.experiments.learning_rate`
for the design.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import data as lab_data
from .._units import (
    Unit,
)
from ..protocol import Rule
from ._learning_rate_nets import NETS, NORMS, arm_name

TITLE = "Learning-rate sweep: largest stable rate and best accuracy with and without BatchNorm"
CLAIM = "BN allows (and benefits from) higher learning rates"
# Every dataset of the lab has 10 classes (prepare() checks): a diverged run counts as guessing.
CHANCE = 0.1
# A run "learned" if its final validation accuracy is this far above chance (figure1's margin).
LEARNED_MARGIN = 0.05
# 10^-2.5 ... 10^2, three significant digits: 0.00316, 0.01, ..., 31.6, 100.
HALF_DECADES: tuple[float, ...] = tuple(float(f"{10 ** (k / 2):.3g}") for k in range(-5, 5))
# The learning rate is the swept variable; nothing else is tuned (see the module docstring).
TUNING = None

_STABLE_ANCHOR = (
    "Ioffe & Szegedy 2015, Sec. 3.3 and 4.2 (BN-x5, BN-x30); Bjorck et al. 2018 (BN enables "
    "larger learning rates)"
)


def _net_rules(net: str) -> tuple[Rule, ...]:
    return (
        Rule(
            key=f"stable_{net}",
            claim=f"BN's largest stable learning rate is at least 10x no-BN's ({net})",
            anchor=_STABLE_ANCHOR,
            measure=(
                "2 log10(largest stable rate with BN / without), in half-decades; an arm with "
                "no stable rate counts one grid step below the grid"
            ),
            unit="half-decades",
            # 10x (2 half-decades): between the paper's BN-x5 and BN-x30, and twice the grid's
            # resolution, so that where divergence happens to fall within one grid step cannot
            # decide it. The effect moves in whole grid steps, so > 1.5 means >= 2.
            threshold=1.5,
        ),
        Rule(
            key=f"best_{net}",
            claim=f"BN's best accuracy over the rate grid is higher than no-BN's ({net})",
            anchor="Bjorck et al. 2018 (BN's benefit comes from the higher rates it allows)",
            measure=(
                "test accuracy at the rate with the best final validation accuracy, with BN "
                "minus without"
            ),
            unit="pp",
            # Half a percentage point: 75 of the 15,000 test examples, about one standard
            # error of a difference of two accuracies on them (0.46 pp at 80 %), so that 4 of
            # 5 seeds above it is not test-set noise.
            threshold=0.5,
        ),
        Rule(
            key=f"range_{net}",
            claim=f"BN widens the range of good learning rates ({net})",
            anchor=(
                "Ioffe & Szegedy 2015, Sec. 3.3 (BN makes training more resilient to the "
                "parameter scale); Bjorck et al. 2018"
            ),
            measure=(
                "width of the range of stable rates within 2 pp of the arm's best final "
                "validation accuracy, with BN minus without, in half-decades"
            ),
            unit="half-decades",
            # At least one grid step wider: the grid's resolution. 2 pp is ~3x the standard
            # error of a validation accuracy on 5,000 examples (0.57 pp at 80 %), so a rate
            # inside it is not distinguishably worse than the best.
            threshold=0.5,
        ),
    )


RULES: tuple[Rule, ...] = (
    *_net_rules("relu6"),
    *_net_rules("sigmoid3"),
    Rule(
        key="autotune",
        claim=(
            "Auto rate-tuning: with BN the weights grow so that the effective rate lr/||W||^2 "
            "falls at least 2x during training at BN's largest stable rate (both nets)"
        ),
        anchor="Arora, Li & Lyu 2019 (auto rate-tuning by batch normalization)",
        measure=(
            "effective rate at the start / at the end, geometric mean over hidden layers, BN "
            "arm at its largest stable rate; the smaller of the two nets"
        ),
        unit="x",
        # Plain SGD can only grow a scale-invariant weight (the factor is >= 1 by arithmetic);
        # the claim is that the growth is large enough to matter where BN is stable and
        # no-BN is not. Halving the step is the least that could explain a stable range wider
        # by a grid step (3.16x) at all.
        threshold=2.0,
    ),
)


# --- settings ---------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _geometric(values: Sequence[float]) -> bool:
    """Whether ``values`` ascend with one ratio (to 1 %, for 3-digit roundings such as 3.16)."""
    if len(values) < 2:
        return False
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    return ratios[0] > 1 and all(abs(r / ratios[0] - 1) < 0.01 for r in ratios)


@dataclass(frozen=True)
class LearningRateConfig:
    """Settings of the learning-rate sweep.

    Args:
        dataset: One of :data:`batchnorm.lab.data.DATASETS`.
        n_val: Training examples held out as the validation split.
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        lrs: The learning rates, a geometric grid, ascending (default: the half-decades
            :data:`HALF_DECADES`); every arm is trained at each.
        steps: SGD steps per unit (one arm at one rate).
        batch_size: Examples per mini-batch.
        hidden: Units per hidden layer of both nets.
        eval_every: Steps between validation measurements (and weight norms).
        within: The good range's tolerance: rates whose final validation accuracy is at most
            this far (a fraction, 0.02 = 2 pp) below the arm's best.

    Raises:
        ValueError: If a field is outside its range; the message names it.
    """

    dataset: str = "mnist1d-large"
    n_val: int = 5_000
    seeds: int = 5
    lrs: tuple[float, ...] = HALF_DECADES
    steps: int = 500
    batch_size: int = 60
    hidden: int = 100
    eval_every: int = 100
    within: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.lrs, (list, tuple)):
            object.__setattr__(self, "lrs", tuple(self.lrs))
        lrs_ok = isinstance(self.lrs, tuple) and all(_is_real(v) and v > 0 for v in self.lrs)
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("n_val", _is_int(self.n_val) and self.n_val >= 1, "an int >= 1"),
            ("seeds", _is_int(self.seeds) and self.seeds >= 1, "an int >= 1"),
            (
                "lrs",
                lrs_ok and _geometric(self.lrs),
                "an ascending geometric grid of >= 2 rates > 0",
            ),
            ("steps", _is_int(self.steps) and self.steps >= 1, "an int >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 2, "an int >= 2"),
            ("hidden", _is_int(self.hidden) and self.hidden >= 1, "an int >= 1"),
            ("eval_every", _is_int(self.eval_every) and self.eval_every >= 1, "an int >= 1"),
            ("within", _is_real(self.within) and 0 <= self.within < 1, "a fraction in [0, 1)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(
                    f"LearningRateConfig(): expected {name} {expected}, got {value!r}."
                )

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms, in report order: ``relu6/none``, ``relu6/bn``, ``sigmoid3/none``, ..."""
        return tuple(arm_name(net, norm) for net in NETS for norm in NORMS)

    @property
    def step_half_decades(self) -> float:
        """The grid's step in half-decades (1 for :data:`HALF_DECADES`)."""
        return 2 * math.log10(self.lrs[1] / self.lrs[0])


CONFIG_TYPE = LearningRateConfig

PRESETS: dict[str, LearningRateConfig] = {
    # Seconds, for tests and CI: scikit-learn's digits, 3 rates 2 decades apart, 20 steps.
    # Not meant to show anything.
    "tiny": LearningRateConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        lrs=(0.01, 1.0, 100.0),
        steps=20,
        hidden=16,
        eval_every=10,
    ),
    # 500 steps of 60 per unit (half an epoch of 55,000), 40 units per seed.
    "quick": LearningRateConfig(),
    # 2,000 steps of 60 per unit (about 2 epochs).
    "full": LearningRateConfig(steps=2_000, eval_every=250),
}


def prepare(config: LearningRateConfig) -> lab_data.Dataset:
    """Load the dataset with its validation split (once per run).

    Raises:
        ValueError: If the dataset has not 10 classes, or a mini-batch does not fit it.
    """
    dataset = lab_data.load_dataset(config.dataset).with_validation(config.n_val)
    if dataset.n_classes != round(1 / CHANCE):
        raise ValueError(
            f"learning_rate prepare(): expected a dataset of {round(1 / CHANCE)} classes, got "
            f"{dataset.n_classes}."
        )
    if config.batch_size > len(dataset.y_train):
        raise ValueError(
            f"LearningRateConfig(): expected batch_size <= {len(dataset.y_train)} (the training "
            f"set without its validation split), got {config.batch_size}."
        )
    return dataset


def plan(config: LearningRateConfig) -> list[Unit]:
    """A seed's units: every net, norm and rate, in that order."""
    return [
        Unit(
            name=f"{arm_name(net, norm)}/lr={lr:g}",
            steps=config.steps,
            params={"net": net, "norm": norm, "lr": lr},
        )
        for net in NETS
        for norm in NORMS
        for lr in config.lrs
    ]


def steps_per_seed(config: LearningRateConfig) -> int:
    """SGD steps per seed over all units, for the progress bar."""
    return sum(unit.steps for unit in plan(config))


# --- the measures -----------------------------------------------------------------------------


def largest_learning_rate(
    lrs: Sequence[float], val_accuracy: Sequence[float], diverged: Sequence[bool]
) -> float | None:
    """The largest rate whose run did not diverge and ended at least :data:`LEARNED_MARGIN`
    above chance in validation accuracy (``None`` if none did). Reported, not judged."""
    learned = [
        lr
        for lr, acc, bad in zip(lrs, val_accuracy, diverged, strict=True)
        if not bad and acc >= CHANCE + LEARNED_MARGIN
    ]
    return max(learned) if learned else None


def largest_stable_rate(lrs: Sequence[float], diverged: Sequence[bool]) -> float | None:
    """The largest rate whose run did not diverge (``None`` if every run diverged)."""
    stable = [lr for lr, bad in zip(lrs, diverged, strict=True) if not bad]
    return max(stable) if stable else None


def stable_gap(with_bn: float | None, without: float | None, lrs: Sequence[float]) -> float:
    """``2 log10(with_bn / without)``: the largest stable rates' distance in half-decades; an
    arm with no stable rate (``None``) counts one grid step below the grid."""
    below = lrs[0] ** 2 / lrs[1]
    a = below if with_bn is None else with_bn
    b = below if without is None else without
    return 2 * math.log10(a / b)


def best_index(val_accuracy: Sequence[float]) -> int:
    """The index of the highest final validation accuracy (the smaller rate on a tie)."""
    return int(np.argmax(np.asarray(val_accuracy, dtype=np.float64)))


def good_range(
    val_accuracy: Sequence[float], within: float, diverged: Sequence[bool] | None = None
) -> list[int]:
    """The indices of the stable rates (not ``diverged``) whose validation accuracy is at most
    ``within`` below the best (a small slack absorbs rounding: accuracies are counts over the
    split). A diverged run never counts, even where the arm learned nothing at any rate."""
    a = np.asarray(val_accuracy, dtype=np.float64)
    bad = np.zeros(len(a), dtype=bool) if diverged is None else np.asarray(diverged, dtype=bool)
    return [int(i) for i in np.nonzero((a >= a.max() - within - 1e-9) & ~bad)[0]]


def autotune_factor(start: Sequence[float | None], end: Sequence[float | None]) -> float | None:
    r"""The effective rate at the start over at the end, geometric mean over layers:
    :math:`\exp(\mathrm{mean}_l \, 2 \log(\lVert W_l^{end} \rVert / \lVert W_l^{0} \rVert))`;
    ``None`` if a norm is missing or zero."""
    given = list(zip(start, end, strict=True))
    pairs = [(a, b) for a, b in given if a is not None and b is not None]
    if not given or len(pairs) < len(given) or any(a <= 0 or b <= 0 for a, b in pairs):
        return None
    return float(math.exp(np.mean([2 * math.log(b / a) for a, b in pairs])))
