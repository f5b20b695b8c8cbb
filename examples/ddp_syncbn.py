"""Data-parallel training on CPU with DistributedDataParallel and batchnorm's SyncBatchNorm.

Run it with two processes on one machine::

    torchrun --standalone --nproc-per-node 2 examples/ddp_syncbn.py

(``torchrun`` is also ``python -m torch.distributed.run``.) Options: ``--epochs`` (3),
``--batch-size`` per process (32; the global batch is that times the number of processes),
``--lr`` (0.05), ``--seed`` (0), ``--max-steps`` (stop after that many optimizer steps),
``--threads`` per process (default: the cores divided among the processes), ``--bn sync|local``,
``--check``.

What it does: a small CNN of conv-BN-ReLU blocks learns scikit-learn's bundled 8x8 digits
(1,797 images, no download; a fixed 80/20 split). Each process reads its own shard of every
epoch through ``DistributedSampler``; ``DistributedDataParallel`` (gloo) averages the
gradients; ``convert_sync_batchnorm`` turns every BatchNorm layer into ``SyncBatchNorm``, so
each layer normalises with the mean and variance of the *global* batch (all processes' shards
together) instead of its own shard's. Rank 0 prints one line per epoch: the mean training loss
over all processes' samples and the test accuracy (the test set is split between the
processes, the counts summed).

The three lines that make it synchronized BatchNorm are in ``train``::

    model = convert_sync_batchnorm(model)
    model = DistributedDataParallel(model, forward_sync_buffers=False)
    sampler = DistributedSampler(train_set, seed=args.seed)   # + sampler.set_epoch(epoch)

``forward_sync_buffers=False`` (torch 2.13's name for ``broadcast_buffers=False``): by default
DDP copies rank 0's buffers (the running statistics) to every rank before each forward, one
more collective per step. SyncBatchNorm already gives every rank the same running statistics,
so the copy is not needed; ``--check`` shows it: at the end, each rank hashes its parameters
and its buffers, and rank 0 prints every rank's hashes (equal on every rank). With
``--bn local`` the layers stay per-process ``batchnorm.BatchNorm2d``: the parameters still
agree (DDP averages the gradients), the running statistics do not, and the buffer hashes
differ.

The same run in one process with the global batch, ``torchrun --standalone --nproc-per-node 1
examples/ddp_syncbn.py --batch-size 64``, trains the same model as 2 processes x 32 with
SyncBatchNorm: ``DistributedSampler`` deals the same permutation round-robin, so the two shards
of step k together are exactly the single process's batch k; SyncBatchNorm normalises with
their joint statistics, and DDP's average of the two shards' mean-loss gradients is the
gradient of the mean loss over all 64. The printed losses agree up to float rounding (measured
with torch 2.13: 1.7966, 0.5356, 0.1313 over the 3 epochs, both ways); with ``--bn local`` they
do not (1.8087, 0.5623, 0.1514).

Not launched by torchrun (no ``RANK``/``WORLD_SIZE`` in the environment), the script stops with
exit code 2 and the command to use; ``--nproc-per-node 1`` runs it as one process.

GPUs (untested here: this project's machines have no GPU). Change the backend and the device,
and give DDP the device::

    BACKEND = "nccl"                                         # instead of "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    DEVICE = torch.device("cuda", local_rank); torch.cuda.set_device(DEVICE)
    ddp_model = DistributedDataParallel(model, device_ids=[local_rank], ...)

(``train`` already moves the model and every batch to ``DEVICE``). batchnorm's SyncBatchNorm
runs on CUDA through torch ops (its Numba kernels are CPU-only) and exchanges its statistics
over NCCL; on GPUs, torch's own ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` is the
established alternative, and DDP accepts torch's layer there.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import batchnorm
from batchnorm import convert_sync_batchnorm

# The one place the device is named; see the module docstring for GPUs.
DEVICE = torch.device("cpu")
BACKEND = "gloo"

# The digits split is fixed (independent of --seed) so that runs with different seeds are
# evaluated on the same test images.
SPLIT_SEED = 0
TEST_FRACTION = 0.2

# Set by torchrun for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(
        description="Train a small CNN on the digits with DDP and SyncBatchNorm (CPU, gloo).",
        epilog="Launch with: torchrun --standalone --nproc-per-node 2 examples/ddp_syncbn.py",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and kernel) threads per process; default: cores / processes on this node",
    )
    p.add_argument(
        "--bn",
        choices=("sync", "local"),
        default="sync",
        help="sync: SyncBatchNorm over all processes; local: per-process BatchNorm (baseline)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="print every rank's hash of its final parameters and buffers",
    )
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "max_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
    return args


def load_digits_split() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` float32 images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap); scaling to [0, 1] is enough,
    # the first BatchNorm standardises per channel anyway.
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(y)))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def make_model() -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier, 8x8 -> 10.

    Plain ``torch.nn`` layers, as a user's model would be; the BatchNorm layers are converted
    afterwards. The convolutions have no bias: the BatchNorm after each one subtracts the
    per-channel mean, which would cancel a bias, and adds its own shift.
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def state_hashes(model: nn.Module) -> tuple[str, str]:
    """SHA-256 (first 16 hex digits) of the parameters and of the buffers, names included.

    Bitwise: two ranks hash alike only if every value is identical, which is what data-parallel
    training must keep (a rank whose state drifts trains a different model from then on).
    """
    params, buffers = hashlib.sha256(), hashlib.sha256()
    named = [(params, model.named_parameters()), (buffers, model.named_buffers())]
    for digest, items in named:
        for name, tensor in sorted(items, key=lambda item: item[0]):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return params.hexdigest()[:16], buffers.hexdigest()[:16]


def global_sum(*values: float) -> list[float]:
    """Sum each value over all processes (float64, one all_reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def evaluate(model: nn.Module, test_set: TensorDataset, rank: int, world_size: int) -> float:
    """Accuracy on the whole test set: each rank scores every ``world_size``-th image.

    Run on the unwrapped module, with no collective inside the loop: the shards may differ by
    one image, hence in batch count, and in eval mode BatchNorm uses its running statistics,
    which need no synchronisation. The counts are summed once at the end.
    """
    x, y = test_set.tensors
    x, y = x[rank::world_size], y[rank::world_size]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), 256):
            logits = model(x[start : start + 256].to(DEVICE))
            correct += int((logits.argmax(1).cpu() == y[start : start + 256]).sum())
    model.train()
    total_correct, total = global_sum(correct, len(y))
    return total_correct / total


def torchrun_environment() -> tuple[int, int, int]:
    """``(rank, world_size, local_world_size)`` from torchrun's variables, or exit 2 if absent."""
    missing = [k for k in TORCHRUN_VARIABLES if k not in os.environ]
    if missing:
        print(
            f"ddp_syncbn.py: expected to be launched by torchrun, got no {', '.join(missing)} "
            "in the environment. Run: torchrun --standalone --nproc-per-node 2 "
            "examples/ddp_syncbn.py (--nproc-per-node 1 for a single process).",
            file=sys.stderr,
        )
        raise SystemExit(2)  # a usage error, as argparse's
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return rank, world_size, local_world_size


def main(argv: list[str] | None = None) -> int:
    """Train, print per-epoch loss and test accuracy on rank 0; return the exit code."""
    args = parse_args(argv)
    rank, world_size, local_world_size = torchrun_environment()
    # Two processes on two cores: one thread each. More threads per process than cores per
    # process only makes the processes preempt each other, and every collective then waits for
    # the slowest. batchnorm's kernels follow torch's thread count.
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(threads)

    # Reads RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun. The timeout bounds how long the
    # other ranks wait in a collective for a rank that hangs (gloo's default is 30 minutes); a
    # rank that crashes is noticed at once anyway.
    dist.init_process_group(BACKEND, timeout=datetime.timedelta(minutes=5))
    try:
        return train(args, rank, world_size, threads)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world_size: int, threads: int) -> int:
    """The training loop of one process."""
    train_set, test_set = load_digits_split()
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts them)
    model = make_model()
    if args.bn == "sync":
        model = convert_sync_batchnorm(model)
    else:
        model = batchnorm.convert(model)  # per-process batchnorm.BatchNorm2d, the baseline
    model = model.to(DEVICE)
    ddp_model = DistributedDataParallel(model, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    # Every rank shuffles with the same seed and takes its own slice of the permutation; the
    # sampler pads the shards to equal length, so every rank runs the same number of steps (a
    # rank with one step fewer would leave the others waiting in a collective).
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    if rank == 0:
        print(
            f"ddp_syncbn: world size {world_size} ({BACKEND}, {DEVICE}), {threads} thread(s) "
            f"each, batch {args.batch_size} per process ({args.batch_size * world_size} global), "
            f"bn={args.bn}, {len(train_set)} train / {len(test_set)} test images",
            flush=True,
        )
    step = 0
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)  # a new permutation per epoch, the same on every rank
        t0 = time.perf_counter()
        loss_sum, seen, epoch_steps = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(DEVICE), y.to(DEVICE)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp_model(x), y)
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            step += 1
            epoch_steps += 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        total_loss, total_seen = global_sum(loss_sum, seen)
        accuracy = evaluate(model, test_set, rank, world_size)
        if rank == 0:
            print(
                f"epoch {epoch}/{args.epochs}  train loss {total_loss / total_seen:.4f}  "
                f"test accuracy {accuracy:.4f}  ({epoch_steps} steps, "
                f"{time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        if args.max_steps is not None and step >= args.max_steps:
            break

    if args.check:
        # Rank 0 prints every rank's line: lines that several processes write to one stream
        # can interleave mid-line.
        hashes = [None] * world_size
        dist.all_gather_object(hashes, state_hashes(model))
        if rank == 0:
            for r, (params, buffers) in enumerate(hashes):
                print(f"check rank={r} params={params} buffers={buffers}", flush=True)
    if rank == 0:
        print(f"done: {step} steps, test accuracy {accuracy:.4f}", flush=True)
    # No rank tears its connections down while another is still in a collective. Measured with
    # torch 2.13 and gloo: without this barrier, 4 of 36 runs ended with rank 0 aborting
    # ("terminate called without an active exception") in destroy_process_group while rank 1
    # was still finishing; with it, 0 of 30.
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
