"""Dataset loaders: IDX files the tests write, MNIST-1D generated locally, digits, clear errors."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from batchnorm.lab import data
from batchnorm.lab.data import MNIST_FILES, load_dataset, read_idx, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    path = tmp_path / f"a-idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_read_idx_parses_a_header_written_by_hand(tmp_path):
    # Magic 0x00000801 (unsigned bytes, 1 dim), size 3, then the bytes 7, 8, 9.
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 8, 9])


def test_read_idx_rejects_bad_header_and_short_data(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="expected an IDX header"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"expected 5 bytes of data for shape \(5,\).*got 2"):
        read_idx(short)


def write_tiny_mnist(directory, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(2, 4, 3), dtype=np.uint8),
        "y_test": np.array([5, 6], dtype=np.uint8),
    }
    for key, stem in MNIST_FILES.items():
        write_idx(directory / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_load_mnist_from_idx_files(tmp_path, gz):
    arrays = write_tiny_mnist(tmp_path, gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (6, 12) and ds.x_test.shape == (2, 12)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.n_classes == 10 and ds.n_features == 12
    want = arrays["x_train"].reshape(6, 12).astype(np.float32) / 255.0
    np.testing.assert_array_equal(ds.x_train.numpy(), want)
    assert ds.y_test.tolist() == [5, 6]


def test_load_mnist_names_the_missing_file(tmp_path):
    write_tiny_mnist(tmp_path, gz=False)
    (tmp_path / MNIST_FILES["y_test"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte or .*\.gz.*four MNIST"):
        load_dataset("mnist", tmp_path)


def test_load_mnist_without_data_dir_says_pass_data_dir():
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("mnist")


def test_load_mnist_with_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nope")


def test_load_dataset_rejects_unknown_name():
    names = r"\['mnist1d', 'mnist1d-large', 'digits', 'mnist'\]"
    with pytest.raises(ValueError, match=rf"expected name in {names}"):
        load_dataset("cifar10")


def test_load_digits_fixed_split():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert len(a.y_train) + len(a.y_test) == 1797 and a.n_features == 64
    assert torch.equal(a.x_test, b.x_test)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0


def test_load_mnist1d_generates_locally_and_keeps_global_rng_state(monkeypatch):
    pytest.importorskip("mnist1d")
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    py_before, np_before = random.getstate(), np.random.get_state()  # noqa: NPY002
    ds = load_dataset("mnist1d")
    assert random.getstate() == py_before
    np_after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(np_after[1], np_before[1]) and np_after[2] == np_before[2]
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.n_classes == 10 and set(ds.y_train.tolist()) == set(range(10))
    # The generator standardises the whole set to mean 0, std 1.
    x = torch.cat([ds.x_train, ds.x_test]).double()
    assert abs(x.mean().item()) < 1e-6 and abs(x.std(unbiased=False).item() - 1) < 1e-5


def test_load_mnist1d_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "batchnorm\[lab\]"'):
        data.load_dataset("mnist1d")


def test_with_validation_holds_out_a_fixed_disjoint_split():
    full = data.load_dataset("digits")
    split = full.with_validation(300)
    assert len(split.y_val) == 300 and len(split.y_train) == len(full.y_train) - 300
    # Every training row lands in exactly one part: the parts are a partition of the rows.
    rows = {tuple(r.tolist()) + (int(y),) for r, y in zip(full.x_train, full.y_train, strict=True)}
    parts = [(split.x_train, split.y_train), (split.x_val, split.y_val)]
    seen = [tuple(r.tolist()) + (int(y),) for x, ys in parts for r, y in zip(x, ys, strict=True)]
    assert len(seen) == len(full.y_train) and set(seen) == rows
    again = full.with_validation(300)
    assert torch.equal(again.x_val, split.x_val)  # fixed, whatever the caller's seeds
    assert torch.equal(split.x_test, full.x_test)


def test_with_validation_rejects_bad_sizes_and_a_second_split():
    full = data.load_dataset("digits")
    n = len(full.y_train)
    with pytest.raises(ValueError, match=rf"expected n_val in \[1, {n - 2}\]"):
        full.with_validation(n)
    with pytest.raises(ValueError, match="expected a dataset without a validation split"):
        full.with_validation(10).with_validation(10)


def test_generated_data_is_cached_and_a_damaged_cache_is_regenerated(tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path))
    calls = []

    def make(args):
        calls.append(args.num_samples)
        rng = np.random.default_rng(0)
        return {
            "x": rng.normal(size=(8, 3)),
            "y": np.arange(8),
            "x_test": rng.normal(size=(2, 3)),
            "y_test": np.arange(2),
        }

    args = SimpleNamespace(num_samples=10, seed=42)
    first = data._cached(args, make)
    second = data._cached(args, make)
    assert calls == [10] and np.array_equal(first["x"], second["x"])
    (path,) = tmp_path.glob("mnist1d-*.npz")
    path.write_bytes(b"not an npz")
    third = data._cached(args, make)
    assert calls == [10, 10] and np.array_equal(third["x"], first["x"])
    other = data._cached(SimpleNamespace(num_samples=11, seed=42), make)
    assert calls == [10, 10, 11] and len(list(tmp_path.glob("mnist1d-*.npz"))) == 2
    assert other["x"].shape == (8, 3)
