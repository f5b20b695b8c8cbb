"""Settings and the measure of the initialization experiment: its claims' pass rules
:data:`RULES`, :class:`InitializationConfig` and its :data:`PRESETS`, the plan of a seed's
units, and :func:`spread`. See :mod:`batchnorm.lab.experiments.initialization` for the design.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import data as lab_data
from .._units import (
    Unit,
)
from ..protocol import Rule, tuned_value
from ._learning_rate_nets import (
    NETS,
    NORMS,
    arm_name,
)

TITLE = "Initial weight scale 0.01x-10x at a fixed learning rate, with and without BatchNorm"
CLAIM = "BN makes training resilient to the scale of the initial weights"
# Every dataset of the lab has 10 classes (prepare() checks): a diverged run counts as guessing.
CHANCE = 0.1
# The weight scales c (about half-decades, as the issue lists them); 1 is the standard init.
SCALES: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# The learning rate of an arm `batchnorm lab tune initialization` has not tuned: the middle of
# the tuning grid.
UNTUNED_LR = 0.1
_ANCHOR = "Ioffe & Szegedy 2015, Sec. 3.3 (BN makes training more resilient to the parameter scale)"


def _net_rules(net: str) -> tuple[Rule, ...]:
    return (
        Rule(
            key=f"spread_{net}",
            claim=f"BN narrows the spread of final accuracy over the weight scale c ({net})",
            anchor=_ANCHOR,
            measure=(
                "spread of final test accuracy over c (max - min, diverged = chance) without BN "
                "minus with BN"
            ),
            unit="pp",
            # 10 pp: a fifth of the distance between chance (10 %) and what these nets reach
            # in the quick budget (~60 %); far above the test set's noise (0.4 pp) and, since
            # every scale of a seed shares its draws and batches, above the seeds' noise, yet
            # well below the ~50 pp a no-BN net loses when one scale fails outright.
            threshold=10.0,
        ),
        Rule(
            key=f"flat_{net}",
            claim=(
                f"With BN, final accuracy is insensitive to the weight scale: spread over c "
                f"below 5 pp ({net})"
            ),
            anchor=f"{_ANCHOR}, as the claim is usually repeated",
            measure="minus the spread of final test accuracy over c with BN",
            unit="pp",
            # 5 pp: a tenth of the ~50 pp between chance and a trained net; a spread that
            # small would make the choice of c immaterial to a user. Judged as -spread > -5.
            threshold=-5.0,
        ),
    )


RULES: tuple[Rule, ...] = (*_net_rules("relu6"), *_net_rules("sigmoid3"))


# --- settings ---------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _arms() -> tuple[str, ...]:
    return tuple(arm_name(net, norm) for net in NETS for norm in NORMS)


@dataclass(frozen=True)
class InitializationConfig:
    """Settings of the initialization experiment.

    Args:
        dataset: One of :data:`batchnorm.lab.data.DATASETS`.
        n_val: Training examples held out as the validation split.
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        scales: The weight scales :math:`c`, ascending, including 1 (the standard init, where
            the rates are tuned).
        lrs: Learning rate per arm (``"relu6/bn"``, ...), the same at every scale; ``None``
            reads the tuned file (:func:`batchnorm.lab.protocol.tuned_value`), else
            :data:`UNTUNED_LR`.
        steps: SGD steps per unit (one arm at one scale).
        batch_size: Examples per mini-batch.
        hidden: Units per hidden layer of both nets.
        eval_every: Steps between validation measurements.

    Raises:
        ValueError: If a field is outside its range; the message names it.
    """

    dataset: str = "mnist1d-large"
    n_val: int = 5_000
    seeds: int = 5
    scales: tuple[float, ...] = SCALES
    lrs: dict[str, float] | None = None
    steps: int = 600
    batch_size: int = 60
    hidden: int = 100
    eval_every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.scales, (list, tuple)):
            object.__setattr__(self, "scales", tuple(self.scales))
        if self.lrs is None:
            lrs = {arm: tuned_value("initialization", arm, "lr", UNTUNED_LR) for arm in _arms()}
            object.__setattr__(self, "lrs", lrs)
        elif isinstance(self.lrs, Mapping):
            object.__setattr__(self, "lrs", {str(k): v for k, v in sorted(self.lrs.items())})
        scales_ok = isinstance(self.scales, tuple) and all(
            _is_real(c) and c > 0 for c in self.scales
        )
        scales_ok = scales_ok and list(self.scales) == sorted(set(self.scales))
        lrs_ok = (
            isinstance(self.lrs, dict)
            and set(self.lrs) == set(_arms())
            and all(_is_real(v) and v > 0 for v in self.lrs.values())
        )
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("n_val", _is_int(self.n_val) and self.n_val >= 1, "an int >= 1"),
            ("seeds", _is_int(self.seeds) and self.seeds >= 1, "an int >= 1"),
            ("scales", scales_ok, "distinct numbers > 0, ascending"),
            ("scales", scales_ok and 1.0 in self.scales, "to include 1 (the standard init)"),
            ("lrs", lrs_ok, f"a learning rate > 0 for each of {sorted(_arms())}"),
            ("steps", _is_int(self.steps) and self.steps >= 1, "an int >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 2, "an int >= 2"),
            ("hidden", _is_int(self.hidden) and self.hidden >= 1, "an int >= 1"),
            ("eval_every", _is_int(self.eval_every) and self.eval_every >= 1, "an int >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(
                    f"InitializationConfig(): expected {name} {expected}, got {value!r}."
                )

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms, in report order: ``relu6/none``, ``relu6/bn``, ``sigmoid3/none``, ..."""
        return _arms()


CONFIG_TYPE = InitializationConfig

PRESETS: dict[str, InitializationConfig] = {
    # Seconds, for tests and CI: scikit-learn's digits, 3 scales, 20 steps, a fixed rate.
    # Not meant to show anything.
    "tiny": InitializationConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        scales=(0.1, 1.0, 10.0),
        lrs=dict.fromkeys(_arms(), 0.3),
        steps=20,
        hidden=16,
        eval_every=10,
    ),
    # 600 steps of 60 per unit (about 2/3 of an epoch of 55,000), 28 units per seed; the
    # rates are tuned with this preset.
    "quick": InitializationConfig(),
    # 2,400 steps of 60 per unit (about 2.6 epochs), at the rates tuned with quick.
    "full": InitializationConfig(steps=2_400, eval_every=300),
}


def prepare(config: InitializationConfig) -> lab_data.Dataset:
    """Load the dataset with its validation split (once per run).

    Raises:
        ValueError: If the dataset has not 10 classes, or a mini-batch does not fit it.
    """
    dataset = lab_data.load_dataset(config.dataset).with_validation(config.n_val)
    if dataset.n_classes != round(1 / CHANCE):
        raise ValueError(
            f"initialization prepare(): expected a dataset of {round(1 / CHANCE)} classes, got "
            f"{dataset.n_classes}."
        )
    if config.batch_size > len(dataset.y_train):
        raise ValueError(
            f"InitializationConfig(): expected batch_size <= {len(dataset.y_train)} (the "
            f"training set without its validation split), got {config.batch_size}."
        )
    return dataset


def plan(config: InitializationConfig) -> list[Unit]:
    """A seed's units: every net, norm and scale, in that order."""
    return [
        Unit(
            name=f"{arm_name(net, norm)}/c={c:g}",
            steps=config.steps,
            params={"net": net, "norm": norm, "scale": c},
        )
        for net in NETS
        for norm in NORMS
        for c in config.scales
    ]


def steps_per_seed(config: InitializationConfig) -> int:
    """SGD steps per seed over all units, for the progress bar."""
    return sum(unit.steps for unit in plan(config))


# --- the measure and the verdict --------------------------------------------------------------


def spread(accuracies: Sequence[float]) -> float:
    """The largest minus the smallest accuracy, in percentage points (diverged runs are
    expected to enter as chance)."""
    return 100.0 * (max(accuracies) - min(accuracies))
