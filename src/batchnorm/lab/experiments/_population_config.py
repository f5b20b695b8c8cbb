"""Settings of the population experiment: :class:`PopulationConfig`, its :data:`PRESETS`,
and what the runner asks of the settings before any seed runs (:func:`prepare` loads the
dataset with its validation split, :func:`steps_per_seed` sizes the progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import data as lab_data
from ..models import ACTIVATIONS
from ..protocol import tuned_value
from ._population_spec import LAG_BATCH_SIZE, NATIVE_MOMENTUM

__all__ = ["DEFAULT_LR", "PRESETS", "PopulationConfig", "prepare", "steps_per_seed"]

# The learning rate of a batch size that `batchnorm lab tune population` has not tuned: the
# middle of the tuning grid, so that an untuned run is neither the smallest nor the largest step.
DEFAULT_LR = 0.1
# Training examples of each dataset before the validation split, as batchnorm.lab.data states
# them. The number of SGD steps must follow from the config alone, because the runner checks a
# checkpoint's step against it; prepare() refuses data of another size.
_TRAIN_EXAMPLES = {"mnist1d": 4_000, "mnist1d-large": 60_000, "digits": 1_438, "mnist": 60_000}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PopulationConfig:
    """Settings of the population-statistics experiment.

    One network is trained per seed and batch size; the running averages of every momentum in
    ``momenta`` follow that one trajectory (BN's momentum never enters a training-mode forward,
    so it cannot change the trajectory).

    Args:
        dataset: One of :data:`batchnorm.lab.data.DATASETS`.
        data_dir: Directory with the MNIST IDX files (``dataset="mnist"`` only).
        n_val: Training examples held out as the validation split
            (:meth:`~batchnorm.lab.data.Dataset.with_validation`).
        seeds: Number of seeds; seeds ``0 .. seeds - 1`` are run.
        epochs: Passes over the training set per network (fractional allowed); a batch size
            ``b`` trains ``round(epochs * (n_train // b))`` SGD steps.
        batch_sizes: The training batch sizes, one network each; must include 60, the batch
            size the lag rule is declared for.
        momenta: The BN momenta whose running averages are followed, torch's meaning
            (``running = (1 - momentum) * running + momentum * batch``; the opposite of flax's
            decay); must include torch's default 0.1, which the rules compare with.
        lr: Learning rate of plain SGD (no momentum, no weight decay) for every batch size, or
            ``None``: each batch size ``b`` takes the value ``batchnorm lab tune population``
            chose for arm ``"b<b>"`` (:func:`batchnorm.lab.protocol.tuned_value`), else
            :data:`DEFAULT_LR`.
        early_fraction: The early measurement is taken after this share of each network's steps
            (at least one step, and before the last).
        activation: ``"relu"``, ``"sigmoid"`` or ``"tanh"`` after each BN layer.
        hidden: Units per hidden layer.
        depth: Hidden layers, each with one BN layer.
        checkpoint_every: SGD steps between checkpoints, counted over all batch sizes of a seed.
        threads: torch's and Numba's threads while training and measuring (both restored
            afterwards); ``None`` leaves them alone. 1 by default, for figure1's measured
            reason: these small matrix products gain nothing from a second thread, and
            spinning OpenMP threads collapse when another process holds a core.
        flush_denormals: Flush float32 denormals to zero while running (figure1's guard
            against the CPU's slow denormal path); restored to torch's default afterwards.

    Raises:
        ValueError: If a field is outside its range, 60 or 0.1 is missing from its tuple, or
            the largest batch size would train fewer than 2 steps.
    """

    dataset: str = "mnist1d-large"
    data_dir: str | None = None
    n_val: int = 5_000
    seeds: int = 5
    epochs: float = 10.0
    batch_sizes: tuple[int, ...] = (16, 60, 256)
    momenta: tuple[float, ...] = (0.01, 0.1, 0.5)
    lr: float | None = None
    early_fraction: float = 0.1
    activation: str = "relu"
    hidden: int = 100
    depth: int = 3
    checkpoint_every: int = 10_000
    threads: int | None = 1
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", str(self.data_dir))
        # JSON gives lists back; the config is hashable and compares as it was written.
        for name in ("batch_sizes", "momenta"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        sizes, momenta = self.batch_sizes, self.momenta
        sizes_ok = (
            isinstance(sizes, tuple)
            and len(sizes) >= 1
            and all(_is_int(b) and b >= 2 for b in sizes)
            and len(set(sizes)) == len(sizes)
        )
        momenta_ok = (
            isinstance(momenta, tuple)
            and len(momenta) >= 1
            and all(_is_real(m) and 0 < m <= 1 for m in momenta)
            and len(set(momenta)) == len(momenta)
        )
        every_ok = _is_int(self.checkpoint_every) and self.checkpoint_every >= 1
        threads_ok = self.threads is None or (_is_int(self.threads) and self.threads >= 1)
        checks = [
            ("dataset", self.dataset in _TRAIN_EXAMPLES, f"one of {list(_TRAIN_EXAMPLES)}"),
            ("n_val", _is_int(self.n_val) and self.n_val >= 1, "an int >= 1"),
            ("seeds", _is_int(self.seeds) and self.seeds >= 1, "an int >= 1"),
            ("epochs", _is_real(self.epochs) and self.epochs > 0, "a number > 0"),
            ("batch_sizes", sizes_ok, "distinct ints >= 2"),
            ("batch_sizes", sizes_ok and LAG_BATCH_SIZE in sizes, f"to include {LAG_BATCH_SIZE}"),
            ("momenta", momenta_ok, "distinct numbers in (0, 1]"),
            ("momenta", momenta_ok and NATIVE_MOMENTUM in momenta, f"to include {NATIVE_MOMENTUM}"),
            ("lr", self.lr is None or (_is_real(self.lr) and self.lr > 0), "a number > 0 or None"),
            ("early_fraction", 0 < self.early_fraction < 1, "in (0, 1)"),
            ("activation", self.activation in ACTIVATIONS, f"one of {list(ACTIVATIONS)}"),
            ("hidden", _is_int(self.hidden) and self.hidden >= 1, "an int >= 1"),
            ("depth", _is_int(self.depth) and self.depth >= 1, "an int >= 1"),
            ("checkpoint_every", every_ok, "an int >= 1"),
            ("threads", threads_ok, "an int >= 1 or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"PopulationConfig(): expected {name} {expected}, got {getattr(self, name)!r}."
                )
        if self.n_train < max(sizes):
            raise ValueError(
                f"PopulationConfig(): expected every batch size <= {self.n_train} (the "
                f"{self.dataset} training set less n_val={self.n_val}), got {max(sizes)}."
            )
        shortest = min(self.steps_for(b) for b in sizes)
        if shortest < 2:
            raise ValueError(
                f"PopulationConfig(): expected epochs long enough for 2 steps at every batch "
                f"size (an early and an end measurement), got {shortest} step at batch size "
                f"{max(sizes)} with epochs={self.epochs!r}."
            )

    @property
    def n_train(self) -> int:
        """Training examples left after the validation split."""
        return _TRAIN_EXAMPLES[self.dataset] - self.n_val

    def steps_for(self, batch_size: int) -> int:
        """SGD steps of the network trained with ``batch_size``: ``epochs`` drop-last epochs."""
        return round(self.epochs * (self.n_train // batch_size))

    def early_step(self, batch_size: int) -> int:
        """The step of that network's early measurement: ``early_fraction`` of its steps,
        rounded, at least 1 and before its last step."""
        steps = self.steps_for(batch_size)
        return max(1, min(steps - 1, round(self.early_fraction * steps)))

    def lr_for(self, batch_size: int) -> float:
        """The learning rate of the network trained with ``batch_size`` (see ``lr``)."""
        if self.lr is not None:
            return float(self.lr)
        return tuned_value("population", f"b{batch_size}", "lr", DEFAULT_LR)

    def offsets(self) -> list[int]:
        """Per batch size (in order), the seed's steps before its network starts training: the
        networks of one seed train one after the other, and the runner counts steps over all."""
        starts, total = [], 0
        for b in self.batch_sizes:
            starts.append(total)
            total += self.steps_for(b)
        return starts

    @property
    def steps(self) -> int:
        """SGD steps per seed, over all batch sizes; checkpoints are counted in these."""
        return sum(self.steps_for(b) for b in self.batch_sizes)


PRESETS: dict[str, PopulationConfig] = {
    # Seconds, for tests and CI: scikit-learn's digits, half an epoch per batch size (38, 10
    # and 2 steps). Not meant to show anything.
    "tiny": PopulationConfig(
        dataset="digits",
        n_val=200,
        seeds=2,
        epochs=0.5,
        lr=0.3,
        checkpoint_every=20,
    ),
    # MNIST-1D at MNIST's size, 5 seeds, 10 epochs per batch size (34,370, 9,160 and 2,140
    # steps). Measured: 164 s on 2 cores (the runner's 2 seed processes, 1 thread each).
    "quick": PopulationConfig(),
    # The same for 20 epochs, the length chosen in population's module docstring (68,740,
    # 18,320 and 4,280 steps). Measured: 298 s on 2 cores (2 seed processes, 1 thread each).
    "full": PopulationConfig(epochs=20.0),
}


def prepare(config: PopulationConfig) -> lab_data.Dataset:
    """Load the configured dataset with its validation split (once per run; every seed and
    batch size shares it).

    Raises:
        ValueError: If the dataset's training set is not the size the config assumes (e.g.
            MNIST files of another size).
    """
    dataset = lab_data.load_dataset(config.dataset, config.data_dir)
    expected = _TRAIN_EXAMPLES[config.dataset]
    if len(dataset.y_train) != expected:
        raise ValueError(
            f"population prepare(): expected {expected} training examples in {config.dataset!r} "
            f"(the number of SGD steps is computed from it), got {len(dataset.y_train)}."
        )
    return dataset.with_validation(config.n_val)


def steps_per_seed(config: PopulationConfig) -> int:
    """SGD steps per seed over all batch sizes, for the progress bar."""
    return config.steps
