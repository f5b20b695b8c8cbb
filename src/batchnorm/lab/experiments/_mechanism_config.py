"""Settings of the mechanism experiment: its arms, :class:`MechanismConfig` and its
:data:`PRESETS`, and what the runner asks of the settings before any seed runs
(:func:`prepare`, :func:`steps_per_seed`). See :mod:`batchnorm.lab.experiments.mechanism` for
the design and the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

from .. import data as lab_data
from ..models import ACTIVATIONS, INITS
from ..protocol import tuned_value

__all__ = [
    "ARMS",
    "CLAIM",
    "NORM_OF_ARM",
    "PRESETS",
    "TITLE",
    "UNTUNED_LR",
    "MechanismConfig",
    "prepare",
    "probe_steps",
    "steps_per_seed",
]

TITLE = "Santurkar et al. (2018): does BN reduce internal covariate shift, or smooth the landscape?"
CLAIM = (
    "BN reduces internal covariate shift (Ioffe) / BN leaves it as large but makes the loss "
    "landscape smoother, and noisy BN trains as well (Santurkar)"
)
# The arms, in report order, and the make_mlp norm each one trains with.
ARMS = ("none", "bn", "noisy")
NORM_OF_ARM = {"none": "none", "bn": "batchnorm", "noisy": "noisy"}
# The learning rate of an arm the tuned file does not hold yet.
UNTUNED_LR = 0.1


@dataclass(frozen=True)
class MechanismConfig:
    r"""Settings of the mechanism experiment.

    Args:
        dataset: A name of :data:`batchnorm.lab.data.DATASETS` (not ``"mnist"``).
        n_val: Training examples held out as the validation split (tuning reads it).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        steps: SGD steps per arm.
        batch_size: Examples per mini-batch, and in the probe batch the measurements use.
        hidden: Units per hidden layer.
        depth: Hidden layers (``fc1 .. fc<depth>``; the output layer ``out`` is measured too).
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        init: ``"he"``, ``"glorot"`` or ``None`` (torch's default).
        strength: The noisy arm's noise strength :math:`s`
            (:class:`~batchnorm.lab.models.NoisyBatchNorm1d`).
        lrs: Learning rate per arm (``"none"``, ``"bn"``, ``"noisy"``); ``None`` reads the tuned
            file (:func:`batchnorm.lab.protocol.tuned_value`, :data:`UNTUNED_LR` if untuned).
        shift_lr: The step :math:`\eta` the earlier layers take in the covariate-shift
            measure, the same for every arm.
        etas: The step sizes along the gradient of the landscape measure, the same for every
            arm (ascending, each > 0).
        eval_every: Steps between validation measurements (and at step 0 and the last step).
        measure_every: Steps between the shift and landscape measurements (and at step 0).
        smooth: Measurements in the trailing mean of validation accuracy (the tuning score).

    Raises:
        ValueError: If a field is outside its range; the message names the field.
    """

    dataset: str = "mnist1d-large"
    n_val: int = 5_000
    seeds: int = 5
    steps: int = 3_000
    batch_size: int = 60
    hidden: int = 100
    depth: int = 6
    activation: str = "relu"
    init: str | None = "he"
    strength: float = 1.0
    lrs: dict[str, float] | None = None
    shift_lr: float = 0.1
    etas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    eval_every: int = 100
    measure_every: int = 100
    smooth: int = 5

    def __post_init__(self) -> None:
        etas_ok = isinstance(self.etas, (list, tuple))
        if etas_ok:
            object.__setattr__(self, "etas", tuple(float(e) for e in self.etas))
        if self.lrs is None:
            lrs = {arm: tuned_value("mechanism", arm, "lr", UNTUNED_LR) for arm in ARMS}
            object.__setattr__(self, "lrs", lrs)
        lrs_ok = False
        if isinstance(self.lrs, dict) and set(self.lrs) == set(ARMS):
            lrs_ok = all(_positive(v) for v in self.lrs.values())
            if lrs_ok:
                object.__setattr__(self, "lrs", {arm: float(self.lrs[arm]) for arm in ARMS})
        etas_ok = etas_ok and bool(self.etas) and all(_positive(e) for e in self.etas)
        etas_ok = etas_ok and list(self.etas) == sorted(set(self.etas))
        datasets = [d for d in lab_data.DATASETS if d != "mnist"]
        checks = [
            ("dataset", self.dataset in datasets, f"one of {datasets}"),
            ("n_val", _int(self.n_val) and self.n_val >= 1, "an int >= 1"),
            ("seeds", _int(self.seeds) and self.seeds >= 1, "an int >= 1"),
            ("steps", _int(self.steps) and self.steps >= 1, "an int >= 1"),
            ("batch_size", _int(self.batch_size) and self.batch_size >= 2, "an int >= 2"),
            ("hidden", _int(self.hidden) and self.hidden >= 1, "an int >= 1"),
            ("depth", _int(self.depth) and self.depth >= 2, "an int >= 2"),
            ("activation", self.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
            ("init", self.init in INITS, f"one of {list(INITS)}"),
            ("strength", _number(self.strength) and self.strength >= 0, "a number >= 0"),
            ("lrs", lrs_ok, f"a learning rate > 0 for each of {list(ARMS)} (or None)"),
            ("shift_lr", _positive(self.shift_lr), "a number > 0"),
            ("etas", etas_ok, "a non-empty ascending tuple of distinct numbers > 0"),
            ("eval_every", _int(self.eval_every) and self.eval_every >= 1, "an int >= 1"),
            ("measure_every", _int(self.measure_every) and self.measure_every >= 1, "an int >= 1"),
            ("smooth", _int(self.smooth) and self.smooth >= 1, "an int >= 1"),
        ]
        # The lab's config message (b.4); not _training.check_config, which also requires a
        # checkpoint_every field: this experiment checkpoints after each arm instead.
        for name, ok, expected in checks:
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"MechanismConfig(): expected {name} {expected}, got {value!r}.")

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms trained per seed, in report order."""
        return ARMS


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and value > 0


PRESETS: dict[str, MechanismConfig] = {
    # Seconds: for tests and CI. Not meant to show anything (fixed learning rates, 2 seeds).
    "tiny": MechanismConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        steps=24,
        batch_size=32,
        hidden=16,
        depth=3,
        lrs={"none": 0.1, "bn": 0.1, "noisy": 0.1},
        etas=(0.1, 0.4),
        eval_every=8,
        measure_every=12,
        smooth=2,
    ),
    # ~3.3 epochs of the 55,000 training sequences per arm; the preset the rates are tuned with.
    "quick": MechanismConfig(steps=3_000, eval_every=100, measure_every=100),
    # ~11 epochs per arm, at the rates tuned on the quick preset.
    "full": MechanismConfig(steps=10_000, eval_every=200, measure_every=250),
}


def probe_steps(config: MechanismConfig) -> list[int]:
    """The steps the shift and landscape are measured at: 0, then every ``measure_every``."""
    return list(range(0, config.steps + 1, config.measure_every))


def prepare(config: MechanismConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run).

    Raises:
        ValueError: If the validation split or a mini-batch does not fit the training set.
    """
    dataset = lab_data.load_dataset(config.dataset).with_validation(config.n_val)
    n_train = len(dataset.y_train)
    if config.batch_size > n_train:
        raise ValueError(
            f"MechanismConfig(): expected batch_size <= {n_train} (the {config.dataset} training "
            f"set without its validation split), got {config.batch_size}."
        )
    return dataset


def steps_per_seed(config: MechanismConfig) -> int:
    """SGD steps per seed (every arm trains ``steps``), for the progress bar."""
    return len(ARMS) * config.steps
