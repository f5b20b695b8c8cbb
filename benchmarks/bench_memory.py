"""Peak memory of a training step: torch.nn's BatchNorm + LeakyReLU, the fused layer, in place.

Usage::

    python -m benchmarks.bench_memory [--arms torch fused inplace] [--batch 32] [--size 56]
                                      [--channels 64] [--blocks 10] [--repeats 3]
                                      [--threads 2] [--json PATH]

The network is ``blocks`` x (``Conv2d`` 3x3, padding 1, ``channels`` -> ``channels``, then
BatchNorm and LeakyReLU(0.01)) on a ``(batch, channels, size, size)`` float32 input (default
32 x 64 x 56 x 56, 6.4M values, 24.5 MiB a tensor). Arms:

- ``torch``: ``torch.nn.BatchNorm2d`` then ``torch.nn.LeakyReLU(0.01)``;
- ``torch_inplace_act``: the same with ``LeakyReLU(0.01, inplace=True)`` (not run by default);
- ``fused``: ``batchnorm.BatchNormAct2d(C, "leaky_relu", 0.01)``;
- ``inplace``: ``batchnorm.InPlaceABN2d(C, "leaky_relu", 0.01)``; the convolution's output
  feeds it directly, and it overwrites that output.

Each arm runs in a fresh interpreter (``python -m benchmarks.bench_memory --arm NAME``, run by
this script; the arms are rotated across ``--repeats`` rounds), which:

1. builds the network (seed 0, same weights in every arm), and runs one warm-up training step
   on a batch of ``--warmup-batch`` (default 2) at the full spatial size, so that imports,
   Numba's compile or cache load, the kernels' parallel paths and the allocators' first
   mappings are paid before the measurement;
2. allocates the input and the upstream gradient of the output, then reads the peak resident
   set size ``getrusage(RUSAGE_SELF).ru_maxrss`` and the current one (``VmRSS``);
3. runs one forward and backward (``y.backward(g)``; parameter gradients were set to ``None``);
4. reads ``ru_maxrss`` again.

``growth`` = ``ru_maxrss`` after - before, the figure the issue asks for: how far the step
pushed the process's peak beyond everything before it. As the warm-up's own transient is part
of the "before" peak, ``growth`` slightly understates the step's footprint; ``over current`` =
``ru_maxrss`` after - ``VmRSS`` before does not (it is the larger of the two). Both are in the
record; the ratio to torch's and the issue's target (``inplace`` <= 0.6x ``torch``) use
``growth``, medians over the rounds. Our output cache (``batchnorm.outputs``, buffers of at
least 4 MiB) is left on, as users have it: its buffers count.

What is kept for the backward, per block, in 24.5 MiB tensors: torch.nn keeps the convolution's
output (BatchNorm's input), BatchNorm's output (LeakyReLU's input) and LeakyReLU's output (the
next convolution's input); the fused layer keeps the first and the last; the in-place layer one
tensor, the first overwritten by the last.

Validation: every arm reports the norm of the network's output (read before the backward, which
an in-place layer may use to recompute its input) and of the first and last convolutions'
weight gradients; each must match torch's to a relative 1e-3 (float32 through 10 blocks differ
by ~1e-5 between correct implementations; a wrong activation slope or epsilon by far more). An
arm that differs is INVALID (exit status 1). An arm whose layer is not importable yet is
reported as unavailable.

Timing is not measured here; the step's wall time is in the record for orientation only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import _harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

#: Every arm, in the order of the table; ``DEFAULT_ARMS`` are the issue's.
ARMS = ("torch", "torch_inplace_act", "fused", "inplace")
DEFAULT_ARMS = ("torch", "fused", "inplace")
NEGATIVE_SLOPE = 0.01
#: The issue's target: the in-place arm's growth at most this fraction of torch's.
TARGET = ("inplace", 0.6)
#: Relative tolerance of the cross-arm check (see the module docstring).
RTOL = 1e-3
#: The line of the child's stdout that carries its result.
RESULT_TAG = "BENCH_MEMORY_RESULT "


class Unavailable(Exception):
    """The arm's layer is not importable in this checkout."""


# --------------------------------------------------------------------------- one arm (child)


def _layer(arm: str, channels: int) -> nn.Module:
    if arm == "torch":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(NEGATIVE_SLOPE))
    if arm == "torch_inplace_act":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))
    name = {"fused": "BatchNormAct2d", "inplace": "InPlaceABN2d"}.get(arm)
    if name is None:
        raise ValueError(f"bench_memory: expected an arm in {ARMS}, got {arm!r}.")
    try:
        import batchnorm

        cls = getattr(batchnorm, name)
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"batchnorm.{name} is not importable ({type(err).__name__})") from err
    return cls(channels, activation="leaky_relu", activation_param=NEGATIVE_SLOPE)


def build_network(arm: str, channels: int, blocks: int) -> nn.Module:
    """``blocks`` x (Conv2d 3x3 -> the arm's BatchNorm + LeakyReLU), seed 0, training mode.

    The convolutions are made first with one seed, so every arm has the same weights; the
    normalization layers start at their defaults (weight 1, bias 0).
    """
    torch.manual_seed(0)
    convs = [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks)]
    layers = []
    for conv in convs:
        layers += [conv, _layer(arm, channels)]
    return nn.Sequential(*layers).train()


def _rss_kib() -> int | None:
    """Current resident set size (``VmRSS``) in KiB, or None where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    """One forward and backward; returns the output's norm, read before the backward."""
    y = model(x)
    norm = float(torch.linalg.vector_norm(y.detach()))
    y.backward(g)
    return norm


def measure(
    arm: str, args: argparse.Namespace, build: Callable[[str, int, int], nn.Module] = build_network
) -> dict:
    """The child's work: warm up, then one measured training step; returns the arm's record.

    ``build(arm, channels, blocks)`` makes the network (the tests pass a wrong one).
    """
    threads = _harness.pin_threads(args.threads)
    shape = (args.batch, args.channels, args.size, args.size)
    try:
        model = build(arm, args.channels, args.blocks)
    except Unavailable as err:
        return {"arm": arm, "available": False, "reason": str(err)}
    gen = torch.Generator().manual_seed(1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    t0 = time.perf_counter()
    warm_shape = (args.warmup_batch, *shape[1:])
    _step(model, torch.randn(warm_shape, generator=gen), torch.randn(warm_shape, generator=gen))
    model.zero_grad(set_to_none=True)
    warmup_s = time.perf_counter() - t0

    x = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    gc.collect()
    maxrss_before, rss_before = _maxrss_kib(), _rss_kib()
    t0 = time.perf_counter()
    output_norm = _step(model, x, g)
    step_s = time.perf_counter() - t0
    maxrss_after = _maxrss_kib()

    record = {
        "arm": arm,
        "available": True,
        "threads": threads,
        "maxrss_before_kib": maxrss_before,
        "maxrss_after_kib": maxrss_after,
        "rss_before_kib": rss_before,
        "growth_mib": (maxrss_after - maxrss_before) / 1024,
        "over_current_mib": None if rss_before is None else (maxrss_after - rss_before) / 1024,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "check": {
            "output_norm": output_norm,
            "first_conv_grad_norm": float(convs[0].weight.grad.norm()),
            "last_conv_grad_norm": float(convs[-1].weight.grad.norm()),
        },
    }
    try:
        from batchnorm import output_cache_info

        record["output_cache"] = output_cache_info()._asdict()
    except ImportError:
        pass
    return record


# --------------------------------------------------------------------------- parent


def _child_argv(arm: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.bench_memory", "--arm", arm,
        "--batch", str(args.batch), "--size", str(args.size), "--channels", str(args.channels),
        "--blocks", str(args.blocks), "--warmup-batch", str(args.warmup_batch),
        "--threads", str(args.threads),
    ]  # fmt: skip


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    """Measure ``arm`` in a fresh interpreter; a crash is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            _child_argv(arm, args),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"arm": arm, "available": True, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"arm": arm, "available": True, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["process_s"] = time.perf_counter() - t0
    return result


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-30)


def check_runs(runs: dict[str, list[dict]]) -> dict[str, str | None]:
    """Per available arm, why it is INVALID (a crash, or a check that differs from torch's
    first run), or None."""
    reference = next((r["check"] for r in runs.get("torch", []) if "check" in r), None)
    verdict: dict[str, str | None] = {}
    for arm, results in runs.items():
        reason = None
        for r in results:
            if not r.get("available", True):
                break
            if "error" in r:
                reason = r["error"]
                break
            if reference is None:
                continue
            bad = [k for k, v in r["check"].items() if not _close(v, reference[k])]
            if bad:
                k = bad[0]
                reason = f"{k} {r['check'][k]:.6g} vs torch's {reference[k]:.6g}"
                break
        verdict[arm] = reason
    return verdict


def summarize_runs(runs: dict[str, list[dict]], verdict: dict[str, str | None]) -> dict:
    """Per arm: median, min and max of ``growth`` and ``over current`` (MiB), and the ratio of
    the median growth to torch's."""
    out = {}
    for arm, results in runs.items():
        ok = [r for r in results if r.get("available", True) and "error" not in r]
        if not ok or verdict.get(arm) is not None:
            continue
        out[arm] = {}
        for key in ("growth_mib", "over_current_mib"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                out[arm][key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
    base = out.get("torch", {}).get("growth_mib", {}).get("median")
    for s in out.values():
        # None without a torch arm, or when torch's step did not raise the peak (tiny shapes).
        ok = base is not None and base > 0 and "growth_mib" in s
        s["ratio_to_torch"] = s["growth_mib"]["median"] / base if ok else None
    return out


def format_report(summary: dict, runs: dict[str, list[dict]], verdict: dict) -> str:
    """The table: one row per arm."""
    header = ["arm", "valid", "growth MiB (min-max)", "over current MiB", "growth / torch"]
    rows = []
    for arm, results in runs.items():
        if results and not results[0].get("available", True):
            rows.append([arm, "unavailable", "-", "-", "-"])
            continue
        if verdict.get(arm) is not None:
            rows.append([arm, "INVALID", "-", "-", "-"])
            continue
        s = summary[arm]
        gm, oc = s["growth_mib"], s.get("over_current_mib")
        rows.append(
            [
                arm,
                "ok",
                f"{gm['median']:.0f} ({gm['min']:.0f}-{gm['max']:.0f})",
                "-" if oc is None else f"{oc['median']:.0f}",
                "-" if s["ratio_to_torch"] is None else f"{s['ratio_to_torch']:.2f}",
            ]
        )
    return _harness.format_table(header, rows, "<<>>>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_memory", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--size", type=int, default=56, help="height and width (default 56)")
    p.add_argument("--channels", type=int, default=64, help="channels (default 64)")
    p.add_argument("--blocks", type=int, default=10, help="conv + norm blocks (default 10)")
    p.add_argument(
        "--warmup-batch", type=int, default=2, help="batch of the warm-up step (default 2)"
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of all arms (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch and Numba threads (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="per process, s (default 600)")
    p.add_argument("--json", type=Path, default=None, help="JSON record path")
    p.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "size", "channels", "blocks", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)!r}.")
    if args.warmup_batch < 2:
        p.error(
            "--warmup-batch: expected at least 2 (BatchNorm needs 2 values per channel), "
            f"got {args.warmup_batch!r}."
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every arm in its own process; exit status 1 if any arm is INVALID."""
    args = parse_args(argv)
    if args.arm is not None:  # the child
        print(RESULT_TAG + json.dumps(measure(args.arm, args)), flush=True)
        return 0

    started = _dt.datetime.now()
    loadavg_start = _harness.loadavg()
    shape = (args.batch, args.channels, args.size, args.size)
    tensor_mib = math.prod(shape) * 4 / 2**20
    print(
        f"{args.blocks} x (Conv2d 3x3 -> BatchNorm2d -> LeakyReLU({NEGATIVE_SLOPE})) on "
        f"{shape} float32 ({tensor_mib:.1f} MiB a tensor); threads {args.threads}; "
        f"{args.repeats} round(s), one fresh process per arm and round"
    )
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    t_run = time.perf_counter()
    for rnd in range(args.repeats):
        shift = rnd % len(args.arms)
        for arm in args.arms[shift:] + args.arms[:shift]:
            result = run_arm(arm, args)
            runs[arm].append(result)
            if not result.get("available", True):
                msg = f"unavailable ({result['reason']})"
            elif "error" in result:
                msg = f"ERROR {result['error']}"
            else:
                msg = f"growth {result['growth_mib']:.0f} MiB, step {result['step_s']:.1f} s"
            print(f"[round {rnd + 1}] {arm}: {msg}", file=sys.stderr, flush=True)

    verdict = check_runs(runs)
    if not any("check" in r for r in runs.get("torch", [])):
        print("note: no valid torch arm in this run, so the arms were not checked against it")
    summary = summarize_runs(runs, verdict)
    print()
    print(format_report(summary, runs, verdict))
    print()
    arm, limit = TARGET
    ratio = summary.get(arm, {}).get("ratio_to_torch")
    if ratio is None:
        print(f"target {arm} <= {limit}x torch: not measured")
    else:
        verdict_text = "PASS" if ratio <= limit else "FAIL"
        print(f"target {arm} <= {limit}x torch: {verdict_text} ({ratio:.2f})")
    for a, why in verdict.items():
        if why is not None:
            print(f"{a}: INVALID ({why})")
    print(
        "growth: ru_maxrss after the step - before it (MiB); over current: ru_maxrss after - "
        f"VmRSS before; medians over rounds. {time.perf_counter() - t_run:.0f} s"
    )

    record = {
        "schema": 1,
        "benchmark": "bench_memory",
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": _harness.loadavg(),
        "shape": list(shape),
        "tensor_mib": tensor_mib,
        "target": {"arm": arm, "max_ratio_to_torch": limit, "ratio": ratio},
        "invalid_reason": {a: why for a, why in verdict.items() if why is not None},
        "summary": summary,
        "runs": runs,
    }
    path = args.json or RESULTS_DIR / f"memory-{started.strftime('%Y%m%d-%H%M%S')}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if record["invalid_reason"] else 0


if __name__ == "__main__":
    sys.exit(main())
