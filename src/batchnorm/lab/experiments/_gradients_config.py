"""Settings of the gradients experiment: its vocabulary, :class:`GradientsConfig` and its
:data:`PRESETS`, and what the runner asks of the settings before any seed runs
(:func:`prepare`, :func:`steps_per_seed`). See :mod:`batchnorm.lab.experiments.gradients`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import data as lab_data
from .._training import check_config
from ..protocol import tuned_value

__all__ = [
    "ACTIVATIONS",
    "ARMS",
    "CLAIM",
    "DEFAULT_LR",
    "INIT_FOR",
    "NORMS",
    "PRESETS",
    "TITLE",
    "GradientsConfig",
    "arm_name",
    "prepare",
    "steps_per_seed",
]

TITLE = "Per-layer gradient norms of deep MLPs with and without BN, at init and in training"
CLAIM = (
    "BN helps against vanishing/exploding gradients (Ioffe & Szegedy) vs BN causes exploding "
    "gradients at init (Yang et al.)"
)
ACTIVATIONS = ("sigmoid", "relu")
NORMS = ("none", "batchnorm")
# The standard initialization of each activation: Glorot for sigmoid, He for ReLU.
INIT_FOR = {"sigmoid": "glorot", "relu": "he"}
# The learning rate of a training arm `batchnorm lab tune gradients` has not tuned: the middle
# of the tuning grid.
DEFAULT_LR = 0.1


def arm_name(activation: str, norm: str) -> str:
    """One network kind: ``"relu/batchnorm"``, ``"sigmoid/none"``."""
    return f"{activation}/{norm}"


ARMS = tuple(arm_name(a, n) for a in ACTIVATIONS for n in NORMS)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _distinct_ints(values: tuple, low: int) -> bool:
    return (
        len(values) > 0
        and all(_is_int(v) and v >= low for v in values)
        and len(set(values)) == len(values)
    )


@dataclass(frozen=True)
class GradientsConfig:
    """Settings of the gradients experiment.

    Args:
        dataset: One of :data:`batchnorm.lab.data.DATASETS`.
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        n_val: Training examples held out as the validation split (tuning reads it).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        depths: Hidden layers of the networks measured at initialization (ascending, each
            >= 4 so the growth fit has two interior layers or more); the rules read the
            deepest.
        width: Units per hidden layer at initialization.
        batch_sizes: Batch sizes at initialization (ascending); Yang's rule reads the largest.
        train_depth: Hidden layers of the trained networks.
        train_width: Units per hidden layer of the trained networks.
        train_steps: SGD steps per trained network.
        train_batch: Examples per training mini-batch.
        record_every: Updates between records of the training gradient's per-layer norms
            (update 0, the initial weights, and the last step are recorded too).
        eval_every: Steps between validation measurements of the trained networks.
        smooth: Measurements in the trailing mean of the tuning score.
        lrs: Learning rate per training arm (``"relu/batchnorm"``, ...); ``None`` reads the
            tuned file (:func:`batchnorm.lab.protocol.tuned_value`), else
            :data:`DEFAULT_LR`. Plain SGD, no momentum or weight decay.
        threads: torch's and Numba's threads (restored afterwards); ``None`` leaves them.

    Raises:
        ValueError: If a field is outside its range.
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    n_val: int = 1_000
    seeds: int = 5
    depths: tuple[int, ...] = (10, 30, 50)
    width: int = 256
    batch_sizes: tuple[int, ...] = (16, 64, 256)
    train_depth: int = 20
    train_width: int = 128
    train_steps: int = 1_000
    train_batch: int = 60
    record_every: int = 10
    eval_every: int = 50
    smooth: int = 5
    lrs: dict[str, float] | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        for name in ("depths", "batch_sizes"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        lrs = self.lrs
        if lrs is None:
            lrs = {arm: tuned_value("gradients", arm, "lr", DEFAULT_LR) for arm in ARMS}
        lrs_ok = isinstance(lrs, dict) and set(lrs) == set(ARMS)
        lrs_ok = lrs_ok and all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in lrs.values()
        )
        if lrs_ok:
            lrs = {arm: float(lrs[arm]) for arm in ARMS}
        object.__setattr__(self, "lrs", lrs)
        ints = ["n_val", "seeds", "width", "train_depth", "train_width", "train_steps"]
        ints += ["train_batch", "record_every", "eval_every", "smooth"]
        bad_type = [name for name in ints if not _is_int(getattr(self, name))]
        if bad_type:
            check_config("GradientsConfig", [(bad_type[0], False, "an int")], self)
        depths_ok = isinstance(self.depths, tuple) and _distinct_ints(self.depths, 4)
        depths_ok = depths_ok and list(self.depths) == sorted(self.depths)
        sizes_ok = isinstance(self.batch_sizes, tuple) and _distinct_ints(self.batch_sizes, 2)
        sizes_ok = sizes_ok and list(self.batch_sizes) == sorted(self.batch_sizes)
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("n_val", self.n_val >= 1, "an int >= 1"),
            ("seeds", self.seeds >= 1, "an int >= 1"),
            ("depths", depths_ok, "distinct ints >= 4 in ascending order"),
            ("width", self.width >= 2, "an int >= 2"),
            ("batch_sizes", sizes_ok, "distinct ints >= 2 in ascending order"),
            ("train_depth", self.train_depth >= 1, "an int >= 1"),
            ("train_width", self.train_width >= 2, "an int >= 2"),
            ("train_steps", self.train_steps >= 2, "an int >= 2"),
            ("train_batch", self.train_batch >= 2, "an int >= 2"),
            ("record_every", self.record_every >= 1, "an int >= 1"),
            ("eval_every", self.eval_every >= 1, "an int >= 1"),
            ("smooth", self.smooth >= 1, "an int >= 1"),
            ("lrs", lrs_ok, f"a learning rate > 0 for each of {list(ARMS)}"),
            ("threads", self.threads is None or self.threads >= 1, "an int >= 1 or None"),
        ]
        check_config("GradientsConfig", checks, self)

    def record_updates(self) -> list[int]:
        """The updates (SGD steps done before the gradient) whose gradient norms a training
        arm records: ``0, record_every, ...`` and the last step's (``train_steps - 1``)."""
        updates = list(range(0, self.train_steps, self.record_every))
        if updates[-1] != self.train_steps - 1:
            updates.append(self.train_steps - 1)
        return updates


PRESETS: dict[str, GradientsConfig] = {
    # Seconds: for tests. Not meant to show anything.
    "tiny": GradientsConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        depths=(4, 6),
        width=16,
        batch_sizes=(8, 32),
        train_depth=4,
        train_width=16,
        train_steps=20,
        record_every=5,
        eval_every=10,
        smooth=2,
    ),
    # MNIST-1D's 4,000 training sequences (1,000 held out): the measurements need batches and
    # a short training, not a large dataset, and evaluating a 20-layer network on
    # mnist1d-large's 55,000 training examples would cost more than its training.
    "quick": GradientsConfig(train_steps=1_000),
    # The same measurements with three times the training.
    "full": GradientsConfig(train_steps=3_000, eval_every=100),
}


def prepare(config: GradientsConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run).

    Raises:
        ValueError: If a batch does not fit the training set.
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    dataset = dataset.with_validation(config.n_val)
    n_train = len(dataset.y_train)
    for name, value in (
        ("batch_sizes", max(config.batch_sizes)),
        ("train_batch", config.train_batch),
    ):
        if value > n_train:
            raise ValueError(
                f"GradientsConfig(): expected {name} <= {n_train} (the {config.dataset} "
                f"training set without its validation split), got {value}."
            )
    return dataset


def steps_per_seed(config: GradientsConfig) -> int:
    """Progress steps per seed: one per measurement at initialization, and each training
    arm's SGD steps."""
    n_init = len(config.depths) * len(config.batch_sizes) * len(ARMS)
    return n_init + len(ARMS) * config.train_steps
