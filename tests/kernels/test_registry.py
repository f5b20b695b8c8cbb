"""The kernel registry, the import rules of batchnorm.kernels and the one decorator policy."""

from __future__ import annotations

import ast
import doctest
import json
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import batchnorm
import batchnorm.kernels as kernels
from batchnorm.kernels import KERNELS, backward, fused, moments, normalize, select_kernel, warmup

SRC = Path(batchnorm.__file__).resolve().parent
OPS = [
    "moments",
    "normalize",
    "backward_reduce",
    "backward_apply",
    "train_serial",
    "eval_serial",
    "backward_serial",
    "train_parallel",
    "backward_parallel",
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "dtype",
    [np.float32, np.float64, np.dtype("float32"), np.dtype("float64"), "float32", "float64"],
    ids=repr,
)
def test_select_kernel_returns_named_kernel(op, layout, dtype):
    kernel = select_kernel(op, layout, dtype)
    assert kernel.__name__ == f"{op}_{layout}"
    assert kernel is KERNELS[op, layout, np.dtype(dtype).name]


def test_registry_covers_every_op_layout_dtype():
    expected = {
        (op, lay, dt) for op in OPS for lay in ("nchw", "nhwc") for dt in ("float32", "float64")
    }
    assert set(KERNELS) == expected


@pytest.mark.parametrize(
    "dtype", [np.float16, "float16", "bfloat16", np.int32, "complex64", "no-such-dtype"]
)
def test_select_kernel_returns_none_for_uncovered_dtype(dtype):
    assert select_kernel("moments", "nchw", dtype) is None


@pytest.mark.parametrize("layout", ["nc", "NCHW", "channels_last", ""])
def test_select_kernel_returns_none_for_unknown_layout(layout):
    assert select_kernel("normalize", layout, np.float32) is None


def test_select_kernel_rejects_unknown_op_listing_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"select_kernel\(\): expected op in .*'moments'.*'backward_apply'.*got 'moment'",
    ):
        select_kernel("moment", "nchw", np.float32)


def test_warmup_runs_and_rejects_uncovered_dtype():
    warmup()
    warmup(("float32",))
    with pytest.raises(ValueError, match=r"warmup\(\): expected dtypes among"):
        warmup(("float16",))
    for jobs in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"warmup\(\): expected jobs to be an int >= 1"):
            warmup(jobs=jobs)


def test_warmup_in_two_processes_fills_the_cache_this_process_loads():
    warmup(("float32",), jobs=2)
    if numba.config.DISABLE_JIT:
        return
    from batchnorm.kernels import ACTIVATED_CODES, activated

    for code in ACTIVATED_CODES:
        for op in ("train", "eval", "backward"):
            for variant in ("rows", "cols"):
                dispatcher = getattr(activated.kernels_for(code), f"{op}_{variant}")
                dtypes = {str(sig[0].dtype) for sig in dispatcher.signatures}
                assert "float32" in dtypes, (code, op, variant, dtypes)


def test_kernels_docstring_examples_run():
    result = doctest.testmod(kernels, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.fixture(scope="module")
def fresh_import():
    """Import batchnorm.kernels and batchnorm.reference in a fresh interpreter and report."""
    script = (
        "import json, sys\n"
        "import batchnorm.kernels, batchnorm.reference\n"
        "from batchnorm.kernels import backward, fused, moments, normalize\n"
        "sigs = {f'{m.__name__}.{n}': len(f.signatures)\n"
        "        for m in (backward, fused, moments, normalize) for n, f in vars(m).items()\n"
        "        if hasattr(f, 'signatures')}\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'signatures': sigs}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_import_without_torch(fresh_import):
    assert not fresh_import["torch"], "importing batchnorm.kernels/reference pulled in torch"


def test_kernels_compile_nothing_at_import(fresh_import):
    signatures = fresh_import["signatures"]
    if not numba.config.DISABLE_JIT:  # without the JIT there are no dispatchers to inspect
        assert len(signatures) >= 12, signatures  # the 12 parallel kernels, plus helpers
    assert all(n == 0 for n in signatures.values()), signatures


def test_warmup_compiles_every_variant_for_both_dtypes():
    warmup()
    dispatchers = [
        moments._moments_rows,
        moments._moments_cols,
        normalize._normalize_rows,
        normalize._normalize_cols,
        backward._reduce_rows,
        backward._reduce_cols,
        backward._apply_rows,
        backward._apply_cols,
        fused._train_rows,
        fused._train_cols,
        fused._backward_rows,
        fused._backward_cols,
    ]
    if numba.config.DISABLE_JIT:  # plain Python functions: nothing to compile
        return
    for dispatcher in dispatchers:
        dtypes = {str(sig[0].dtype) for sig in dispatcher.signatures}
        assert {"float32", "float64"} <= dtypes, (dispatcher.__name__, dtypes)


def test_kernels_reject_non_contiguous_arrays():
    x = np.zeros((4, 3, 10))[:, :, ::2]  # a strided view: a reshape would silently copy
    with pytest.raises(ValueError, match=r"expected C-contiguous arrays"):
        kernels.moments_nchw(x, np.empty(3), np.empty(3))
    y = np.zeros((8, 4))[:, :2]
    with pytest.raises(ValueError, match=r"expected C-contiguous arrays"):
        kernels.normalize_nhwc(np.zeros((8, 2)), np.zeros(2), np.ones(2), np.zeros(2), y)


def test_no_fastmath_or_cache_literal_outside_config():
    # stumpy's grep, made exact: parse every module and flag any call that passes a fastmath=
    # or cache= keyword (a plain variable named `cache` elsewhere is fine).
    config = SRC / "kernels" / "_config.py"
    offenders = [
        f"{path.relative_to(SRC)}:{node.lineno}: {node.arg}="
        for path in sorted(SRC.rglob("*.py"))
        if path != config
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.keyword) and node.arg in {"fastmath", "cache"}
    ]
    assert not offenders, "decorator options belong in kernels/_config.py:\n" + "\n".join(offenders)


def test_config_is_the_one_place_with_decorator_options():
    config = ast.parse((SRC / "kernels" / "_config.py").read_text())
    keywords = {node.arg for node in ast.walk(config) if isinstance(node, ast.keyword)}
    assert {"fastmath", "cache"} <= keywords


def test_fastmath_policy_keeps_nan_and_inf():
    from batchnorm.kernels import _config

    assert _config.FASTMATH == {"reassoc", "contract"}
    assert not {"nnan", "ninf", "fast"} & set(_config.FASTMATH)
