"""Shared fixtures, parametrisation lists and the one tolerance table of the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# One table for every comparison. float32 figures: the kernels accumulate in float64, so the
# remaining error is the final rounding to float32 plus torch's own float32 arithmetic in the
# oracle; 1e-4 relative is ~1000 ulp, room for torch's reductions over ~10^6 values.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}

# (N, C, *) shapes: the degenerate (2, 1), a 1x1 spatial map, odd sizes, large C with small N.
SHAPES = [
    (2, 1),
    (7, 3),
    (60, 100),
    (2, 3, 1, 1),
    (3, 5, 7),
    (4, 3, 5, 6),
    (2, 64, 3, 3),
    (5, 2, 3, 4, 3),
]
DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Return ``x``'s values in the requested memory layout.

    ``channels_last`` puts the channel axis innermost (for any rank >= 3); ``strided`` is a
    non-contiguous view (every other element of a twice-as-wide buffer).
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() < 3:
            return x.contiguous()
        perm = (0, *range(2, x.dim()), 1)
        inverse = [0, x.dim() - 1, *range(1, x.dim() - 1)]
        return x.permute(perm).contiguous().permute(inverse)
    if layout == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(f"unknown layout {layout!r}")


@pytest.fixture(params=["shipped", "eval-kernels"])
def eval_routing(request):
    """Run a test twice: with the shipped routing, and with evaluation on the kernels.

    Shipped, small evaluation-mode inputs go to torch's op (``eval_native_bytes``, measured
    faster there); the suite's inputs are small, so a test of evaluation numerics also runs
    with ``eval_native_bytes=0`` to reach the eval kernels.
    """
    if request.param == "shipped":
        yield request.param
        return
    from batchnorm import use_routing

    with use_routing(eval_native_bytes=0):
        yield request.param


# The same two routings for tests that cannot take a function-scoped fixture (hypothesis):
# parametrize with it and run the body under ``use_routing(**routing)``.
EVAL_ROUTINGS = pytest.mark.parametrize(
    "routing", [{}, {"eval_native_bytes": 0}], ids=["shipped", "eval-kernels"]
)


@pytest.fixture
def eval_on_kernels():
    """Evaluation-mode calls on the kernels whatever their size (for tests of the kernels)."""
    from batchnorm import use_routing

    with use_routing(eval_native_bytes=0) as policy:
        yield policy


@pytest.fixture
def gen():
    """A seeded torch generator; each test gets its own."""
    return torch.Generator().manual_seed(1234)


# --- helpers shared by the functional/module/convert/property/training tests -----------------

# Rank of the input -> name of the torch.nn class that accepts it.
BN_CLASS_NAME_FOR_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def bn_classes(rank: int):
    """``(ours, torch's)`` BatchNorm classes for an input of this rank.

    ``batchnorm`` is imported here, not at the top of the file, so that the kernel tests keep
    collecting while the torch layer is absent or broken.
    """
    import batchnorm

    name = BN_CLASS_NAME_FOR_RANK[rank]
    return getattr(batchnorm, name), getattr(torch.nn, name)


def make_input(shape, dtype, layout="contiguous", generator=None, scale=1.0, offset=0.0):
    """Standard-normal values (drawn in float64, then cast) in the requested layout."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return make_layout(base.to(dtype), layout)


def randomize_bn_state(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give a BatchNorm module non-default parameters and running statistics, in place."""
    with torch.no_grad():
        c = module.num_features
        if module.weight is not None:
            module.weight.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
        if module.running_mean is not None:
            module.running_mean.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)


def snapshot_state(module: torch.nn.Module) -> dict:
    """Clones of every parameter and buffer (num_batches_tracked included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module: torch.nn.Module, snapshot: dict) -> None:
    now = module.state_dict()
    assert now.keys() == snapshot.keys()
    for key, before in snapshot.items():
        assert torch.equal(now[key], before), f"{key} changed: {before} -> {now[key]}"


def to_np64(t: torch.Tensor):
    """A float64 NumPy copy (never a view: the tensor may be a buffer updated in place later)."""
    return t.detach().to(torch.float64).numpy().copy()


def from_np(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def labelled(name: str):
    """``msg=`` for torch.testing.assert_close that keeps its report and prefixes ``name``."""
    return lambda report: f"{name}: {report}"
