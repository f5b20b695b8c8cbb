"""The whole benchmark suite in one process: one JSON record and one plot.

Usage::

    python -m benchmarks.run_all [--suite quick|full|smoke] [--threads N] [--json PATH]
                                 [--sections modules threads kernels sweep compile first_call]

Sections (each a printed table and a key of the JSON's ``sections``):

- ``modules``: :mod:`benchmarks.bench_modules`, ours vs ``torch.nn`` eager, at ``--threads``.
- ``threads``: the quick module set again at the other thread count (1 if ``--threads`` is 2),
  and the scaling table ``time(1 thread) / time(2 threads)`` for torch and ours.
- ``kernels``: :mod:`benchmarks.bench_kernels`, preallocated outputs, against the roofline.
- ``sweep``: :mod:`benchmarks.bench_sweep`, 1e3 to 6e7 elements, crossover, PNG plot.
- ``compile``: ours vs ``torch.compile(torch.nn.BatchNormXd)`` on the headline shapes (full).
- ``first_call``: Numba's first-call cost in a fresh interpreter, cold (empty
  ``NUMBA_CACHE_DIR``) and warm (the cache the cold run wrote) (full).

``quick`` (about 3 minutes on an idle 2-core machine) runs modules, threads, kernels and a
6-point sweep; ``full`` (about 12 minutes) every section with the full case sets and a 12-point
sweep over three families; ``smoke`` (seconds, numbers meaningless) is for the test suite. The
end of the output checks the issue's targets (``targets`` in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _harness, bench_kernels, bench_modules, bench_sweep
from .cases import CASE_SETS, kernel_cases, make_case, sweep_sizes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTIONS = ("modules", "threads", "kernels", "sweep", "compile", "first_call")

#: Per suite: case sets, sweep extent, timing parameters and the sections run by default.
SUITES = {
    "quick": {
        "modules": "quick",
        "threads": "quick",
        "kernels": "quick",
        "sweep": {"families": ["c64-nc", "c256-2d"], "points": 7, "max_size": 1e7},
        "compile": [],
        "sections": ("modules", "threads", "kernels", "sweep"),
        "repeats": 15,
        "target_s": 0.02,
        "warmup_s": 0.1,
        "bandwidth": {},
    },
    "full": {
        "modules": "full",
        "threads": "quick",
        "kernels": "full",
        "sweep": {"families": ["c64-nc", "c64-cl", "c256-2d"], "points": 12, "max_size": 6e7},
        "compile": [
            ((64, 64, 56, 56), "contiguous", "train_fwd"),
            ((64, 64, 56, 56), "contiguous", "eval_fwd"),
            ((64, 64, 56, 56), "contiguous", "fwd_bwd"),
            ((32, 128, 28, 28), "channels_last", "fwd_bwd"),
        ],
        "sections": SECTIONS,
        "repeats": 21,
        "target_s": 0.02,
        "warmup_s": 0.2,
        "bandwidth": {},
    },
    "smoke": {
        "modules": "smoke",
        "threads": "smoke",
        "kernels": "smoke",
        "sweep": {"families": ["c64-nc", "c256-2d"], "points": 2, "max_size": 3e3},
        "compile": [],
        "sections": ("modules", "threads", "kernels", "sweep"),
        "repeats": 3,
        "target_s": 0.001,
        "warmup_s": 0.01,
        "bandwidth": {"nbytes": 4_000_000, "repeats": 5},
    },
}

#: The issue's targets, float32: (what, mode filter, size filter, threshold on torch/ours).
TARGETS = [
    ("train forward >= 3x torch, >= 1M elements", "train_fwd", "large", 3.0),
    ("forward+backward >= 2.5x torch, >= 1M elements", "fwd_bwd", "large", 2.5),
    ("eval forward never slower than torch", "eval_fwd", "any", 1.0),
    ("every shape < 1M elements never slower than torch", None, "small", 1.0),
]
LARGE = 1_000_000
ROOFLINE_TARGET = 0.70


# --------------------------------------------------------------------------- sections


def run_module_cases(
    cases, impls: dict, repeats: int, target_s: float, warmup_s: float, bw_kwargs: dict
) -> dict:
    """bench_modules.bench_case over ``cases``, with the roofline and the printed table."""
    args = argparse.Namespace(
        repeats=repeats, target_ms=target_s * 1e3, warmup_s=warmup_s, seed=0, verbose=False
    )
    bw_start = _harness.copy_bandwidth(**bw_kwargs)
    records = []
    for i, case in enumerate(cases, 1):
        canary = _harness.canary()
        t_case = time.perf_counter()
        rec = bench_modules.bench_case(case, impls, args)
        rec["canary_s"] = [canary, _harness.canary()]
        rec["contended"] = max(rec["canary_s"]) > _harness.CONTENDED_CANARY_S
        rec["wall_s"] = time.perf_counter() - t_case
        records.append(rec)
        shown = ", ".join(f"{k}/ours {v:.2f}" for k, v in rec["ratio"].items())
        msg = shown if rec["valid"] else f"INVALID: {rec['invalid_reason'].get('batchnorm')}"
        print(f"[{i}/{len(cases)}] {case.name}: {msg}", file=sys.stderr, flush=True)
    bw_end = _harness.copy_bandwidth(**bw_kwargs)
    bandwidth = max(bw_start["bytes_per_s"], bw_end["bytes_per_s"])
    for rec in records:
        rec["roofline"] = _harness.roofline(rec["case"]["traffic_bytes"], bandwidth, rec["times"])
    baselines = [k for k in impls if k != "batchnorm"]
    header, rows, align = bench_modules.report_rows(records, baselines)
    for row, rec in zip(rows, records, strict=True):
        row[1] += "~" if rec["contended"] else ""
    print(_harness.format_table(header, rows, align))
    print(_harness.contended_summary(records))
    geo = {b: bench_modules.geomean_ratios(records, b) for b in baselines}
    for b, by_mode in geo.items():
        if by_mode:
            print(
                f"geometric mean {b}/ours: " + "  ".join(f"{k} {v:.2f}" for k, v in by_mode.items())
            )
    print(f"roofline: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
    return {
        "copy_bandwidth": {"bytes_per_s": bandwidth, "start": bw_start, "end": bw_end},
        "implementations": list(impls),
        "cases": records,
        "geomean_ratio": geo,
    }


def thread_scaling(at: dict[int, dict]) -> list[dict]:
    """Per case present at every thread count: times and ``time(1) / time(n)`` per impl."""
    counts = sorted(at)
    by_name = {n: {r["case"]["name"]: r for r in at[n]["cases"]} for n in counts}
    rows = []
    for name in by_name[counts[0]]:
        recs = [by_name[n].get(name) for n in counts]
        if any(r is None or not r["valid"] for r in recs):
            continue
        row = {"case": name, "threads": counts, "median_s": {}, "speedup": {}, "ratio": {}}
        for impl in ("torch", "batchnorm"):
            med = [r["times"][impl]["median"] for r in recs]
            row["median_s"][impl] = med
            row["speedup"][impl] = med[0] / med[-1]
        row["ratio"] = [r["ratio"].get("torch") for r in recs]
        row["contended"] = any(r.get("contended") for r in recs)
        rows.append(row)
    return rows


def format_scaling(rows: list[dict]) -> str:
    """Printed thread-scaling table."""
    if not rows:
        return "(no case valid at both thread counts)"
    lo, hi = rows[0]["threads"][0], rows[0]["threads"][-1]
    header = ["case", f"torch {lo}->{hi} thr", f"ours {lo}->{hi} thr",
              f"torch/ours @{lo}", f"torch/ours @{hi}"]  # fmt: skip
    body = [
        [
            r["case"] + ("~" if r.get("contended") else ""),
            f"{r['speedup']['torch']:.2f}x",
            f"{r['speedup']['batchnorm']:.2f}x",
            f"{r['ratio'][0]:.2f}",
            f"{r['ratio'][-1]:.2f}",
        ]
        for r in rows
    ]
    table = _harness.format_table(header, body, "<>>>>")
    if any(r.get("contended") for r in rows):
        table += "\n~ = contended at one of the thread counts: do not quote that row"
    return table


_FIRST_CALL_CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch, batchnorm
res = {"import_s": time.perf_counter() - t0}

def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t

if sys.argv[1] == "warmup":
    from batchnorm import kernels
    res["kernels_warmup_s"] = timed(kernels.warmup)
    print("FIRSTCALL " + json.dumps(res))
    raise SystemExit

torch.manual_seed(0)
# A small input (the path for small sizes) and a large one (the parallel kernels), each in
# the order a training script meets them: train forward, backward, then eval; channels-last.
for tag, shape in (("small", (8, 16, 10, 10)), ("large", (32, 64, 28, 28))):
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    bn = batchnorm.BatchNorm2d(shape[1])
    out = {}
    res[f"{tag}_train_fwd_s"] = timed(lambda: out.setdefault("y", bn(x)))
    res[f"{tag}_backward_s"] = timed(lambda: out["y"].backward(g))
    bn.eval()
    with torch.no_grad():
        res[f"{tag}_eval_fwd_s"] = timed(lambda: bn(x))
    bn.train()
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    res[f"{tag}_cl_fwd_bwd_s"] = timed(lambda: bn(xc).backward(g))
    steady = [timed(lambda: bn(x).backward(g)) for _ in range(20)]
    res[f"{tag}_steady_fwd_bwd_s"] = statistics.median(steady)
print("FIRSTCALL " + json.dumps(res))
"""

#: The first calls summed into ``first_calls_total_s``.
FIRST_CALLS = [
    f"{tag}_{what}_s"
    for tag in ("small", "large")
    for what in ("train_fwd", "backward", "eval_fwd", "cl_fwd_bwd")
]


def first_call_cost(timeout_s: float = 600.0) -> dict:
    """First-call cost of Numba in fresh interpreters: cold cache, then warm.

    ``modules``: ``python -c`` imports torch and batchnorm, then times the first train forward,
    backward, eval forward and channels-last forward+backward of a BatchNorm2d on a small
    (8, 16, 10, 10) and a large (32, 64, 28, 28) input, and each one's steady-state
    forward+backward. ``kernels_warmup``: a fresh interpreter times
    ``batchnorm.kernels.warmup()`` (every kernel, float32 and float64). Each uses its own fresh
    temporary ``NUMBA_CACHE_DIR``: the ``cold`` run compiles and writes the cache, the ``warm``
    run loads it. ``wall_s`` is the whole child process, interpreter start included.
    """
    out: dict = {"shapes": {"small": [8, 16, 10, 10], "large": [32, 64, 28, 28]}}
    for what in ("modules", "warmup"):
        key = "modules" if what == "modules" else "kernels_warmup"
        out[key] = {}
        with tempfile.TemporaryDirectory(prefix="bn-numba-cache-") as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            for label in ("cold", "warm"):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c", _FIRST_CALL_CHILD, what],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                    check=False,
                )
                wall = time.perf_counter() - t0
                line = next(
                    (ln for ln in proc.stdout.splitlines() if ln.startswith("FIRSTCALL ")), None
                )
                if proc.returncode != 0 or line is None:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    out[key][label] = {"error": f"exit {proc.returncode}: {err}", "wall_s": wall}
                    continue
                res = json.loads(line[len("FIRSTCALL ") :])
                if what == "modules":
                    res["first_calls_total_s"] = sum(res[k] for k in FIRST_CALLS)
                res["wall_s"] = wall
                out[key][label] = res
    return out


def format_first_call(fc: dict) -> str:
    """Printed first-call tables: module calls, then kernels.warmup()."""
    keys = ["import_s", *FIRST_CALLS, "first_calls_total_s", "small_steady_fwd_bwd_s", "wall_s"]
    header = ["cache", "import", "S train", "S bwd", "S eval", "S cl f+b", "L train", "L bwd",
              "L eval", "L cl f+b", "all first", "S steady f+b", "process"]  # fmt: skip
    lines = [
        f"first calls, fresh interpreter; S = small {tuple(fc['shapes']['small'])}, "
        f"L = large {tuple(fc['shapes']['large'])}:"
    ]
    rows = []
    for label in ("cold", "warm"):
        r = fc["modules"].get(label, {})
        if "error" in r:
            rows.append([label, r["error"][:100]] + [""] * (len(keys) - 1))
        else:
            rows.append([label] + [_fmt_s(r.get(k)) for k in keys])
    lines.append(_harness.format_table(header, rows, "<" + ">" * len(keys)))
    rows = []
    for label in ("cold", "warm"):
        r = fc["kernels_warmup"].get(label, {})
        if "error" in r:
            rows.append([label, r["error"][:100], "", ""])
        else:
            rows.append([label] + [_fmt_s(r.get(k)) for k in ("import_s", "kernels_warmup_s",
                                                                "wall_s")])  # fmt: skip
    lines.append("")
    lines.append(_harness.format_table(["cache", "import", "kernels.warmup()", "process"],
                                       rows, "<>>>"))  # fmt: skip
    return "\n".join(lines)


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} s" if v >= 0.1 else f"{v * 1e3:.3g} ms" if v >= 1e-4 else f"{v * 1e6:.3g} us"


def contention_check(threads: int, bw_kwargs: dict) -> dict:
    """Copy bandwidth at 1 thread and at ``threads``: when more threads copy *slower*, another
    job holds a core and every parallel region waits for a scheduler time slice (times then
    cluster at multiples of the 4 ms tick). The load average alone does not say this."""
    by_threads = {}
    for n in sorted({1, threads}):
        _harness.pin_threads(n)
        by_threads[n] = _harness.copy_bandwidth(**bw_kwargs)["bytes_per_s"]
    one, many = by_threads[1], by_threads[threads]
    contended = threads > 1 and many < one
    msg = f"copy bandwidth: 1 thread {one / 1e9:.1f} GB/s, {threads} threads {many / 1e9:.1f} GB/s"
    if contended:
        msg += (
            f"\nWARNING: {threads} threads copy slower than 1: the cores are contended, "
            f"{threads}-thread figures of this run measure scheduling more than code."
        )
    return {"copy_bytes_per_s": {str(k): v for k, v in by_threads.items()},
            "contended": contended, "message": msg}  # fmt: skip


# --------------------------------------------------------------------------- targets


def _numel(rec: dict) -> int:
    return math.prod(rec["case"]["shape"])


def check_targets(sections: dict) -> list[dict]:
    """Every target of the issue against every relevant float32 case of this run.

    A case ``passes`` when its median ratio meets the threshold; ``tie`` when its paired
    interquartile range straddles the threshold (the run cannot tell). INVALID cases fail.
    """
    module_recs = [
        (sec, r)
        for sec in ("modules", "sweep")
        for r in sections.get(sec, {}).get("cases", [])
        if r["case"]["dtype"] == "float32"
    ]
    out = []
    for what, mode, size, thr in TARGETS:
        items = []
        for sec, r in module_recs:
            if mode is not None and r["case"]["mode"] != mode:
                continue
            if (size == "large" and _numel(r) < LARGE) or (size == "small" and _numel(r) >= LARGE):
                continue
            ratio = r["ratio"].get("torch") if r["valid"] else None
            p = r.get("paired_ratio", {}).get("torch")
            items.append(
                {
                    "section": sec,
                    "case": r["case"]["name"],
                    "ratio": ratio,
                    "pass": ratio is not None and ratio >= thr,
                    "tie": p is not None and p["q1"] < thr < p["q3"],
                    "contended": bool(r.get("contended")),
                }
            )
        out.append({"target": what, "threshold": thr, "items": items})
    items = []
    for r in sections.get("kernels", {}).get("cases", []):
        if r["case"]["op"] in ("train_fwd", "backward") and _numel(r) >= LARGE:
            frac = r.get("roofline", {}).get("batchnorm") if r["valid"] else None
            items.append(
                {
                    "section": "kernels",
                    "case": r["case"]["name"],
                    "ratio": frac,
                    "pass": frac is not None and frac >= ROOFLINE_TARGET,
                    "tie": False,
                    "contended": bool(r.get("contended")),
                }
            )
    out.append(
        {
            "target": "kernel-only train forward and backward >= 70% of copy roofline, >= 1M",
            "threshold": ROOFLINE_TARGET,
            "items": items,
        }
    )
    return out


def format_targets(targets: list[dict]) -> str:
    """One line per target, with the failing cases named."""
    lines = []
    for t in targets:
        items = t["items"]
        if not items:
            lines.append(f"  [ -- ] {t['target']}: no case in this run")
            continue
        n_pass = sum(i["pass"] for i in items)
        ok = "PASS" if n_pass == len(items) else "FAIL"
        lines.append(f"  [{ok}] {t['target']}: {n_pass}/{len(items)}")
        for i in items:
            if not i["pass"]:
                val = "INVALID" if i["ratio"] is None else f"{i['ratio']:.2f}"
                tie = " (tie: paired IQR straddles the threshold)" if i["tie"] else ""
                tie += " (contended: do not quote)" if i.get("contended") else ""
                lines.append(f"         {i['case']} [{i['section']}]: {val}{tie}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0]
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--threads", type=int, default=2, help="main thread count (default 2)")
    p.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=None, help="override the suite's"
    )
    p.add_argument("--json", type=Path, default=None, help="record path (PNG written next to it)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads!r}.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the suite; exit status 1 if any case of ours is INVALID."""
    args = parse_args(argv)
    cfg = SUITES[args.suite]
    sections_to_run = tuple(args.sections or cfg["sections"])
    started = _dt.datetime.now()
    t_run = time.perf_counter()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"suite-{args.suite}-{stamp}.json"
    rep, tgt, wu, bw_kwargs = cfg["repeats"], cfg["target_s"], cfg["warmup_s"], cfg["bandwidth"]

    load_start = _harness.loadavg()
    threads = _harness.pin_threads(args.threads)
    _harness.freeze_gc()
    print(
        f"suite {args.suite}: sections {' '.join(sections_to_run)}; threads torch="
        f"{threads['torch']} numba={threads['numba']}; load average {load_start}"
    )
    if load_start and load_start[0] > 0.5:
        print(
            f"WARNING: the machine is busy (1-min load {load_start[0]:.2f} on {os.cpu_count()} "
            "cores): expect noise, quote ratios only; cases that ran while a core was taken "
            "are marked ~ (contended)."
        )
    if args.suite == "smoke":
        print("SMOKE suite: 3 repetitions on tiny shapes; the numbers mean nothing.")
    contention = contention_check(args.threads, bw_kwargs)
    print(contention["message"])
    _harness.pin_threads(args.threads)

    sections: dict = {}
    section_load: dict = {}
    section_start: list[tuple[str, float]] = []
    impls = bench_modules.implementations(compiled=False, stand_in=False)

    def banner(name: str, what: str) -> None:
        section_load[name] = _harness.loadavg()
        section_start.append((name, time.perf_counter()))
        print(f"\n=== {name}: {what}  (load {section_load[name]})", flush=True)

    if "modules" in sections_to_run:
        banner("modules", f"ours vs torch.nn eager, {cfg['modules']} set, {args.threads} threads")
        # With ours bypassing its output cache as a third column: what the cache saves.
        with_uncached = bench_modules.implementations(compiled=False, stand_in=False, uncached=True)
        sections["modules"] = run_module_cases(
            CASE_SETS[cfg["modules"]](), with_uncached, rep, tgt, wu, bw_kwargs
        )
        sections["modules"]["threads"] = args.threads

    if "threads" in sections_to_run:
        other = 1 if args.threads != 1 else 2
        cases = CASE_SETS[cfg["threads"]]()
        names = {c.name for c in cases}
        runs: dict[int, dict] = {}
        reused = None
        base = sections.get("modules")
        if base is not None and names <= {r["case"]["name"] for r in base["cases"]}:
            # The modules section already timed these cases at the main thread count.
            runs[args.threads] = {"cases": [r for r in base["cases"] if r["case"]["name"] in names]}
            reused = args.threads
        for n in sorted({args.threads, other} - set(runs)):
            _harness.pin_threads(n)
            banner(f"threads={n}", f"{cfg['threads']} module set at {n} thread(s)")
            runs[n] = run_module_cases(cases, impls, rep, tgt, wu, bw_kwargs)
            runs[n]["threads"] = n
        _harness.pin_threads(args.threads)
        scaling = thread_scaling(runs)
        print("\nthread scaling (speedup = median time at fewer threads / at more threads):")
        print(format_scaling(scaling))
        sections["threads"] = {
            "runs": {str(n): r for n, r in runs.items() if n != reused},
            "reused_from_modules": reused,
            "scaling": scaling,
        }

    if "kernels" in sections_to_run:
        banner("kernels", f"kernel-only, preallocated outputs, {cfg['kernels']} set")
        sections["kernels"] = bench_kernels.run_cases(
            kernel_cases(cfg["kernels"]),
            repeats=rep,
            target_s=tgt,
            warmup_s=wu,
            bandwidth_kwargs=bw_kwargs,
        )
        print(bench_kernels.format_report(sections["kernels"]))

    png = None
    if "sweep" in sections_to_run:
        sw = cfg["sweep"]
        rep_sweep = min(rep, 15)  # the sweep's 50+ cases at the minimum repetition count
        banner(
            "sweep",
            f"{sw['points']} sizes 1e3..{sw['max_size']:.0e}, families {' '.join(sw['families'])}",
        )
        sections["sweep"] = bench_sweep.run_sweep(
            sw["families"],
            sweep_sizes(sw["points"], 1e3, sw["max_size"]),
            ["train_fwd", "fwd_bwd"],
            repeats=rep_sweep,
            target_s=tgt,
            warmup_s=wu,
            bandwidth_kwargs=bw_kwargs,
        )
        print(bench_sweep.format_report(sections["sweep"]))
        png = bench_sweep.plot(
            sections["sweep"],
            path.with_suffix(".png"),
            bench_sweep._title(threads, section_load["sweep"]),
        )
        sections["sweep"]["plot"] = str(png)
        print(f"plot: {png}")

    if "compile" in sections_to_run and cfg["compile"]:
        banner("compile", "ours vs torch.nn vs torch.compile(torch.nn); compiles per case")
        cases = [make_case(s, m, f) for s, f, m in cfg["compile"]]
        sections["compile"] = run_module_cases(
            cases, bench_modules.implementations(compiled=True, stand_in=False), rep, tgt, wu,
            bw_kwargs,
        )  # fmt: skip
        compile_s = {
            r["case"]["name"]: r["first_call_s"].get("torch.compile")
            for r in sections["compile"]["cases"]
        }
        print("torch.compile first call (compile) per case: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in compile_s.items() if v is not None))  # fmt: skip

    if "first_call" in sections_to_run:
        banner("first_call", "Numba first-call cost, fresh interpreter, cold vs warm cache")
        sections["first_call"] = first_call_cost()
        print(format_first_call(sections["first_call"]))

    targets = check_targets(sections)
    print("\n=== targets of the issue (float32, this run)")
    print(format_targets(targets))

    load_end = _harness.loadavg()
    t_end = time.perf_counter()
    duration = t_end - t_run
    ends = [t for _, t in section_start[1:]] + [t_end]
    section_s = {name: end - t0 for (name, t0), end in zip(section_start, ends, strict=True)}
    print("\nsection times: " + ", ".join(f"{k} {v:.0f} s" for k, v in section_s.items()))
    record = {
        "schema": 1,
        "benchmark": "run_all",
        "suite": args.suite,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": duration,
        "section_duration_s": section_s,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "options": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "repeats": rep,
            "target_s": tgt,
            "warmup_s": wu,
        },  # fmt: skip
        "machine": _harness.machine_info(),
        "loadavg": {"start": load_start, "end": load_end, "sections": section_load},
        "contention_check": contention,
        "tolerance": {str(k): v for k, v in bench_modules.TOL.items()},
        "sections": sections,
        "targets": targets,
        "plot": None if png is None else str(png),
    }
    _harness.write_json(path, record)
    print(f"\n{duration:.0f} s; load average at end {load_end}; wrote {path}")
    all_sections = list(sections.values()) + list(
        sections.get("threads", {}).get("runs", {}).values()
    )
    invalid = [
        r["case"]["name"] for sec in all_sections for r in sec.get("cases", []) if not r["valid"]
    ]
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
