"""SyncBatchNorm on 2 gloo ranks against local BatchNorm on the same per-rank shapes.

Usage::

    python -m benchmarks.bench_sync [--quick | --channels C ...] [--repeats K] [--target-s S]
                                    [--json PATH] [--timeout S] [--seed N]

``--quick``: C in {16, 1024}, 15 repetitions (~20 s); default: C in {16, 64, 256, 1024}, 21
repetitions; ``--channels``: both shape families at the given channel counts.

Two processes (``multiprocessing`` "spawn", rendezvous through a file in a temporary directory,
gloo over loopback) run the same cases in lockstep. Per case, every rank builds

- ``local``: ``batchnorm.BatchNorm2d``/``BatchNorm1d`` on its own shard (no communication),
- ``sync``: ``batchnorm.distributed.SyncBatchNorm`` on the same shard (statistics of both),
- ``collectives``: the communication of ``sync`` alone, without any BatchNorm arithmetic: one
  ``all_gather`` and one ``all_reduce`` of the packets SyncBatchNorm sends per forward+backward
  (same element counts and dtypes),

and times ``forward + backward`` (gradients set to ``None`` before each call, as
``zero_grad()`` does). The figures:

- ``sync/local``: what synchronisation costs on top of a local BatchNorm of the same shard
  (1.0 = free). The data-parallel alternative it replaces is local BN, not BN of the global
  batch, so this is the ratio a user pays.
- ``coll share``: median(collectives) / median(sync), the part of a synchronized call spent
  in the two collectives, and ``coll/extra``: median(collectives) / (median(sync) -
  median(local)), the part of the synchronisation's extra time that the collectives explain
  (the rest: building and merging the packets, and each collective waiting for the slower
  rank). The packets grow with C (``packet B``, 8 (4 C + 4) bytes per rank) while the values
  per channel stay fixed, so the cases show how both shares move with the channel count.

Method (house rules of ``benchmarks/README.md``, adapted to two processes):

1. **Validate before timing**: the first ``sync`` call on each rank is compared with torch's
   BatchNorm in float64 on the concatenation of both ranks' shards (output, running buffers,
   input gradient, and the weight and bias gradients summed over ranks, which is what DDP
   averages). That call also pays Numba's compile or cache load. A mismatch marks the case
   INVALID on both ranks and it is not timed.
2. **Lockstep calibration**: a fixed number of warm-up calls per implementation (no time-based
   loop, which would give the ranks different call counts and deadlock the collectives), then
   one calls-per-repetition ``number`` agreed by both ranks (the max of their estimates).
3. **Interleaved repetitions** A B C A B C ..., each preceded by a barrier so that both ranks
   start it together; a repetition's time is the *slower* rank's (a data-parallel step waits
   for its slowest rank). Medians and interquartile ranges over ``--repeats`` repetitions.

Threads: 1 torch thread and 1 Numba thread per rank (2 ranks on the 2 cores of these machines;
more would make the ranks preempt each other, and every collective waits for the slower one).
The JSON record (``benchmarks/results/sync-<timestamp>.json``) has the machine description with
the per-rank thread counts, the load average before and after every case, and every sample.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import _harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORLD_SIZE = 2
THREADS_PER_RANK = 1

CHANNELS = (16, 64, 256, 1024)
#: Per-rank shapes. 4-D: 16 images of 16x16 per rank (4,096 values per channel and rank,
#: 16 MB of float32 at C = 1024); 2-D: 256 rows per rank (256 values per channel and rank).
CASE_SETS = {
    "full": [(16, c, 16, 16) for c in CHANNELS] + [(256, c) for c in CHANNELS],
    "quick": [(16, c, 16, 16) for c in (16, 1024)] + [(256, c) for c in (16, 1024)],
}
IMPLS = ("local", "sync", "collectives")


def custom_cases(channels: list[int]) -> list[tuple[int, ...]]:
    """The full set's two shape families at the given channel counts (``--channels``)."""
    return [(16, c, 16, 16) for c in channels] + [(256, c) for c in channels]


#: float32 validation tolerance: the test suite's table (tests/conftest.py).
TOL = {"rtol": 1e-4, "atol": 1e-5}
WARMUP_CALLS = 3
CALIBRATION_CALLS = 3


# --------------------------------------------------------------------------- one rank


def case_name(shape: tuple[int, ...]) -> str:
    """``bn2d-16x64x16x16`` / ``bn1d-256x64``: module kind and per-rank shape."""
    kind = "bn2d" if len(shape) == 4 else "bn1d"
    return f"{kind}-{'x'.join(map(str, shape))}"


def collective_packets(num_features: int) -> dict:
    """The tensors SyncBatchNorm sends per forward+backward, as ``{"all_gather", "all_reduce"}``.

    Each entry is ``(numel, dtype)`` of one rank's contribution.
    """
    # Mirrors batchnorm.distributed: the forward all_gathers a float64 vector of a 4-number
    # header (tag, num_features, status, count) then the C means and the C M2s; the backward
    # all_reduces the float64 per-channel sums of dy and of dy * (x - mean), 2 C numbers. (The
    # once-per-layer num_features handshake is not per call and is left out.)
    return {
        "all_gather": (4 + 2 * num_features, torch.float64),
        "all_reduce": (2 * num_features, torch.float64),
    }


def _make_modules(shape, seed):
    import batchnorm
    from batchnorm.distributed import SyncBatchNorm

    c = shape[1]
    local_cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
    gen = torch.Generator().manual_seed(seed)  # the same parameters on every rank
    state = {
        "weight": 1.0 + 0.1 * torch.randn(c, generator=gen),
        "bias": 0.1 * torch.randn(c, generator=gen),
        "running_mean": 0.1 * torch.randn(c, generator=gen),
        "running_var": 1.0 + torch.rand(c, generator=gen),
        "num_batches_tracked": torch.tensor(0),
    }
    local, sync = local_cls(c), SyncBatchNorm(c)
    local.load_state_dict(state)
    sync.load_state_dict(state)
    return local, sync, state


def _make_shard(shape, seed, rank):
    """This rank's input and upstream gradient, with per-channel offsets and scales."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    c = shape[1]
    per_channel = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(*shape, generator=gen) * (1.0 + torch.rand(per_channel, generator=gen))
    x = x + torch.randn(per_channel, generator=gen)
    g = torch.randn(*shape, generator=gen)
    return x, g


def _fwd_bwd(module, x, g):
    x.grad = None
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(g)
    return y


def validate(sync, state, x, g, rank) -> dict:
    """Compare ``sync`` on this shard with float64 BatchNorm of the global batch.

    Returns per quantity ``{"max_abs_err", "ok"}``, the same on both ranks (reduced with MAX
    over ranks); ``ok`` is ``torch.testing.assert_close``'s rule with :data:`TOL`,
    ``|got - want| <= atol + rtol * |want|`` everywhere.
    """
    import torch.distributed as dist

    x = x.clone().requires_grad_(True)
    y = _fwd_bwd(sync, x, g)
    xs = [torch.empty_like(x) for _ in range(WORLD_SIZE)]
    gs = [torch.empty_like(g) for _ in range(WORLD_SIZE)]
    dist.all_gather(xs, x.detach())
    dist.all_gather(gs, g)
    gx = torch.cat(xs).double().requires_grad_(True)
    weight = state["weight"].double().requires_grad_(True)
    bias = state["bias"].double().requires_grad_(True)
    rm, rv = state["running_mean"].double(), state["running_var"].double()
    y_ref = torch.nn.functional.batch_norm(gx, rm, rv, weight, bias, training=True)
    y_ref.backward(torch.cat(gs).double())
    n = x.shape[0]
    mine = slice(rank * n, (rank + 1) * n)
    # DDP all-reduces the parameter gradients; their sum over ranks is the global gradient.
    dweight, dbias = sync.weight.grad.clone(), sync.bias.grad.clone()
    dist.all_reduce(dweight)
    dist.all_reduce(dbias)
    pairs = {
        "output": (y.detach(), y_ref.detach()[mine]),
        "running_mean": (sync.running_mean, rm),
        "running_var": (sync.running_var, rv),
        "input_grad": (x.grad, gx.grad[mine]),
        "weight_grad": (dweight, weight.grad),
        "bias_grad": (dbias, bias.grad),
    }
    # Two numbers per quantity: the largest error, and the largest excess over the tolerance
    # (<= 0 when within it).
    stats = []
    for got, want in pairs.values():
        diff = (got.double() - want).abs()
        stats += [float(diff.max()), float((diff - TOL["atol"] - TOL["rtol"] * want.abs()).max())]
    t = torch.tensor(stats, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    values = t.tolist()
    # `<= 0.0` is False for NaN, so a NaN on either rank fails the check.
    return {
        k: {"max_abs_err": values[2 * i], "ok": values[2 * i + 1] <= 0.0}
        for i, k in enumerate(pairs)
    }


def make_runners(local, sync, x, g, packets) -> dict:
    """``{impl: run(number)}``; every call of ``sync`` and ``collectives`` communicates."""
    import torch.distributed as dist

    xl = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    n_gather, gather_dtype = packets["all_gather"]
    n_reduce, reduce_dtype = packets["all_reduce"]
    send = torch.randn(n_gather).to(gather_dtype)
    received = [torch.empty_like(send) for _ in range(WORLD_SIZE)]
    sums = torch.randn(n_reduce).to(reduce_dtype)

    def run_local(number):
        for _ in range(number):
            _fwd_bwd(local, xl, g)

    def run_sync(number):
        for _ in range(number):
            _fwd_bwd(sync, xs, g)

    def run_collectives(number):
        for _ in range(number):
            dist.all_gather(received, send)
            dist.all_reduce(sums)

    return {"local": run_local, "sync": run_sync, "collectives": run_collectives}


def _agreed_max(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_lockstep(runners: dict, repeats: int, target_s: float) -> dict:
    """Warm up, agree on calls per repetition, time interleaved repetitions; this rank's view.

    Returns ``{"number", "calibration_s", "samples"}``: ``samples[impl]`` holds this rank's
    per-call time of each repetition, in seconds.
    """
    import torch.distributed as dist

    for _ in range(WARMUP_CALLS):
        for run in runners.values():
            run(1)
    per_call = {}
    for key, run in runners.items():
        times = []
        for _ in range(CALIBRATION_CALLS):
            dist.barrier()
            t0 = time.perf_counter()
            run(1)
            times.append(time.perf_counter() - t0)
        per_call[key] = min(times)
    fastest_and_slowest = _agreed_max([min(per_call.values()), max(per_call.values())])
    fastest, slowest = (max(v, 1e-9) for v in fastest_and_slowest)
    # harness.calibrate_number's rule: repetitions of the fastest implementation last
    # target_s; the slowest one's at most 10x that.
    cap = max(1, math.floor(10 * target_s / slowest))
    number = max(1, min(100_000, cap, math.ceil(target_s / fastest)))

    samples = {k: [] for k in runners}
    gc.collect()
    gc.disable()  # as timeit does: a collection triggered by one runner is not charged to another
    try:
        for _ in range(repeats):
            for key, run in runners.items():
                dist.barrier()  # both ranks start the repetition together
                t0 = time.perf_counter()
                run(number)
                samples[key].append((time.perf_counter() - t0) / number)
    finally:
        gc.enable()
    return {"number": number, "calibration_s": per_call, "samples": samples}


def bench_case(shape, args, rank) -> dict:
    """Validate, then time one case on this rank."""
    local, sync, state = _make_modules(shape, args.seed)
    x, g = _make_shard(shape, args.seed, rank)
    record = {
        "case": case_name(shape),
        "shape_per_rank": list(shape),
        "values_per_channel_per_rank": x.numel() // shape[1],
        "packets": {
            k: {"numel": n, "dtype": str(dt).removeprefix("torch."), "bytes": n * dt.itemsize}
            for k, (n, dt) in collective_packets(shape[1]).items()
        },
        "loadavg_at_start": _harness.loadavg(),
    }
    t0 = time.perf_counter()
    checks = validate(sync, state, x, g, rank)
    record["first_call_s"] = time.perf_counter() - t0
    record["validation"] = checks
    record["valid"] = all(c["ok"] for c in checks.values())
    if record["valid"]:
        _fwd_bwd(local, x.clone().requires_grad_(True), g)  # local's compile/cache load
        runners = make_runners(local, sync, x, g, collective_packets(shape[1]))
        record.update(time_lockstep(runners, args.repeats, args.target_s))
    record["loadavg_at_end"] = _harness.loadavg()
    return record


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def rank_main(rank: int, world_size: int, workdir: str, args: argparse.Namespace) -> None:
    """Body of one spawned rank: join the group, run every case, write ``rank<k>.json``."""
    import numba
    import torch.distributed as dist

    threads = _harness.pin_threads(THREADS_PER_RANK)
    if "GLOO_SOCKET_IFNAME" not in os.environ and _loopback_interface():
        # Gloo otherwise resolves the host name, which need not map to a usable interface in a
        # sandbox; both ranks are on this machine, so loopback is all they need.
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rdzv",
        rank=rank,
        world_size=world_size,
        timeout=_dt.timedelta(seconds=args.timeout),
    )
    try:
        import batchnorm.kernels

        # Compile (or load) the kernels one rank at a time: two processes compiling the same
        # functions into one Numba cache directory at once can leave a corrupt entry.
        for turn in range(world_size):
            if turn == rank:
                batchnorm.kernels.warmup(["float32"])
            dist.barrier()
        records = []
        cases = custom_cases(args.channels) if args.channels else CASE_SETS[args.cases]
        for shape in cases:
            records.append(bench_case(shape, args, rank))
            if rank == 0:
                print(
                    f"[{len(records)}/{len(cases)}] {records[-1]['case']}",
                    file=sys.stderr,
                    flush=True,
                )
        out = {
            "rank": rank,
            "threads": threads,
            "numba_layer": _threading_layer(numba),
            "records": records,
        }
        Path(workdir, f"rank{rank}.json").write_text(json.dumps(out), encoding="utf-8")
        # Neither rank destroys the group while the other may still be in a collective (the
        # example measured an occasional abort at teardown without this).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _threading_layer(numba) -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:
        return None  # no parallel kernel has run


# --------------------------------------------------------------------------- parent


def run_ranks(args: argparse.Namespace) -> list[dict]:
    """Spawn the ranks, wait at most ``args.timeout`` seconds, return each rank's output.

    On a failure, torch's process context terminates the other rank and raises with the
    failed rank's traceback; on the timeout, both are terminated (then killed).
    """
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as workdir:
        context = tmp.start_processes(
            rank_main, args=(WORLD_SIZE, workdir, args), nprocs=WORLD_SIZE, join=False
        )
        deadline = time.monotonic() + args.timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"bench_sync: expected both ranks to finish within {args.timeout} s "
                        "(--timeout), got still running; terminated."
                    )
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            for p in context.processes:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        return [
            json.loads(Path(workdir, f"rank{r}.json").read_text(encoding="utf-8"))
            for r in range(WORLD_SIZE)
        ]


def combine(per_rank: list[dict]) -> list[dict]:
    """Per case: the slower rank's time of each repetition, medians, ratios and shares."""
    combined = []
    for recs in zip(*(r["records"] for r in per_rank), strict=True):
        rec = {k: v for k, v in recs[0].items() if k not in ("samples", "calibration_s")}
        rec["loadavg_at_end"] = recs[-1]["loadavg_at_end"]
        rec["first_call_s"] = [r["first_call_s"] for r in recs]
        if rec["valid"]:
            samples = {
                k: [max(vals) for vals in zip(*(r["samples"][k] for r in recs), strict=True)]
                for k in IMPLS
            }
            times = {
                k: {**_harness.summarize(s).to_dict(), "samples": s} for k, s in samples.items()
            }
            rec["per_rank_samples"] = [r["samples"] for r in recs]
            rec["times"] = times
            rec["ratio_sync_local"] = times["sync"]["median"] / times["local"]["median"]
            rec["paired_ratio_sync_local"] = _harness.summarize(
                [s / ll for s, ll in zip(samples["sync"], samples["local"], strict=True)]
            ).to_dict()
            rec["collective_share"] = times["collectives"]["median"] / times["sync"]["median"]
            extra = times["sync"]["median"] - times["local"]["median"]
            rec["extra_s"] = extra
            rec["collective_share_of_extra"] = (
                times["collectives"]["median"] / extra if extra > 0 else None
            )
        combined.append(rec)
    return combined


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.0f}%"


def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:.3f} ({t['iqr'] * 1e3:.3f})"


def report(records: list[dict]) -> str:
    """The printed table: one row per case."""
    header = [
        "case",
        "values/ch/rank",
        "packet B",
        "local ms (IQR)",
        "sync ms (IQR)",
        "sync/local",
        "paired IQR",
        "coll ms (IQR)",
        "coll share",
        "extra ms",
        "coll/extra",
    ]
    rows = []
    for r in records:
        packet = sum(p["bytes"] for p in r["packets"].values())
        if not r["valid"]:
            bad = [k for k, c in r["validation"].items() if not c["ok"]]
            rows.append(
                [
                    r["case"],
                    r["values_per_channel_per_rank"],
                    packet,
                    f"INVALID: {', '.join(bad)}",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        t, p = r["times"], r["paired_ratio_sync_local"]
        rows.append(
            [
                r["case"],
                r["values_per_channel_per_rank"],
                packet,
                _ms(t["local"]),
                _ms(t["sync"]),
                f"{r['ratio_sync_local']:.2f}",
                f"{p['q1']:.2f}-{p['q3']:.2f}",
                _ms(t["collectives"]),
                f"{100 * r['collective_share']:.0f}%",
                f"{r['extra_s'] * 1e3:.3f}",
                _pct(r["collective_share_of_extra"]),
            ]
        )
    return _harness.format_table(header, rows, "<>>>>>>>>>>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sync",
        description="SyncBatchNorm (2 gloo ranks) vs local BatchNorm, forward+backward.",
    )
    p.add_argument("--quick", action="store_true", help="4 cases (C = 16 and 1024), 15 repetitions")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repetitions (default 21; quick 15; the house minimum for quoted figures is 15)",
    )
    p.add_argument(
        "--target-s",
        type=float,
        default=None,
        help="seconds per repetition of the fastest implementation (0.05; quick 0.02)",
    )
    p.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="channel counts for both shape families instead of --quick's or the full set's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds for the whole run (also the collectives' timeout)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="record path (default: benchmarks/results/sync-<timestamp>.json)",
    )
    args = p.parse_args(argv)
    args.cases = "quick" if args.quick else "full"
    if args.repeats is None:
        args.repeats = 15 if args.quick else 21
    if args.target_s is None:
        args.target_s = 0.02 if args.quick else 0.05
    if args.repeats < 3:
        p.error(f"--repeats: expected an integer >= 3, got {args.repeats!r}")
    if args.channels and min(args.channels) < 1:
        p.error(f"--channels: expected integers >= 1, got {args.channels!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON record. Returns the exit code."""
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = _harness.loadavg()
    try:
        per_rank = run_ranks(args)
    except Exception:  # a rank's traceback (ProcessRaisedException) or a spawn failure
        traceback.print_exc()
        return 1
    records = combine(per_rank)
    machine = _harness.machine_info()
    # machine_info() describes this (parent) process; the ranks are what ran the cases.
    machine["threads"] = {
        "per_rank": [r["threads"] for r in per_rank],
        "numba_threading_layer": [r["numba_layer"] for r in per_rank],
    }
    record = {
        "benchmark": "bench_sync",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "world_size": WORLD_SIZE,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg": {"start": load_start, "end": _harness.loadavg()},
        "duration_s": time.perf_counter() - started,
        "cases": records,
    }
    path = args.json or RESULTS_DIR / f"sync-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    _harness.write_json(path, record)
    print(
        f"bench_sync: {WORLD_SIZE} gloo ranks, {THREADS_PER_RANK} torch + "
        f"{THREADS_PER_RANK} Numba thread per rank, forward+backward, float32; times are the "
        "slower rank's, per call"
    )
    print(report(records))
    print(
        "sync/local: synchronized / local BatchNorm on the same per-rank shard (1.00 = free); "
        "coll share: all_gather + all_reduce alone / sync"
    )
    print(
        f"load average: start {load_start}, end {record['loadavg']['end']}; "
        f"{record['duration_s']:.0f} s; JSON: {path}"
    )
    return 0 if all(r["valid"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
