"""A process made by fork runs the layers, also after its parent ran the parallel kernels.

GNU OpenMP (the runtime of Numba's ``omp`` threading layer here, shared with torch) kills a
child forked from a process that used it as soon as the child starts a parallel region: "fork()
called from a process already using GNU OpenMP". The child must therefore stay off the parallel
kernels (:mod:`batchnorm.routing`); spawn and forkserver children start afresh. Each case runs
in a fresh interpreter, the parent warm (parallel kernels run) or cold, and the child trains
and evaluates a BatchNorm far above the serial threshold; its results must equal the parent's.

The child sets ``torch.set_num_threads(1)``, as DataLoader workers do: without it torch's own ops
hang in a forked child of a parent that used torch's thread pool (measured here, torch 2.13,
for ``(x * 2).sum()`` on a (16, 8, 32, 32) tensor), BatchNorm or not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, sys
    import torch
    import batchnorm

    def work(queue=None):
        if queue is not None:
            torch.set_num_threads(1)  # as DataLoader workers do
        torch.manual_seed(0)
        x = torch.randn(16, 8, 32, 32, requires_grad=True)  # 131,072 values: parallel
        layer = batchnorm.BatchNorm2d(8)
        y = layer(x)
        (y * y).sum().backward()
        layer.eval()
        with batchnorm.use_routing(eval_native_bytes=0):  # evaluation on the kernels too
            z = layer(x.detach())
        moments = batchnorm.functional.batch_moments(x.detach())
        result = {
            "route": batchnorm.routing.choose(x, "train"),
            "y": y.detach().double().sum().item(),
            "dx": x.grad.double().abs().sum().item(),
            "running_var": layer.running_var.tolist(),
            "z": z.double().sum().item(),
            "m2": moments.m2.tolist(),
        }
        if queue is None:
            return result
        queue.put(result)

    if __name__ == "__main__":
        method, warm = sys.argv[1], sys.argv[2] == "warm"
        parent = work() if warm else None
        ctx = mp.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=work, args=(queue,))
        child.start()
        child.join(60)
        out = {"exitcode": child.exitcode, "parent": parent or work()}
        if child.exitcode == 0:
            out["child"] = queue.get(timeout=10)
        print(json.dumps(out))
    """
)


@pytest.mark.parametrize("warm", ["warm", "cold"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_process_runs_the_layers_like_its_parent(method, warm, tmp_path):
    script = tmp_path / "fork_case.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), method, warm],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["exitcode"] == 0, done.stderr[-2000:]
    parent, child = out["parent"], out["child"]
    assert parent["route"] == "parallel"
    # A forked child stays on the serial kernels; a spawned one starts afresh. A forkserver
    # child is forked from the server, which may have imported the package (preloading
    # __main__): either route is right there, as long as the child lives.
    if method == "fork":
        assert child["route"] == "serial"
    elif method == "spawn":
        assert child["route"] == "parallel"
    for key in ("y", "dx", "z"):
        assert child[key] == pytest.approx(parent[key], rel=1e-5, abs=1e-3), key
    assert child["running_var"] == pytest.approx(parent["running_var"], rel=1e-6)
    assert child["m2"] == pytest.approx(parent["m2"], rel=1e-9)
