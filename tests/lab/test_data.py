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
    with pytest.raises(ValueError, match=r"expected name in \['mnist1d', 'digits', 'mnist'\]"):
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
