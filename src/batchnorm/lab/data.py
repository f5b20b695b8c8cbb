"""Offline datasets for the lab: MNIST-1D (generated), scikit-learn's digits, MNIST from IDX files.

Nothing here downloads anything.

- ``"mnist1d"`` (the default) is generated on the spot by the ``mnist1d`` package's
  ``make_dataset(get_dataset_args())``: 4,000 training and 1,000 test sequences of length 40,
  10 classes, standardised by the generator to mean 0 and std 1. It is hard enough for a small
  MLP (test accuracy well below 100 %) that the speed of training shows, which is what the
  paper's Figure 1 is about. The package's ``get_dataset`` (which downloads a pickle) is never
  called. Generating takes about 2 s.
- ``"mnist1d-large"``: the same generator with ``num_samples=75,000``: 60,000 training and
  15,000 test sequences, the size of MNIST, so that ~50 epochs are 50,000 steps of 60 as in the
  paper, and a network trained that long has not memorised its training set. Generating takes
  about 15 s; the arrays are cached in ``$BATCHNORM_CACHE`` (default
  ``~/.cache/batchnorm``), keyed by the generator's arguments.
- ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled to ``[0, 1]``,
  a fixed seeded 80/20 split. Too easy to separate BN from no-BN, but instant.
- ``"mnist"``: the real MNIST from the four IDX files (``train-images-idx3-ubyte`` and so on,
  optionally gzipped) in a directory you give; pixels scaled to ``[0, 1]``, images flattened
  to 784 values.

Every loader returns a :class:`Dataset` of float32 inputs ``(N, D)`` and int64 labels ``(N,)``.
:meth:`Dataset.with_validation` holds a fixed, seeded part of the training set out as the
validation split the lab tunes and judges speed on; the test set is only ever reported.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_path

__all__ = ["DATASETS", "Dataset", "cache_dir", "load_dataset", "read_idx", "write_idx"]

# name -> one-line description, for `batchnorm lab list` and error messages.
DATASETS = {
    "mnist1d": "MNIST-1D, made locally by mnist1d (4000 train / 1000 test, 40 values)",
    "mnist1d-large": "MNIST-1D with 75000 samples, cached (60000 train / 15000 test, 40 values)",
    "digits": "scikit-learn's 8x8 digits (1438 train / 359 test, 64 values)",
    "mnist": "MNIST from the four IDX files in --data-dir (60000 train / 10000 test, 784 values)",
}

# The IDX files of MNIST as distributed; each may also be gzipped (name + ".gz").
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) -> (NumPy kind, item size); stored big-endian.
_IDX_TYPES = {
    0x08: ("u", 1),
    0x09: ("i", 1),
    0x0B: ("i", 2),
    0x0C: ("i", 4),
    0x0D: ("f", 4),
    0x0E: ("f", 8),
}
_IDX_CODES = {kind_size: code for code, kind_size in _IDX_TYPES.items()}

# Share of scikit-learn's digits held out for testing, split by a fixed seeded permutation so
# that every seed of an experiment sees the same split.
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
# The validation split is one fixed permutation of the training set, whatever the run's seeds.
_VALIDATION_SPLIT_SEED = 7
# mnist1d-large: the generator's default arguments with this many samples (80 % for training).
_MNIST1D_LARGE_SAMPLES = 75_000


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory.

    Attributes:
        name: The dataset's name in :data:`DATASETS`.
        x_train: float32 tensor ``(N_train, D)``.
        y_train: int64 tensor ``(N_train,)`` of labels in ``[0, n_classes)``.
        x_test: float32 tensor ``(N_test, D)``.
        y_test: int64 tensor ``(N_test,)``.
        n_classes: Number of classes.
        x_val: float32 tensor ``(N_val, D)`` held out of the training set, or ``None``.
        y_val: int64 tensor ``(N_val,)``, or ``None``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def n_features(self) -> int:
        """Input values per example, ``D``."""
        return int(self.x_train.shape[1])

    def with_validation(self, n_val: int) -> Dataset:
        """This dataset with ``n_val`` training examples moved to a validation split.

        The split is one fixed seeded permutation (the same for every run and seed), so a
        value tuned on the validation split was never chosen by the test set.

        Raises:
            ValueError: If a split exists already, or ``n_val`` leaves fewer than 2 training
                examples.
        """
        n = len(self.y_train)
        if self.x_val is not None:
            raise ValueError(
                f"Dataset.with_validation(): expected a dataset without a validation split, "
                f"got {self.name!r} with {len(self.x_val)} validation examples."
            )
        if not 1 <= n_val <= n - 2:
            raise ValueError(
                f"Dataset.with_validation(): expected n_val in [1, {n - 2}] ({self.name!r} has "
                f"{n} training examples), got {n_val}."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_VALIDATION_SPLIT_SEED))
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        return replace(
            self,
            x_train=self.x_train[train],
            y_train=self.y_train[train],
            x_val=self.x_train[val],
            y_val=self.y_train[val],
        )

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split ``(x_val, y_val)``.

        Raises:
            ValueError: If the dataset has no validation split (see :meth:`with_validation`).
        """
        if self.x_val is None or self.y_val is None:
            raise ValueError(
                f"Dataset.validation(): expected a dataset with a validation split, got "
                f"{self.name!r} without one; call with_validation(n_val) first."
            )
        return self.x_val, self.y_val


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load one of the lab's datasets, offline.

    Args:
        name: One of :data:`DATASETS`: ``"mnist1d"``, ``"digits"`` or ``"mnist"``.
        data_dir: For ``"mnist"``, the directory holding the four IDX files; ignored otherwise.

    Returns:
        The dataset; the same name (and files) always gives the same tensors.

    Raises:
        ValueError: If ``name`` is unknown, or ``"mnist"`` is asked for without ``data_dir``.
        ModuleNotFoundError: If the package a dataset needs (mnist1d, scikit-learn) is missing.
        FileNotFoundError: If an MNIST IDX file is missing from ``data_dir``.
    """
    if name == "mnist1d":
        return _load_mnist1d()
    if name == "mnist1d-large":
        return _load_mnist1d(_MNIST1D_LARGE_SAMPLES)
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist(data_dir)
    raise ValueError(f"load_dataset(): expected name in {list(DATASETS)!r}, got {name!r}.")


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$BATCHNORM_CACHE`` or ``~/.cache/batchnorm``."""
    return Path(os.environ.get("BATCHNORM_CACHE") or Path.home() / ".cache" / "batchnorm")


def _load_mnist1d(num_samples: int | None = None) -> Dataset:
    try:
        # NOTE: importing mnist1d also imports scipy, requests and matplotlib.pyplot (its utils
        # module plots); none of them is used here, and nothing is downloaded.
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "load_dataset('mnist1d'): expected the mnist1d package to be installed, got "
            f'{err}. Install the lab extra: pip install "batchnorm[lab]" (or pip install '
            "mnist1d), or choose --dataset digits."
        ) from err
    # make_dataset seeds Python's and NumPy's global generators (seed 42 in its default
    # arguments) and draws from them; restore both so that loading data leaves the caller's
    # random state as it was.
    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = num_samples
    data = _cached(args, make_dataset) if num_samples is not None else _generate(args, make_dataset)
    return Dataset(
        name="mnist1d" if num_samples is None else "mnist1d-large",
        x_train=torch.as_tensor(np.asarray(data["x"], dtype=np.float32)),
        y_train=torch.as_tensor(np.asarray(data["y"], dtype=np.int64)),
        x_test=torch.as_tensor(np.asarray(data["x_test"], dtype=np.float32)),
        y_test=torch.as_tensor(np.asarray(data["y_test"], dtype=np.int64)),
        n_classes=10,
    )


def _generate(args: object, make_dataset: Callable[[object], dict]) -> dict:
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def _cached(args: object, make_dataset: Callable[[object], dict]) -> dict:
    """``make_dataset(args)`` through an ``.npz`` cache keyed by the arguments' hash.

    A damaged cache file is regenerated, never trusted: it is written atomically and read with
    its expected keys checked.
    """
    settings = {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (int, float, str))}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    keys = ("x", "y", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path) as stored:
                return {k: stored[k] for k in keys}
        except (OSError, KeyError, ValueError):
            pass  # regenerate below
    data = _generate(args, make_dataset)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Typed Any: numpy's stub would check the ** entries against savez's allow_pickle: bool.
        arrays: dict[str, Any] = {k: np.asarray(data[k]) for k in keys}
        np.savez(f, **arrays)
    return data


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "load_dataset('digits'): expected scikit-learn to be installed, got no module "
            "'sklearn'. Install the lab extra: pip install \"batchnorm[lab]\"."
        ) from err
    digits = load_digits()
    # Pixels are integers 0..16; [0, 1] keeps first-layer pre-activations O(1).
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = round(_DIGITS_TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], n_classes=10)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"load_dataset('mnist'): expected {stem} or {stem}.gz in {str(data_dir)!r}, got "
        f"neither. Put the four MNIST IDX files ({', '.join(MNIST_FILES.values())}, gzipped or "
        "not) in that directory, or choose --dataset mnist1d, which needs no files."
    )


def _load_mnist(data_dir: str | Path | None) -> Dataset:
    if data_dir is None:
        raise ValueError(
            "load_dataset('mnist'): expected data_dir, the directory with the four MNIST IDX "
            "files, got None. Pass --data-dir DIR."
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"load_dataset('mnist'): expected data_dir to be a directory, got {str(root)!r}, "
            "which does not exist or is not a directory."
        )
    arrays = {key: read_idx(_find_idx(root, stem)) for key, stem in MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"load_dataset('mnist'): expected {split} images of shape (N, H, W) and labels "
                f"of shape (N,), got {x.shape} and {y.shape}."
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            "load_dataset('mnist'): expected train and test images of one size, got "
            f"{arrays['x_train'].shape[1:]} and {arrays['x_test'].shape[1:]}."
        )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a.reshape(len(a), -1).astype(np.float32) / 255.0)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a.astype(np.int64))

    y_train, y_test = labels(arrays["y_train"]), labels(arrays["y_test"])
    return Dataset(
        name="mnist",
        x_train=images(arrays["x_train"]),
        y_train=y_train,
        x_test=images(arrays["x_test"]),
        y_test=y_test,
        n_classes=int(max(y_train.max(), y_test.max())) + 1,
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

    The format: two zero bytes, a type code (0x08 unsigned byte ... 0x0E float64), the number
    of dimensions, then each dimension as a big-endian uint32, then the values, big-endian,
    row-major.

    Args:
        path: The file.

    Returns:
        The array, in native byte order.

    Raises:
        ValueError: If the header is not an IDX header or the data are shorter or longer than
            the header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(
            f"read_idx(): expected an IDX header (0x00 0x00 <type code> <ndim>) in "
            f"{str(path)!r}, got {raw[:4]!r}."
        )
    kind, size = _IDX_TYPES[raw[2]]
    dtype, ndim = np.dtype(f">{kind}{size}"), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"read_idx(): expected {ndim} dimension sizes in the header of {str(path)!r}, "
            f"got a file of {len(raw)} bytes."
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"read_idx(): expected {expected} bytes of data for shape {shape} in "
            f"{str(path)!r}, got {len(raw) - header}."
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if the name ends in ``.gz``); see :func:`read_idx`.

    Used by the tests to make tiny MNIST-like files.

    Raises:
        TypeError: If the array's dtype has no IDX type code.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(
            f"write_idx(): expected a dtype among uint8, int8, int16, int32, float32, float64, "
            f"got {array.dtype}."
        )
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)
