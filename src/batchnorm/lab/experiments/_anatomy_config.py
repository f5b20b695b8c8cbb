"""Settings of the anatomy experiment: its vocabulary, :class:`AnatomyConfig` and its
:data:`PRESETS`, and what the runner asks of the settings before any seed runs
(:func:`prepare`, :func:`steps_per_seed`). See :mod:`batchnorm.lab.experiments.anatomy`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import data as lab_data
from .._training import check_config
from ..protocol import tuned_value

__all__ = [
    "ACTIVATIONS",
    "CLAIM",
    "DEFAULT_LR",
    "GAUSSIAN_SHARE",
    "INIT_FOR",
    "PRESETS",
    "TITLE",
    "AnatomyConfig",
    "prepare",
    "steps_per_seed",
]

TITLE = "Anatomy of a BN layer: one trained hidden layer on one real batch, step by step"
CLAIM = "BN standardizes each unit over the batch; it does not make the values Gaussian"
# The two networks of a seed (also the tuning arms), in report order, and the standard
# initialization of each activation.
ACTIVATIONS = ("relu", "sigmoid")
INIT_FOR = {"relu": "he", "sigmoid": "glorot"}
# The learning rate of a network `batchnorm lab tune anatomy` has not tuned: the middle of the
# tuning grid.
DEFAULT_LR = 0.3
# P(|Z| <= 1) for a standard normal Z: erf(1 / sqrt(2)) = 0.6827.
GAUSSIAN_SHARE = math.erf(1.0 / math.sqrt(2.0))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AnatomyConfig:
    """Settings of the anatomy experiment.

    Args:
        dataset: One of :data:`batchnorm.lab.data.DATASETS`.
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        n_val: Training examples held out as the validation split (tuning reads it).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        steps: SGD steps per network.
        batch_size: Examples per training mini-batch.
        hidden: Units per hidden layer.
        depth: Hidden layers, each ``fc -> BN -> activation``.
        layer: The hidden layer (1-based) the ``gaussian`` rule and the figures look at.
        measure_batch: Training examples in the one batch that is measured.
        show_units: Units of ``layer`` whose values the histograms show (spread over the
            units ranked by skewness, least to most skewed).
        lrs: Learning rate per network (``"relu"``, ``"sigmoid"``); ``None`` reads the
            tuned file (:func:`batchnorm.lab.protocol.tuned_value`), else
            :data:`DEFAULT_LR`. Plain SGD, no momentum or weight decay.
        eval_every: Steps between validation measurements.
        smooth: Measurements in the trailing mean of the tuning score.
        threads: torch's and Numba's threads while training (restored afterwards); ``None``
            leaves them alone.

    Raises:
        ValueError: If a field is outside its range.
    """

    dataset: str = "mnist1d-large"
    data_dir: str | None = None
    n_val: int = 5_000
    seeds: int = 5
    steps: int = 3_000
    batch_size: int = 60
    hidden: int = 100
    depth: int = 3
    layer: int = 2
    measure_batch: int = 256
    show_units: int = 4
    lrs: dict[str, float] | None = None
    eval_every: int = 100
    smooth: int = 5
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        lrs = self.lrs
        if lrs is None:
            lrs = {a: tuned_value("anatomy", a, "lr", DEFAULT_LR) for a in ACTIVATIONS}
        lrs_ok = isinstance(lrs, dict) and set(lrs) == set(ACTIVATIONS)
        lrs_ok = lrs_ok and all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in lrs.values()
        )
        if lrs_ok:
            lrs = {a: float(lrs[a]) for a in ACTIVATIONS}
        object.__setattr__(self, "lrs", lrs)
        ints = ["n_val", "seeds", "steps", "batch_size", "hidden", "depth", "layer"]
        ints += ["measure_batch", "show_units", "eval_every", "smooth"]
        bad_type = [name for name in ints if not _is_int(getattr(self, name))]
        if bad_type:
            check_config("AnatomyConfig", [(bad_type[0], False, "an int")], self)
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("n_val", self.n_val >= 1, "an int >= 1"),
            ("seeds", self.seeds >= 1, "an int >= 1"),
            ("steps", self.steps >= 1, "an int >= 1"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("hidden", self.hidden >= 2, "an int >= 2"),
            ("depth", self.depth >= 1, "an int >= 1"),
            ("layer", 1 <= self.layer <= self.depth, f"an int in [1, {self.depth}] (depth)"),
            ("measure_batch", self.measure_batch >= 8, "an int >= 8"),
            (
                "show_units",
                1 <= self.show_units <= self.hidden,
                f"an int in [1, {self.hidden}] (hidden)",
            ),
            ("lrs", lrs_ok, f"a learning rate > 0 for each of {list(ACTIVATIONS)}"),
            ("eval_every", self.eval_every >= 1, "an int >= 1"),
            ("smooth", self.smooth >= 1, "an int >= 1"),
            ("threads", self.threads is None or self.threads >= 1, "an int >= 1 or None"),
        ]
        check_config("AnatomyConfig", checks, self)


PRESETS: dict[str, AnatomyConfig] = {
    # Seconds: for tests. Not meant to show anything.
    "tiny": AnatomyConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        steps=30,
        hidden=16,
        measure_batch=64,
        show_units=1,
        eval_every=10,
        smooth=2,
    ),
    # 3,000 steps of 60 (~3 epochs of the 55,000 training examples) per network.
    "quick": AnatomyConfig(steps=3_000),
    # 10,000 steps (~11 epochs).
    "full": AnatomyConfig(steps=10_000, eval_every=250),
}


def prepare(config: AnatomyConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run).

    Raises:
        ValueError: If a training or measured batch does not fit the training set.
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    dataset = dataset.with_validation(config.n_val)
    n_train = len(dataset.y_train)
    for name in ("batch_size", "measure_batch"):
        if getattr(config, name) > n_train:
            raise ValueError(
                f"AnatomyConfig(): expected {name} <= {n_train} (the {config.dataset} training "
                f"set without its validation split), got {getattr(config, name)}."
            )
    return dataset


def steps_per_seed(config: AnatomyConfig) -> int:
    """SGD steps per seed (each network trains ``steps``), for the progress bar."""
    return len(ACTIVATIONS) * config.steps
