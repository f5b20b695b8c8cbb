"""Settings of the regularization experiment: its vocabulary (the arms),
:class:`RegularizationConfig` and its :data:`PRESETS`, the seed's plan of units, and what the
runner asks of the settings before any seed runs (:func:`prepare`, :func:`steps_per_seed`).
See :mod:`batchnorm.lab.experiments.regularization` for the design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import data as lab_data
from .._training import check_config
from .._units import Unit
from ..protocol import tuned_value

__all__ = [
    "ARMS",
    "CLAIM",
    "DATASETS",
    "PRESETS",
    "TITLE",
    "UNTUNED_LR",
    "RegularizationConfig",
    "arm_model_options",
    "prepare",
    "steps_per_seed",
    "units",
]

TITLE = "Regularization: train/test gap and test accuracy with BN, dropout, both, and ghost BN"
CLAIM = (
    "BN regularizes (smaller train/test gap, better test accuracy) and reduces the need for dropout"
)
# The arms, in report order: no regularizer, dropout alone, BN alone, BN with dropout before the
# output layer only (Li et al. 2019), and ghost BN.
ARMS = ("none", "dropout", "bn", "bn+dropout", "ghost")
# Datasets small enough to over-fit with a 3x256 MLP in the budget.
DATASETS = ("mnist1d", "digits")
# The learning rate of an arm `batchnorm lab tune regularization` has not tuned: a common rate
# for a ReLU MLP with SGD momentum 0.9.
UNTUNED_LR = 0.03


def _default_lrs() -> dict[str, float]:
    return {arm: tuned_value("regularization", arm, "lr", UNTUNED_LR) for arm in ARMS}


def _is_int(value: object, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class RegularizationConfig:
    r"""Settings of the regularization experiment.

    Args:
        dataset: One of :data:`DATASETS`.
        n_val: Training examples held out as the validation split (tuning reads it).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        arm_steps: SGD steps of each arm; a multiple of ``eval_every``.
        batch_size: Examples per step.
        hidden: Units per hidden layer.
        depth: Hidden layers.
        dropout: Dropout probability of the ``dropout`` arm (after every hidden layer) and of
            the ``bn+dropout`` arm (after the last hidden layer only).
        virtual_batch_size: Examples per ghost batch of the ``ghost`` arm; a divisor of
            ``batch_size`` below it (at ``batch_size`` ghost BN is BN).
        momentum: SGD momentum of every arm.
        eval_every: Steps between measurements of the validation accuracy.
        smooth: Measurements averaged for the tuning score (the last ones).
        lrs: Learning rate per arm (:data:`ARMS`); ``None`` reads the tuned file
            (:func:`batchnorm.lab.protocol.tuned_value`, default :data:`UNTUNED_LR`).

    Raises:
        ValueError: If a field is outside its range; the message names the field.
    """

    dataset: str = "mnist1d"
    n_val: int = 500
    seeds: int = 5
    arm_steps: int = 2_500
    batch_size: int = 64
    hidden: int = 256
    depth: int = 3
    dropout: float = 0.5
    virtual_batch_size: int = 16
    momentum: float = 0.9
    eval_every: int = 100
    smooth: int = 5
    lrs: dict[str, float] | None = None

    def __post_init__(self) -> None:
        lrs = _default_lrs() if self.lrs is None else self.lrs
        if isinstance(lrs, dict):
            lrs = {k: float(v) if _is_real(v) else v for k, v in sorted(lrs.items())}
        object.__setattr__(self, "lrs", lrs)
        lrs_ok = (
            isinstance(self.lrs, dict)
            and set(self.lrs) == set(ARMS)
            and all(_is_real(v) and v > 0 for v in self.lrs.values())
        )
        every = self.eval_every if _is_int(self.eval_every) else 1
        batch = self.batch_size if _is_int(self.batch_size) else 0
        ghost_ok = (
            _is_int(self.virtual_batch_size, 2)
            and self.virtual_batch_size < batch
            and batch % self.virtual_batch_size == 0
        )
        checks = [
            ("dataset", self.dataset in DATASETS, f"one of {list(DATASETS)}"),
            ("n_val", _is_int(self.n_val), "an int >= 1"),
            ("seeds", _is_int(self.seeds), "an int >= 1"),
            ("eval_every", _is_int(self.eval_every), "an int >= 1"),
            (
                "arm_steps",
                _is_int(self.arm_steps) and self.arm_steps % every == 0,
                "a positive multiple of eval_every",
            ),
            ("batch_size", _is_int(self.batch_size, 4), "an int >= 4"),
            ("hidden", _is_int(self.hidden), "an int >= 1"),
            ("depth", _is_int(self.depth), "an int >= 1"),
            ("dropout", _is_real(self.dropout) and 0 < self.dropout < 1, "a number in (0, 1)"),
            (
                "virtual_batch_size",
                ghost_ok,
                f"an int >= 2 below batch_size ({self.batch_size!r}) that divides it",
            ),
            ("momentum", _is_real(self.momentum) and 0 <= self.momentum < 1, "a number in [0, 1)"),
            ("smooth", _is_int(self.smooth), "an int >= 1"),
            ("lrs", lrs_ok, f"a learning rate > 0 for each of {list(ARMS)}"),
        ]
        check_config("RegularizationConfig", checks, self)

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms trained per seed, in report order."""
        return ARMS

    @property
    def steps(self) -> int:
        """SGD steps per seed, over every arm (the progress bar's and checkpoints' count)."""
        return self.arm_steps * len(ARMS)

    def measured_steps(self) -> list[int]:
        """The steps each arm is measured at (step 0 included)."""
        return list(range(0, self.arm_steps + 1, self.eval_every))


def arm_model_options(config: RegularizationConfig, arm: str) -> dict[str, Any]:
    """The :func:`~batchnorm.lab.models.make_mlp` keyword arguments that make ``arm``.

    Raises:
        ValueError: If ``arm`` is not one of :data:`ARMS`.
    """
    options: dict[str, dict[str, Any]] = {
        "none": {"norm": "none"},
        "dropout": {"norm": "none", "dropout": config.dropout, "dropout_layers": "all"},
        "bn": {"norm": "batchnorm"},
        "bn+dropout": {"norm": "batchnorm", "dropout": config.dropout, "dropout_layers": "last"},
        "ghost": {
            "norm": "ghost",
            "norm_options": {"virtual_batch_size": config.virtual_batch_size},
        },
    }
    if arm not in options:
        raise ValueError(f"regularization: expected an arm among {list(ARMS)}, got {arm!r}.")
    return options[arm]


def units(config: RegularizationConfig) -> list[Unit]:
    """A seed's plan: one unit per arm, in :data:`ARMS` order."""
    assert config.lrs is not None  # filled in by __post_init__
    return [Unit(name=arm, steps=config.arm_steps, params={"lr": config.lrs[arm]}) for arm in ARMS]


PRESETS: dict[str, RegularizationConfig] = {
    # Seconds, for tests and CI: scikit-learn's digits, 30 steps per arm. Shows nothing.
    "tiny": RegularizationConfig(
        dataset="digits", n_val=200, seeds=2, arm_steps=30, hidden=64, eval_every=10, smooth=2
    ),
    # MNIST-1D's 4,000 training sequences less 500 for validation; 2,500 steps of 64 per arm
    # (~46 epochs). The preset the learning rates are tuned with. Measured on the tuning seed:
    # 3,000 steps took 26 CPU-s (5 arms, one thread), over the 25 s budget, hence 2,500.
    "quick": RegularizationConfig(),
    # 7,000 steps per arm (~128 epochs), measured every 200 steps.
    "full": RegularizationConfig(arm_steps=7_000, eval_every=200),
}


def prepare(config: RegularizationConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run).

    Raises:
        ValueError: If a mini-batch does not fit the training set.
    """
    dataset = lab_data.load_dataset(config.dataset).with_validation(config.n_val)
    n_train = len(dataset.y_train)
    if config.batch_size > n_train:
        raise ValueError(
            f"RegularizationConfig(): expected batch_size <= {n_train} (the {config.dataset} "
            f"training set without its validation split), got {config.batch_size}."
        )
    return dataset


def steps_per_seed(config: RegularizationConfig) -> int:
    """SGD steps per seed over every arm, for the progress bar."""
    return config.steps
