"""Both execution paths of the torch op, forced on the same inputs: serial fused and parallel.

The test suite's shapes are mostly small and so run on the serial kernels; here every case runs
once with the size threshold at 0 (parallel fused kernels) and once at infinity (serial),
against torch.nn and, in float64, against each other.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm import _stages, use_routing
from conftest import TOL, make_layout, shape_id

PATH_SHAPES = [(7, 3), (300, 5), (4, 3, 5, 6), (2, 64, 3, 3), (3, 5, 7), (5, 2, 3, 4, 3)]
MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}
OURS = {
    2: batchnorm.BatchNorm1d,
    3: batchnorm.BatchNorm1d,
    4: batchnorm.BatchNorm2d,
    5: batchnorm.BatchNorm3d,
}


@pytest.fixture(params=["serial", "parallel"])
def path(request):
    # Evaluation on the kernels too: this file is about the kernels' two paths.
    limit = 1 << 60 if request.param == "serial" else 0
    with use_routing(serial_max_elements=limit, eval_native_bytes=0):
        yield request.param


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=shape_id)
def test_module_matches_torch_on_both_paths(path, shape, dtype, layout, momentum):
    gen = torch.Generator().manual_seed(11)
    ref = MODULES[len(shape)](shape[1], momentum=momentum, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=gen)
        ref.bias.normal_(generator=gen)
    ours = OURS[len(shape)](shape[1], momentum=momentum, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = make_layout(torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1, layout)
        g = torch.randn(shape, generator=gen, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(ya, yb, **TOL[dtype])
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
        assert ya.stride() == x.stride() or layout == "contiguous"
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[dtype])
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[dtype])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL[dtype])
    ours.eval()
    ref.eval()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])


@pytest.mark.parametrize("shape", [(300, 5), (4, 3, 5, 6)], ids=shape_id)
def test_serial_and_parallel_paths_agree_in_float64(shape):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    results = []
    for limit in (0, 1 << 60):
        with use_routing(serial_max_elements=limit):
            rm, rv = (
                torch.zeros(shape[1], dtype=torch.float64),
                torch.ones(shape[1], dtype=torch.float64),
            )
            y = batchnorm.batch_norm(x, rm, rv, w, None, training=True)
        # Outside the block: the backward routes as its forward did.
        dx, dw = torch.autograd.grad(y, (x, w), g)
        results.append((y, dx, dw, rm, rv))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_running_update_through_numpy_bumps_the_version_counter():
    # A graph that saved the running statistics (evaluation-mode forward) must refuse to
    # backpropagate after a training step changed them, as it would after an in-place torch op.
    layer = batchnorm.BatchNorm1d(3)
    x = torch.randn(8, 3, requires_grad=True)
    layer.eval()
    y = layer(x)
    layer.train()
    layer(torch.randn(8, 3))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_path_keeps_torch_thread_count(threads):
    # Numba's OpenMP layer shares torch's runtime; a parallel kernel must not change the
    # thread count the user gave torch.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with use_routing(serial_max_elements=0, eval_native_bytes=0):
            layer = batchnorm.BatchNorm2d(4)
            x = torch.randn(8, 4, 6, 6, requires_grad=True)
            layer(x).sum().backward()
            layer.eval()
            layer(x)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_parallel_kernels_follow_a_later_torch_thread_count():
    # Numba's count is cached per thread; a change to torch's count between calls must reach
    # the next parallel kernel, not the count of the first call.
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a Numba pool of at least two threads")
    before = torch.get_num_threads()
    seen = []
    try:
        with use_routing(serial_max_elements=0, eval_native_bytes=0):
            layer = batchnorm.BatchNorm2d(4)
            for threads in (2, 1, 2):
                torch.set_num_threads(threads)
                layer(torch.randn(8, 4, 6, 6))
                seen.append(numba.get_num_threads())
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 1, 2]


@pytest.mark.parametrize(
    ("shape", "layout", "expected"),
    [
        ((40, 4), "contiguous", "train_serial"),  # (N, C) is the nhwc layout: 160 <= 187.5
        ((50, 4), "contiguous", "train_parallel"),  # 200 values
        ((10, 4, 2, 2), "channels_last", "train_serial"),  # 160 values
        ((10, 4, 2, 2), "contiguous", "train_parallel"),  # nchw: 160 > 100
        ((6, 4, 2, 2), "contiguous", "train_serial"),  # 96 values
    ],
    ids=["nc-160", "nc-200", "cl-160", "nchw-160", "nchw-96"],
)
def test_channels_last_training_forward_stays_serial_longer(shape, layout, expected, monkeypatch):
    # serial_max_elements = 100 makes the channels-last training bound 187.5 values.
    chosen = []
    select = _stages.kernel

    def recording(op, kernel_layout, dtype):
        chosen.append(op)
        return select(op, kernel_layout, dtype)

    monkeypatch.setattr(_stages, "kernel", recording)
    layer = OURS[len(shape)](shape[1])
    x = make_layout(torch.randn(shape), layout)
    with torch.no_grad(), use_routing(serial_max_elements=100, nhwc_train_serial_scale=15 / 8):
        y = layer(x)
    assert chosen == [expected]
    torch.testing.assert_close(y, MODULES[len(shape)](shape[1])(x), **TOL[torch.float32])
