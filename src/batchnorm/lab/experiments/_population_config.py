"""Settings of the population experiment: :class:`PopulationConfig`, its :data:`PRESETS`,
and what the runner asks of the settings before any seed runs (:func:`prepare` loads the
dataset, :func:`steps_per_seed` sizes the progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import data as lab_data
from .._training import check_config
from ..models import ACTIVATIONS

__all__ = ["PRESETS", "PopulationConfig", "prepare", "steps_per_seed"]


@dataclass(frozen=True)
class PopulationConfig:
    """Settings of the population-statistics experiment.

    Args:
        dataset: ``"mnist1d"``, ``"digits"`` or ``"mnist"`` (see :mod:`batchnorm.lab.data`).
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        steps: SGD steps per seed.
        batch_size: Examples per training mini-batch (the paper: 60).
        lr: Learning rate of plain SGD (no momentum, no weight decay).
        momentum: torch's BN momentum, the weight of the newest batch in the running averages
            (``running = (1 - momentum) * running + momentum * batch``; the opposite of
            flax's decay); ``None`` is torch's cumulative average over all batches.
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"`` after each BN layer.
        hidden: Units per hidden layer.
        depth: Hidden layers, each with one BN layer.
        eval_every: Steps between measurements.
        checkpoint_every: Steps between checkpoints; a multiple of ``eval_every``.
        stats_batch_size: Examples per batch of the exact passes; ``None`` means ``batch_size``,
            so that the paper's estimator uses the paper's :math:`m`.
        threads: torch's and Numba's threads while training and measuring (both restored
            afterwards); ``None`` leaves them alone. 1 by default, for figure1's measured
            reason: these small matrix products gain nothing from a second thread, and
            spinning OpenMP threads collapse when another process holds a core.
        flush_denormals: Flush float32 denormals to zero while running (figure1's guard
            against the CPU's slow denormal path); restored to torch's default afterwards.

    Raises:
        ValueError: If a field is outside its range or ``checkpoint_every`` is not a multiple
            of ``eval_every``.
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    seeds: int = 5
    steps: int = 3_000
    batch_size: int = 60
    lr: float = 0.5
    momentum: float | None = 0.1
    activation: str = "relu"
    hidden: int = 100
    depth: int = 3
    eval_every: int = 50
    checkpoint_every: int = 1_000
    stats_batch_size: int | None = None
    threads: int | None = 1
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        momentum_ok = self.momentum is None or 0 < self.momentum <= 1
        stats_ok = self.stats_batch_size is None or self.stats_batch_size >= 2
        checks = [
            ("dataset", self.dataset in lab_data.DATASETS, f"one of {list(lab_data.DATASETS)}"),
            ("seeds", self.seeds >= 1, "an int >= 1"),
            ("steps", self.steps >= 1, "an int >= 1"),
            ("batch_size", self.batch_size >= 2, "an int >= 2"),
            ("lr", self.lr > 0, "a float > 0"),
            ("momentum", momentum_ok, "a float in (0, 1] or None"),
            ("activation", self.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
            ("hidden", self.hidden >= 1, "an int >= 1"),
            ("depth", self.depth >= 1, "an int >= 1"),
            ("eval_every", self.eval_every >= 1, "an int >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "an int >= 1"),
            ("stats_batch_size", stats_ok, "an int >= 2 or None"),
            ("threads", self.threads is None or self.threads >= 1, "an int >= 1 or None"),
        ]
        check_config("PopulationConfig", checks, self)

    @property
    def pass_batch_size(self) -> int:
        """Examples per batch of the exact passes: ``stats_batch_size`` or ``batch_size``."""
        return self.batch_size if self.stats_batch_size is None else self.stats_batch_size


PRESETS: dict[str, PopulationConfig] = {
    # Seconds: for tests and smoke runs. Not meant to show anything.
    "tiny": PopulationConfig(
        dataset="digits", seeds=2, steps=40, eval_every=10, checkpoint_every=20
    ),
    # The defaults; 79 s on 2 shared cores, measured (see population's module docstring).
    "quick": PopulationConfig(),
    # Ten times longer, measured as often: the end of training is then a settled network.
    "long": PopulationConfig(steps=30_000, eval_every=500, checkpoint_every=5_000),
}


def prepare(config: PopulationConfig) -> lab_data.Dataset:
    """Load the configured dataset (once per run; every seed shares it).

    Raises:
        ValueError: If a mini-batch or a batch of the exact passes is larger than the training
            set.
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    n_train = len(dataset.y_train)
    for name, value in (
        ("batch_size", config.batch_size),
        ("stats_batch_size", config.pass_batch_size),
    ):
        if value > n_train:
            raise ValueError(
                f"PopulationConfig(): expected {name} <= {n_train} (the {config.dataset} "
                f"training set), got {value}."
            )
    return dataset


def steps_per_seed(config: PopulationConfig) -> int:
    """SGD steps per seed, for the progress bar."""
    return config.steps
