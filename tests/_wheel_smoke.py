"""Smoke script run by tests/test_wheel.py inside a fresh venv that has the built wheel installed.

It is not a test module (pytest collects only ``test_*.py``): the test runs it as
``python _wheel_smoke.py REPO OUT`` with the venv's interpreter and a working directory outside
the repository, and reads its exit code and output. ``REPO`` is the source checkout, which the
import must *not* come from; ``OUT`` is a scratch directory for the lab run.

Each check prints one ``ok <name>`` line, so a failure shows how far the script got.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def check(name: str, condition: bool, detail: str = "") -> None:
    if not condition:
        raise SystemExit(f"FAILED {name}: {detail}")
    print(f"ok {name}", flush=True)


def close(name, ours, theirs, *, atol=1e-5, rtol=1e-4):
    import torch

    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    check(name, torch.allclose(ours, theirs, atol=atol, rtol=rtol), f"max |diff| = {diff:.3g}")


def check_import(repo: Path) -> None:
    import batchnorm

    where = Path(batchnorm.__file__).resolve()
    check(
        "imported from the venv",
        Path(sys.prefix).resolve() in where.parents and repo.resolve() not in where.parents,
        f"batchnorm came from {where} (sys.prefix {sys.prefix}, repository {repo})",
    )
    from importlib import metadata

    dist = metadata.distribution("batchnorm")
    # pip records where it installed from: "archive_info" for a wheel file, "dir_info" for a
    # directory (editable or not), which would mean the repository, not the built wheel.
    origin = dist.read_text("direct_url.json") or ""
    check("installed from the wheel file", '"archive_info"' in origin, origin)
    check(
        "version matches metadata",
        batchnorm.__version__ == dist.version,
        f"{batchnorm.__version__} != {dist.version}",
    )


def compare_training_step(name, ours, theirs, x, *, after=None) -> None:
    """One training forward/backward of ``ours`` against ``theirs`` (torch.nn), same input.

    ``after`` is applied to torch's output (an activation that our fused layer includes).
    """
    import torch

    import batchnorm

    check(f"{name}: input served by the Numba kernels", batchnorm.backend_for(x) == "numba")
    theirs.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():  # non-trivial affine parameters
        for module in (ours, theirs):
            module.weight.copy_(torch.linspace(0.5, 1.5, module.num_features))
            module.bias.copy_(torch.linspace(-0.2, 0.3, module.num_features))
    ours.train()
    theirs.train()
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    # A non-leaf input (times one): in-place layers may overwrite their input, never a leaf.
    y_ours = ours(x_ours * 1.0)
    y_theirs = theirs(x_theirs * 1.0)
    if after is not None:
        y_theirs = after(y_theirs)
    close(f"{name}: forward", y_ours, y_theirs)
    grad = torch.linspace(-1.0, 1.0, y_ours.numel()).reshape(y_ours.shape)
    y_ours.backward(grad)
    y_theirs.backward(grad)
    close(f"{name}: grad input", x_ours.grad, x_theirs.grad, atol=1e-4)
    close(f"{name}: grad weight", ours.weight.grad, theirs.weight.grad, atol=1e-4)
    close(f"{name}: grad bias", ours.bias.grad, theirs.bias.grad, atol=1e-4)
    if getattr(ours, "track_running_stats", False) and ours.momentum == theirs.momentum:
        close(f"{name}: running mean", ours.running_mean, theirs.running_mean)
        close(f"{name}: running var", ours.running_var, theirs.running_var)


def check_layers() -> None:
    import torch

    import batchnorm

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen) * 2.0 + 0.5

    # The plain drop-ins, one per dimensionality.
    for ours_cls, theirs_cls, shape in (
        (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
        (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d, (8, 5, 4, 3)),
        (batchnorm.BatchNorm3d, torch.nn.BatchNorm3d, (4, 5, 3, 2, 3)),
    ):
        compare_training_step(ours_cls.__name__, ours_cls(5), theirs_cls(5), randn(*shape))

    # Ghost BN with one ghost batch per batch is plain BN.
    x = randn(8, 5, 4, 3)
    compare_training_step(
        "GhostBatchNorm2d (one ghost batch)",
        batchnorm.GhostBatchNorm2d(5, virtual_batch_size=8),
        torch.nn.BatchNorm2d(5),
        x,
    )
    # With two ghost batches, each half is normalised with its own statistics.
    ghost = batchnorm.GhostBatchNorm2d(5, virtual_batch_size=4, affine=False).train()
    halves = [
        torch.nn.functional.batch_norm(half, None, None, training=True) for half in x.split(4)
    ]
    close("GhostBatchNorm2d (two ghost batches): forward", ghost(x), torch.cat(halves))

    # Batch Renorm's first step (r = 1, d = 0 before any running statistics) is plain BN.
    compare_training_step(
        "BatchRenorm2d (first step)",
        batchnorm.BatchRenorm2d(5, momentum=0.1),
        torch.nn.BatchNorm2d(5),
        randn(8, 5, 4, 3),
    )

    # The fused layers against BN followed by the activation.
    compare_training_step(
        "BatchNormAct2d (relu)",
        batchnorm.BatchNormAct2d(5, activation="relu"),
        torch.nn.BatchNorm2d(5),
        randn(8, 5, 4, 3),
        after=torch.nn.ReLU(),
    )
    compare_training_step(
        "InPlaceABN2d (leaky_relu 0.01)",
        batchnorm.InPlaceABN2d(5),
        torch.nn.BatchNorm2d(5),
        randn(8, 5, 4, 3),
        after=torch.nn.LeakyReLU(0.01),
    )
    check_sync_batchnorm(randn(8, 5, 4, 3))


def check_sync_batchnorm(x) -> None:
    """SyncBatchNorm in a one-process gloo group equals BN over the local batch."""
    import torch
    import torch.distributed as dist

    import batchnorm

    names = {name for _, name in socket.if_nameindex()}
    if "lo" in names:  # gloo otherwise resolves the host name, which a sandbox may not map
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}/store",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            compare_training_step(
                "SyncBatchNorm (1-process gloo group)",
                batchnorm.SyncBatchNorm(5),
                torch.nn.BatchNorm2d(5),
                x,
            )
        finally:
            dist.destroy_process_group()


def check_recompute_statistics() -> None:
    import torch

    import batchnorm

    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(6, 4)
    model = torch.nn.Sequential(linear, batchnorm.BatchNorm1d(4), torch.nn.ReLU())
    batches = [torch.randn(10, 6, generator=gen) for _ in range(3)]
    batchnorm.recompute_statistics(model, batches, progress=False)
    with torch.no_grad():
        features = linear(torch.cat(batches))
    bn = model[1]
    close("recompute_statistics: population mean", bn.running_mean, features.mean(0))
    close("recompute_statistics: population var", bn.running_var, features.var(0, unbiased=True))
    check("recompute_statistics: training mode restored", model.training)


def check_cli(out: Path) -> None:
    # The console script of the venv, so the entry point itself is checked.
    command = Path(sys.prefix) / "bin" / "batchnorm"
    for args in (["--version"], ["info"], ["lab", "list"]):
        done = subprocess.run([command, *args], capture_output=True, text=True, timeout=300)
        check(
            f"batchnorm {' '.join(args)}",
            done.returncode == 0 and done.stdout.strip() != "",
            f"exit {done.returncode}\n{done.stdout}\n{done.stderr}",
        )
    done = subprocess.run(
        [command, "lab", "run", "figure1", "--preset", "tiny", "--out", out, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    check(
        "batchnorm lab run figure1 --preset tiny",
        done.returncode == 0,
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
    )
    runs = sorted((out / "figure1").iterdir())
    check("lab run wrote one run directory", len(runs) == 1, str(runs))
    written = {p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*") if p.is_file()}
    expected = {"config.json", "metrics.jsonl", "summary.json", "summary.md"}
    check("lab run wrote its results", expected <= written, f"wrote {sorted(written)}")
    check(
        "lab run drew its figures",
        any(name.startswith("figures/") and name.endswith(".png") for name in written),
        f"wrote {sorted(written)}",
    )


def main() -> None:
    repo, out = Path(sys.argv[1]), Path(sys.argv[2])
    check(
        "cwd outside the repository",
        repo.resolve() not in Path.cwd().resolve().parents
        and Path.cwd().resolve() != repo.resolve(),
        str(Path.cwd()),
    )
    check_import(repo)
    check_layers()
    check_recompute_statistics()
    check_cli(out)
    print("smoke: all checks passed", flush=True)


if __name__ == "__main__":
    main()
