"""Our ``BatchNorm*d`` modules against ``torch.nn``'s, in one process, as users call them.

Usage::

    python -m benchmarks.bench_modules [--shapes quick|full] [--threads N] [--repeats K]
                                       [--json PATH] [--compile] [--filter TEXT ...]

Per case (see :mod:`benchmarks.cases`):

1. Build one module per implementation with identical parameters and running buffers.
2. Validate: the first call of each implementation (which also pays Numba's compile or cache
   load, or torch.compile's compile) is compared with torch.nn's first call: the output, the
   updated running buffers in training, and the gradients for ``fwd_bwd``. A mismatch marks
   the implementation INVALID and it is not timed.
3. Warm up, pick how many calls make one repetition, then time repetitions alternating
   implementations A B A B ... and report medians and interquartile ranges.

Outputs are dropped after every call, as in a training loop; their allocation is part of the
figure. torch's come from fresh pages each time; ours of at least 4 MiB come from
``batchnorm.outputs``' cache (the previous call's buffer, once its tensor is gone). ``--uncached``
adds a column with ours bypassing the cache, i.e. what the cache saves.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import _harness
from .cases import CASE_SETS, Case

#: Tolerances for validation, per dtype (float32 as the project's test suite uses).
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Factory = Callable[[Case, dict], torch.nn.Module]


# --------------------------------------------------------------------------- implementations


def _torch_nn(case: Case, state: dict) -> torch.nn.Module:
    module = getattr(torch.nn, case.kind)(case.num_features, dtype=case.torch_dtype)
    module.load_state_dict(state)
    return module


def _ours(case: Case, state: dict) -> torch.nn.Module:
    import batchnorm

    module = getattr(batchnorm, case.kind)(case.num_features, dtype=case.torch_dtype)
    module.load_state_dict(state)
    return module


def _torch_compiled(case: Case, state: dict) -> torch.nn.Module:
    return torch.compile(_torch_nn(case, state))


# Our module with every output allocated afresh (batchnorm.outputs bypassed while it runs):
# the ratio "batchnorm-uncached/ours" is what the output cache saves.
UNCACHED = "batchnorm-uncached"


def implementations(compiled: bool, stand_in: bool, uncached: bool = False) -> dict[str, Factory]:
    """The implementations to compare; ``"torch"`` is the reference and comes first."""
    impls: dict[str, Factory] = {"torch": _torch_nn, "batchnorm": _torch_nn if stand_in else _ours}
    if compiled:
        impls["torch.compile"] = _torch_compiled
    if uncached and not stand_in:
        impls[UNCACHED] = _ours
    return impls


def _check_ours_available(kinds: set[str]) -> str | None:
    try:
        import batchnorm
    except ImportError as err:
        return f"cannot import batchnorm ({err})"
    missing = sorted(k for k in kinds if not hasattr(batchnorm, k))
    if missing:
        return f"batchnorm has no {', '.join(missing)} yet"
    return None


# --------------------------------------------------------------------------- one case


def make_inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Input ``x``, upstream gradient ``g`` and the module state shared by all implementations.

    ``x`` has a per-channel offset so that per-channel statistics are exercised; the running
    buffers are away from their defaults so eval mode is not the identity.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype, c = case.torch_dtype, case.num_features

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    offset_shape = (1, c) + (1,) * (len(case.shape) - 2)
    x = randn(*case.shape) * 2.0 + randn(*offset_shape)
    x = x.contiguous(memory_format=case.torch_memory_format)
    g = randn(*case.shape).contiguous(memory_format=case.torch_memory_format)
    state = {
        "weight": 1.0 + 0.1 * randn(c),
        "bias": 0.1 * randn(c),
        "running_mean": 0.1 * randn(c),
        "running_var": 4.0 + torch.rand(c, generator=gen, dtype=dtype),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    return x, g, state


def _clear_grads(module: torch.nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def first_call(
    module: torch.nn.Module, case: Case, x: torch.Tensor, g: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float]:
    """The validation call: everything a user can observe after one call of ``case.mode``."""
    _clear_grads(module, x)
    t0 = time.perf_counter()
    if case.mode == "eval_fwd":
        with torch.no_grad():
            y = module(x)
    else:
        y = module(x)
        if case.mode == "fwd_bwd":
            y.backward(g)
    elapsed = time.perf_counter() - t0
    observed = {"output": y.detach()}
    if case.mode == "fwd_bwd":
        params = dict(module.named_parameters())
        observed["grad input"] = x.grad
        observed["grad weight"] = params[_param_name(params, "weight")].grad
        observed["grad bias"] = params[_param_name(params, "bias")].grad
    if case.mode != "eval_fwd":
        buffers = dict(module.named_buffers())
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            observed[name] = buffers[_param_name(buffers, name)].detach().clone()
    _clear_grads(module, x)
    return observed, elapsed


def _param_name(named: dict, leaf: str) -> str:
    # A compiled module prefixes names ("_orig_mod.weight"); match on the last component.
    (key,) = [k for k in named if k.split(".")[-1] == leaf]
    return key


def mismatch(got: dict, want: dict, tol: dict) -> str | None:
    """The first observed quantity of ``got`` not close to ``want``, described; else ``None``."""
    for key, w in want.items():
        o = got.get(key)
        if o is None:
            return f"{key}: missing"
        try:
            # The observed dtype may be the data's (float32) where the reference is float64.
            torch.testing.assert_close(o.to(w.dtype), w, **tol)
        except AssertionError as err:
            first = " ".join(str(err).split("\n")[:4])
            return f"{key}: {first}"
    return None


def layout_notes(got: dict, case: Case) -> list[str]:
    """Outputs that are not in the input's memory format (valid, but a drop-in should keep it)."""
    fmt = case.torch_memory_format
    return [
        f"{key} is not in {case.memory_format} memory format"
        for key in ("output", "grad input")
        if key in got and not got[key].is_contiguous(memory_format=fmt)
    ]


def _to_float64(observed: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in observed.items()}


def float64_reference(case: Case, x: torch.Tensor, g: torch.Tensor, state: dict) -> dict:
    """torch.nn's first call on the same data in float64: the arbiter for float32 mismatches."""
    case64 = replace(case, dtype="float64")
    module = _torch_nn(case64, _to_float64(state))
    module.train(case.mode != "eval_fwd")
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    observed, _ = first_call(module, case64, x64, g.double())
    return observed


def max_deviation(got: dict, want: dict) -> dict[str, float]:
    """Largest absolute difference per floating quantity."""
    return {
        k: float((got[k].double() - w.double()).abs().max())
        for k, w in want.items()
        if w.is_floating_point() and w.numel()
    }


def make_runner(
    module: torch.nn.Module, case: Case, x: torch.Tensor, g: torch.Tensor, uncached: bool = False
) -> _harness.Runner:
    """``run(n)``: ``n`` calls of the mode exactly as a user writes them; outputs are dropped.

    ``uncached``: the calls run with batchnorm's output cache bypassed (fresh pages every call).
    """
    run = _calls(module, case, x, g)
    if not uncached:
        return run
    from batchnorm import outputs

    def run_uncached(n: int) -> None:
        with outputs.bypassed():
            run(n)

    return run_uncached


def _calls(
    module: torch.nn.Module, case: Case, x: torch.Tensor, g: torch.Tensor
) -> _harness.Runner:
    params = list(module.parameters())
    if case.mode == "eval_fwd":

        def run(n: int) -> None:
            with torch.no_grad():
                for _ in range(n):
                    module(x)
    elif case.mode == "train_fwd":

        def run(n: int) -> None:
            for _ in range(n):
                module(x)
    else:

        def run(n: int) -> None:
            for _ in range(n):
                # zero_grad(set_to_none=True), torch's default: backward allocates fresh grads.
                x.grad = None
                for p in params:
                    p.grad = None
                module(x).backward(g)

    return run


def bench_case(case: Case, impls: dict[str, Factory], args: argparse.Namespace) -> dict:
    """Validate and time one case; returns its JSON record."""
    if "torch.compile" in impls:
        torch._dynamo.reset()  # a fresh compile per case, so no recompile limit is ever hit
    loadavg = list(os.getloadavg())
    x, g, state = make_inputs(case, args.seed)
    if case.mode != "eval_fwd":
        x.requires_grad_(True)

    modules, observed, first_s, errors = {}, {}, {}, {}
    for name, factory in impls.items():
        try:
            module = factory(case, state)
            module.train(case.mode != "eval_fwd")
            observed[name], first_s[name] = first_call(module, case, x, g)
            modules[name] = module
        except Exception as err:  # noqa: BLE001 - any failure of ours is a finding, not a crash
            if name == "torch":
                raise
            errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
            if args.verbose:
                traceback.print_exc()

    tol = TOL[case.torch_dtype]
    validity: dict[str, str | None] = {}
    notes: dict[str, list[str]] = {}
    reference64 = None
    for name in impls:
        if name in errors:
            validity[name], notes[name] = f"first call raised {errors[name]}", []
            continue
        reason = mismatch(observed[name], observed["torch"], tol)
        notes[name] = layout_notes(observed[name], case)
        if reason is not None and case.dtype == "float32":
            # torch.nn's own float32 reductions can be the inaccurate side: measured on
            # (64, 64, 56, 56) channels_last, torch's grad weight is 0.014 away from float64
            # (a sum of 8e5 terms), ours 3e-5. So a float32 mismatch is arbitrated by
            # torch.nn in float64, with the same tolerance.
            if reference64 is None:
                reference64 = float64_reference(case, x, g, state)
            if mismatch(_to_float64(observed[name]), reference64, tol) is None:
                dev = max_deviation(observed["torch"], reference64)
                worst = max(dev, key=dev.get)
                notes[name].append(
                    f"differs from torch.nn float32 ({reason.split(':')[0]}) but matches "
                    f"torch.nn float64; torch.nn float32 is off by up to {dev[worst]:.2g} "
                    f"({worst})"
                )
                reason = None
            else:
                reason += " (and does not match torch.nn float64 either)"
        validity[name] = reason
    del observed

    timed = {k: m for k, m in modules.items() if validity[k] is None}
    runners = {k: make_runner(m, case, x, g, uncached=k == UNCACHED) for k, m in timed.items()}
    number, warm = _harness.calibrate_number(runners, args.target_ms / 1e3, args.warmup_s)
    samples = _harness.interleaved_samples(runners, args.repeats, number)

    record = {
        "case": case.to_dict(),
        "loadavg_at_start": loadavg,
        "valid": validity["batchnorm"] is None,
        "invalid_reason": {k: v for k, v in validity.items() if v is not None},
        "notes": {k: v for k, v in notes.items() if v},
        "number": number,
        "first_call_s": first_s,
        "warmup_s": warm,
        "times": {k: {**_harness.summarize(s).to_dict(), "samples": s} for k, s in samples.items()},
        "ratio": {},
        "paired_ratio": {},
    }
    if "batchnorm" in samples:
        ours = samples["batchnorm"]
        for k, s in samples.items():
            if k == "batchnorm":
                continue
            times = record["times"]
            record["ratio"][k] = times[k]["median"] / times["batchnorm"]["median"]
            paired = _harness.summarize([a / b for a, b in zip(s, ours, strict=True)])
            record["paired_ratio"][k] = paired.to_dict()
    del modules, runners, x, g
    gc.collect()
    return record


# --------------------------------------------------------------------------- report


def _fmt_pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.0f}%"


def report_rows(
    records: list[dict], baselines: list[str]
) -> tuple[list[str], list[list[str]], str]:
    """Table header, rows and alignment; headline columns first."""
    header = ["case", "valid"]
    for b in baselines:
        header += [f"{b}/ours", "paired IQR"]
    header += ["ours roof", "torch roof", "torch median (IQR)", "ours median (IQR)"]
    rows = []
    for r in records:
        times = r["times"]
        ours_notes = r["notes"].get("batchnorm", [])
        if not r["valid"]:
            valid = "INVALID"
        else:
            valid = "ok" + ("64" if any("float64" in n for n in ours_notes) else "")
            valid += "*" if any("memory format" in n for n in ours_notes) else ""
        row = [r["case"]["name"], valid]
        for b in baselines:
            if b in r["ratio"]:
                p = r["paired_ratio"][b]
                row += [f"{r['ratio'][b]:.2f}", f"{p['q1']:.2f}-{p['q3']:.2f}"]
            else:
                row += ["-", "-"]
        row += [
            _fmt_pct(r["roofline"].get("batchnorm")),
            _fmt_pct(r["roofline"].get("torch")),
            _harness.format_time(times.get("torch")),
            _harness.format_time(times.get("batchnorm")),
        ]
        rows.append(row)
    align = "<<" + ">>" * len(baselines) + ">>>>"
    return header, rows, align


def geomean_ratios(records: list[dict], baseline: str) -> dict[str, float]:
    """Geometric mean of ``baseline/ours`` over valid cases, per mode and over all."""
    groups: dict[str, list[float]] = {}
    for r in records:
        if r["valid"] and baseline in r["ratio"]:
            for key in (r["case"]["mode"], "all"):
                groups.setdefault(key, []).append(math.log(r["ratio"][baseline]))
    return {k: math.exp(sum(v) / len(v)) for k, v in groups.items()}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_modules", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--shapes",
        choices=sorted(CASE_SETS),
        default="quick",
        help="case set (default: quick, about a minute)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch and Numba intra-op threads (default: 2)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=21,
        help="timed repetitions per implementation, >= 15 (default: 21)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="JSON record path (default: benchmarks/results/<timestamp>.json)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(torch.nn module); compiles per case, slow",
    )
    p.add_argument(
        "--filter",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="keep cases whose name contains every TEXT (e.g. --filter cl fwd_bwd)",
    )
    p.add_argument(
        "--uncached",
        action="store_true",
        help="also time ours with the output cache bypassed (fresh output pages every call)",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--target-ms",
        type=float,
        default=20.0,
        help="length of one repetition; fast calls are batched up to it (default: 20)",
    )
    p.add_argument(
        "--warmup-s",
        type=float,
        default=0.2,
        help="warm-up time per case after validation (default: 0.2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stand-in",
        action="store_true",
        help="use torch.nn as 'ours' too (harness self-test; numbers mean nothing)",
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed calls")
    args = p.parse_args(argv)
    if args.repeats < 15:
        p.error(f"--repeats: expected at least 15, got {args.repeats!r}.")
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads!r}.")
    return args


def main(argv: list[str] | None = None, extra: dict[str, Factory] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 if any case is INVALID).

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).
        extra: More implementations to time against ours, by name (``bench_versions`` passes
            another commit's layers this way); each gets its own ``name/ours`` column.
    """
    args = parse_args(argv)
    cases = CASE_SETS[args.shapes]()
    if args.filter:
        cases = [c for c in cases if all(t in c.name for t in args.filter)]
    if args.list or not cases:
        for c in cases:
            print(c.name)
        return 0 if cases else 2

    if not args.stand_in:
        problem = _check_ours_available({c.kind for c in cases})
        if problem:
            print(
                f"bench_modules: {problem}. Use --stand-in to exercise the harness with "
                "torch.nn on both sides.",
                file=sys.stderr,
            )
            return 2
    impls = {**implementations(args.compile, args.stand_in, args.uncached), **(extra or {})}
    baselines = [k for k in impls if k != "batchnorm"]

    started = _dt.datetime.now()
    loadavg_start = list(os.getloadavg())
    threads = _harness.pin_threads(args.threads)
    print(
        f"threads: torch={threads['torch']} numba={threads['numba']}   "
        f"load average at start: {' '.join(f'{v:.2f}' for v in loadavg_start)}"
    )
    if loadavg_start[0] > 0.5:
        print(
            f"WARNING: the machine is busy (1-min load {loadavg_start[0]:.2f} on "
            f"{os.cpu_count()} cores); expect noisy times and quote ratios only."
        )
    if args.stand_in:
        print("STAND-IN: 'ours' is torch.nn; ratios only show the harness's noise floor.")
    bw_start = _harness.copy_bandwidth()
    print(f"copy bandwidth: {bw_start['bytes_per_s'] / 1e9:.1f} GB/s (read+write, 50 MB copy_)")

    records = []
    t_run = time.perf_counter()
    for i, case in enumerate(cases, 1):
        rec = bench_case(case, impls, args)
        records.append(rec)
        tt, to = (_harness.format_time(rec["times"].get(k)) for k in ("torch", "batchnorm"))
        msg = (
            f"ratio {rec['ratio']['torch']:.2f}  torch {tt}  ours {to}"
            if rec["valid"]
            else f"INVALID: {rec['invalid_reason']['batchnorm']}"
        )
        print(f"[{i}/{len(cases)}] {case.name}: {msg}", file=sys.stderr, flush=True)

    bw_end = _harness.copy_bandwidth()
    # Noise only ever slows a copy, so the faster of the two measurements is the better estimate
    # of what memory allows.
    bandwidth = max(bw_start["bytes_per_s"], bw_end["bytes_per_s"])
    for rec in records:
        traffic = rec["case"]["traffic_bytes"]
        rec["roofline"] = {k: (traffic / bandwidth) / t["median"] for k, t in rec["times"].items()}

    header, rows, align = report_rows(records, baselines)
    loadavg_end = list(os.getloadavg())
    print()
    print(_harness.format_table(header, rows, align))
    print()
    geo = {b: geomean_ratios(records, b) for b in baselines}
    for b, by_mode in geo.items():
        if by_mode:
            print(
                f"geometric mean {b}/ours: " + "  ".join(f"{k} {v:.2f}" for k, v in by_mode.items())
            )
    print(
        f"copy bandwidth used for roofline: {bandwidth / 1e9:.1f} GB/s "
        f"(start {bw_start['bytes_per_s'] / 1e9:.1f}, end {bw_end['bytes_per_s'] / 1e9:.1f}); "
        f"load average at end: {' '.join(f'{v:.2f}' for v in loadavg_end)}; "
        f"{time.perf_counter() - t_run:.0f} s"
    )
    n_invalid = sum(not r["valid"] for r in records)
    if n_invalid:
        print(f"{n_invalid} INVALID case(s): ours does not match torch.nn there; not timed.")
    all_notes = [n for r in records for n in r["notes"].get("batchnorm", [])]
    if any("float64" in n for n in all_notes):
        print(
            "ok64 = ours differs from torch.nn float32 beyond tolerance but matches torch.nn "
            "float64 (torch's float32 reduction is the inaccurate side; see JSON notes)."
        )
    if any("memory format" in n for n in all_notes):
        print("* = an output or grad is not in the input's memory format (see JSON notes).")

    record = {
        "schema": 1,
        "benchmark": "bench_modules",
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
        "copy_bandwidth": {"bytes_per_s": bandwidth, "start": bw_start, "end": bw_end},
        "implementations": list(impls),
        "stand_in": args.stand_in,
        "tolerance": {str(k): v for k, v in TOL.items()},
        "geomean_ratio": geo,
        "cases": records,
    }
    path = args.json or RESULTS_DIR / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if n_invalid else 0


if __name__ == "__main__":
    sys.exit(main())
