"""The ghost batch norm kernels (kernels/grouped.py) against reference.py run on each chunk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.kernels import (
    GROUPED_KERNELS,
    ghost_backward_nchw,
    ghost_train_nchw,
    select_kernel,
)
from conftest import TOL

DTYPES = [np.float32, np.float64]
NP_TOL = {np.float32: TOL[torch.float32], np.float64: TOL[torch.float64]}
EPS = 1e-5

# (N, C, S, size): exact chunks, a shorter last chunk, a longer last chunk (a merged remainder),
# S == 1 (the channels-last twin), C == 1, one sample per chunk with spatial extent, and rows
# longer than a block (BLOCK_ELEMS).
CASES = [
    (12, 3, 5, 4),
    (10, 3, 5, 4),
    (9, 3, 5, 4),
    (12, 4, 1, 4),
    (9, 4, 1, 4),
    (7, 1, 6, 2),
    (3, 2, 5, 1),
    (8, 2, 4100, 3),
]


def _chunks(n, size, groups):
    return [(g * size, n if g == groups - 1 else (g + 1) * size) for g in range(groups)]


def _make(shape, dtype, seed, affine=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3.0 - 1.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    weight = (rng.random(c) + 0.5).astype(dtype) if affine else np.empty(0, dtype)
    bias = rng.standard_normal(c).astype(dtype) if affine else np.empty(0, dtype)
    return x, dy, weight, bias


def _run(x, dy, weight, bias, size, groups):
    c = x.shape[1]
    y = np.empty_like(x)
    mean, var = np.empty((groups, c)), np.empty((groups, c))
    merged_mean, merged_m2 = np.empty(c), np.empty(c)
    ghost_train_nchw(x, size, weight, bias, EPS, y, mean, var, merged_mean, merged_m2)
    dx = np.empty_like(x)
    dweight, dbias = np.empty(c, x.dtype), np.empty(c, x.dtype)
    ghost_backward_nchw(dy, x, size, mean, var, weight, EPS, dx, dweight, dbias)
    return y, mean, var, merged_mean, merged_m2, dx, dweight, dbias


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    ("n", "c", "s", "size"), CASES, ids=[f"{n}x{c}x{s}-size{v}" for n, c, s, v in CASES]
)
def test_ghost_kernels_match_reference_per_chunk(n, c, s, size, dtype, affine):
    groups = n // size if n % size == 1 else -(-n // size)
    x, dy, weight, bias = _make((n, c, s), dtype, seed=n * 31 + s, affine=affine)
    y, mean, var, merged_mean, merged_m2, dx, dweight, dbias = _run(
        x, dy, weight, bias, size, groups
    )
    gamma = weight.astype(np.float64) if affine else None
    beta = bias.astype(np.float64) if affine else None
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    tol = NP_TOL[dtype]
    want_dw, want_db = np.zeros(c), np.zeros(c)
    for g, (n0, n1) in enumerate(_chunks(n, size, groups)):
        want_y, mu, sigma2 = reference.batch_norm_train(x64[n0:n1], gamma, beta, EPS)
        want_dx, dgamma, dbeta = reference.batch_norm_train_backward(
            dy64[n0:n1], x64[n0:n1], gamma, EPS
        )
        np.testing.assert_allclose(y[n0:n1], want_y, **tol)
        np.testing.assert_allclose(dx[n0:n1], want_dx, **tol)
        np.testing.assert_allclose(mean[g], mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var[g], sigma2, rtol=1e-12, atol=1e-12)
        want_dw += dgamma
        want_db += dbeta
    np.testing.assert_allclose(dweight, want_dw, **tol)
    np.testing.assert_allclose(dbias, want_db, **tol)
    # The chunks' moments merged are the whole batch's.
    np.testing.assert_allclose(merged_mean, x64.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged_m2 / (n * s), x64.var(axis=(0, 2)), rtol=1e-11, atol=1e-12)
    assert y.dtype == dx.dtype == dweight.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_ghost_kernels_keep_a_small_spread_about_a_large_mean(dtype):
    # The library's accuracy promise: a mean of 1e4 with spread 1e-2 keeps its variance, per
    # chunk and merged.
    rng = np.random.default_rng(7)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 3, 300))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ones, zeros = np.ones(3, dtype), np.zeros(3, dtype)
    _, mean, var, merged_mean, merged_m2, *_ = _run(x, dy, ones, zeros, 4, 4)
    x64 = x.astype(np.float64)
    for g in range(4):
        chunk = x64[4 * g : 4 * g + 4]
        centred = chunk - chunk.mean(axis=(0, 2), keepdims=True)
        np.testing.assert_allclose(var[g], (centred**2).mean(axis=(0, 2)), rtol=1e-9)
    centred = x64 - x64.mean(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(merged_m2, (centred**2).sum(axis=(0, 2)), rtol=1e-9)
    np.testing.assert_allclose(merged_mean, x64.mean(axis=(0, 2)), rtol=1e-14)


def test_ghost_kernels_are_deterministic_across_thread_counts():
    import numba

    x, dy, weight, bias = _make((24, 5, 70), np.float32, seed=3)
    first = _run(x, dy, weight, bias, 8, 3)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        second = _run(x, dy, weight, bias, 8, 3)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)


def test_ghost_kernels_are_registered_for_nchw_only():
    for op in ("ghost_train", "ghost_backward"):
        for dtype in ("float32", "float64"):
            assert select_kernel(op, "nchw", dtype) is GROUPED_KERNELS[op, "nchw", dtype]
            assert select_kernel(op, "nhwc", dtype) is None
        assert select_kernel(op, "nchw", "float16") is None


def test_ghost_kernels_reject_non_contiguous_arrays():
    x = np.zeros((4, 3, 10))[:, :, ::2]
    with pytest.raises(ValueError, match=r"expected C-contiguous arrays"):
        ghost_train_nchw(
            x, 2, np.ones(3), np.zeros(3), EPS, np.empty((4, 3, 5)), np.empty((2, 3)),
            np.empty((2, 3)), np.empty(3), np.empty(3),
        )  # fmt: skip


_FRESH = """
import json, sys
import numpy as np
from batchnorm.kernels import ghost_backward_nchw, ghost_train_nchw
out = {}
for shape in ((9, 3, 5), (9, 3, 1)):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 7
    c = shape[1]
    y = np.empty_like(x); mean = np.empty((2, c)); var = np.empty((2, c))
    ghost_train_nchw(x, 4, np.ones(c, np.float32), np.zeros(c, np.float32), 1e-5, y, mean, var,
                     np.empty(c), np.empty(c))
    dx = np.empty_like(x)
    ghost_backward_nchw(x, x, 4, mean, var, np.ones(c, np.float32), 1e-5, dx,
                        np.empty(c, np.float32), np.empty(c, np.float32))
    out[str(shape)] = [float(y.sum()), float(dx.sum())]
print(json.dumps(out))
"""


def test_ghost_kernels_load_from_the_cache_in_fresh_processes():
    # Parallel kernels calling serial helpers only: the second process loads all of it from
    # the on-disk cache the first one wrote (the NOTE in kernels/_config.py).
    runs = [
        subprocess.run(
            [sys.executable, "-c", _FRESH],
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ.copy(),
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    assert results[0] == results[1]
