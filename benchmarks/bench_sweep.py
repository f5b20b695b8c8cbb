"""Size sweep: our modules against ``torch.nn`` from 1e3 to 6e7 elements, with a log-log plot.

Usage::

    python -m benchmarks.bench_sweep [--points 12] [--families c64-nc c256-2d]
                                     [--modes train_fwd fwd_bwd] [--threads N] [--json PATH]

Every point is a module-level case of :mod:`benchmarks.bench_modules` (same validation, same
interleaved timing, fresh outputs as users get them) on a shape from one family of
:data:`benchmarks.cases.SWEEP_FAMILIES`, at ``--points`` log-spaced sizes. The script prints one
row per point, then the **crossover** per family and mode: the smallest size from which ours is
at least as fast as torch at that point and at every larger one (what a size-based dispatch
needs). It writes the JSON record and, next to it, a PNG: time against bytes moved, log-log,
ours, torch and the copy-bandwidth roofline.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
from pathlib import Path

from . import _harness, bench_modules
from .bench_kernels import add_timing_args, check_args
from .cases import SWEEP_FAMILIES, sweep_cases, sweep_sizes

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DEFAULT_FAMILIES = ["c64-nc", "c64-cl", "c256-2d"]
DEFAULT_MODES = ["train_fwd", "fwd_bwd"]


def _bench_args(repeats: int, target_s: float, warmup_s: float, seed: int, verbose: bool):
    # bench_modules.bench_case reads its options from an argparse namespace.
    return argparse.Namespace(
        repeats=repeats, target_ms=target_s * 1e3, warmup_s=warmup_s, seed=seed, verbose=verbose
    )


def run_sweep(
    families: list[str],
    sizes: list[float],
    modes: list[str],
    *,
    impls: dict | None = None,
    repeats: int = 15,
    target_s: float = 0.02,
    warmup_s: float = 0.1,
    seed: int = 0,
    bandwidth: float | None = None,
    bandwidth_kwargs: dict | None = None,
    verbose: bool = False,
) -> dict:
    """Validate and time every point; returns the section record with ``crossover``."""
    impls = impls or bench_modules.implementations(compiled=False, stand_in=False)
    args = _bench_args(repeats, target_s, warmup_s, seed, verbose)
    bw_kwargs = bandwidth_kwargs or {}
    bw_start = _harness.copy_bandwidth(**bw_kwargs) if bandwidth is None else None
    pairs = sweep_cases(families, sizes, tuple(modes))
    # Smallest cases first across families, so a run cut short still covers the small end.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i][1].numel)
    records: list[dict | None] = [None] * len(pairs)
    for k, i in enumerate(order, 1):
        family, case = pairs[i]
        canary = _harness.canary()
        t_case = time.perf_counter()
        rec = bench_modules.bench_case(case, impls, args)
        rec["canary_s"] = [canary, _harness.canary()]
        rec["contended"] = max(rec["canary_s"]) > _harness.CONTENDED_CANARY_S
        rec["wall_s"] = time.perf_counter() - t_case
        rec["family"] = family
        records[i] = rec
        print(_harness.progress_line(f"{k}/{len(pairs)}", rec), file=sys.stderr, flush=True)
    bandwidth, bw = _harness.attach_roofline(records, bandwidth, bw_start, bw_kwargs)
    return {
        "families": list(families),
        "family_memory_format": {f: SWEEP_FAMILIES[f][1] for f in families},
        "modes": list(modes),
        "target_sizes": list(sizes),
        "copy_bandwidth": {"bytes_per_s": bandwidth, **bw},
        "implementations": list(impls),
        "cases": records,
        "crossover": crossovers(records),
    }


def crossovers(records: list[dict]) -> list[dict]:
    """Per family and mode: the smallest size from which ours >= torch at every larger point.

    ``crossover_numel`` is None when ours is slower at the largest point (no crossover in range);
    it equals the smallest size when ours is never slower. ``first_win_numel`` is the smallest
    size with ratio >= 1 at all (a win below the crossover is isolated, often noise). ``ties``
    lists sizes whose paired IQR straddles 1: the ordering there is not resolved on this run.
    Points measured on a contended machine (``contended``) are left out and listed in
    ``contended_points``.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["family"], r["case"]["mode"]), []).append(r)
    out = []
    for (family, mode), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["case"]["traffic_bytes"])
        # Contended points are scheduler ticks, not code: they do not decide the crossover.
        pts = [
            (r["case"]["shape"], math.prod(r["case"]["shape"]), r["ratio"].get("torch"))
            for r in recs
            if r["valid"] and "torch" in r["ratio"] and not r.get("contended")
        ]
        cross = None
        for shape, numel, ratio in reversed(pts):
            if ratio < 1.0:
                break
            cross = (shape, numel, ratio)
        first = next(((s, n, q) for s, n, q in pts if q >= 1.0), None)
        ties = [
            math.prod(r["case"]["shape"])
            for r in recs
            if "torch" in r.get("paired_ratio", {})
            and r["paired_ratio"]["torch"]["q1"] < 1.0 < r["paired_ratio"]["torch"]["q3"]
        ]
        out.append(
            {
                "family": family,
                "mode": mode,
                "crossover_numel": cross[1] if cross else None,
                "crossover_shape": cross[0] if cross else None,
                "crossover_ratio": cross[2] if cross else None,
                "first_win_numel": first[1] if first else None,
                "ties": ties,
                "invalid_points": [r["case"]["name"] for r in recs if not r["valid"]],
                "contended_points": [_numel(r) for r in recs if r.get("contended")],
                "points": [{"numel": n, "shape": s, "ratio": q} for s, n, q in pts],
            }
        )
    return out


def _numel(rec: dict) -> int:
    return math.prod(rec["case"]["shape"])


def format_report(section: dict) -> str:
    """Per-point table, then the crossover lines."""
    header = ["family", "mode", "shape", "elements", "torch/ours", "paired IQR", "ours roof",
              "torch roof", "torch median", "ours median"]  # fmt: skip
    rows = []
    recs = sorted(
        section["cases"], key=lambda r: (r["family"], r["case"]["mode"], r["case"]["traffic_bytes"])
    )
    for r in recs:
        t, roof = r["times"], r["roofline"]
        if "torch" in r["ratio"]:
            p = r["paired_ratio"]["torch"]
            ratio, paired = f"{r['ratio']['torch']:.2f}", f"{p['q1']:.2f}-{p['q3']:.2f}"
        else:
            ratio, paired = ("INVALID" if not r["valid"] else "-"), "-"
        ratio += "~" if r.get("contended") else ""
        rows.append(
            [
                r["family"],
                r["case"]["mode"],
                "x".join(map(str, r["case"]["shape"])),
                f"{math.prod(r['case']['shape']):.2g}",
                ratio,
                paired,
                f"{100 * roof['batchnorm']:.0f}%" if "batchnorm" in roof else "-",
                f"{100 * roof['torch']:.0f}%" if "torch" in roof else "-",
                _fmt_s(t.get("torch")),
                _fmt_s(t.get("batchnorm")),
            ]
        )
    lines = [_harness.format_table(header, rows, "<<<>>>>>>>")]
    lines.append(_harness.contended_summary(section["cases"]))
    lines.append("")
    lines.append("crossover (smallest size from which ours >= torch at every larger point):")
    for c in section["crossover"]:
        if not c["points"]:
            what = "no valid uncontended point"
        elif c["crossover_numel"] is None:
            what = "none in range (ours slower at the largest point)"
        else:
            shape = "x".join(map(str, c["crossover_shape"]))
            what = (
                f"{c['crossover_numel']:.3g} elements ({shape}, ratio {c['crossover_ratio']:.2f})"
            )
            if c["first_win_numel"] is not None and c["first_win_numel"] < c["crossover_numel"]:
                what += f"; an isolated win already at {c['first_win_numel']:.3g}"
        if c.get("contended_points"):
            pts = ", ".join(f"{n:.2g}" for n in c["contended_points"])
            what += f"; left out as contended: {pts}"
        if c["ties"]:
            what += f"; ties (paired IQR straddles 1) at {', '.join(f'{n:.2g}' for n in c['ties'])}"
        lines.append(f"  {c['family']:8s} {c['mode']:9s}: {what}")
    return "\n".join(lines)


def _fmt_s(t: dict | None) -> str:
    if t is None:
        return "-"
    med = t["median"]
    for scale, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "us")):
        if med * scale >= 1.0 or unit == "us":
            return f"{med * scale:.3g} {unit}"
    return "-"  # pragma: no cover


def plot(section: dict, path: Path, title: str = "") -> Path:
    """Log-log time against bytes moved, one panel per mode x family: ours, torch, roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    modes, families = section["modes"], section["families"]
    bw = section["copy_bandwidth"]["bytes_per_s"]
    fig, axes = plt.subplots(
        len(modes), len(families), figsize=(4.2 * len(families), 3.6 * len(modes)), squeeze=False
    )
    cross = {(c["family"], c["mode"]): c for c in section["crossover"]}
    for i, mode in enumerate(modes):
        for j, fam in enumerate(families):
            ax = axes[i][j]
            recs = sorted(
                (r for r in section["cases"] if r["family"] == fam and r["case"]["mode"] == mode),
                key=lambda r: r["case"]["traffic_bytes"],
            )
            for impl, style in (("torch", "s-"), ("batchnorm", "o-"), ("torch.compile", "^--")):
                pts = [
                    (r["case"]["traffic_bytes"], r["times"][impl])
                    for r in recs
                    if impl in r["times"]
                ]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                med = [p[1]["median"] for p in pts]
                lo = [p[1]["median"] - p[1]["q1"] for p in pts]
                hi = [p[1]["q3"] - p[1]["median"] for p in pts]
                label = "ours" if impl == "batchnorm" else impl
                ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, ms=3.5, lw=1.2, capsize=2,
                            label=label)  # fmt: skip
            bad = [
                (r["case"]["traffic_bytes"], r["times"][impl]["median"])
                for r in recs
                if r.get("contended")
                for impl in ("torch", "batchnorm")
                if impl in r["times"]
            ]
            if bad:
                ax.plot([b[0] for b in bad], [b[1] for b in bad], "rx", ms=7, mew=1.2,
                        label="contended (do not quote)")  # fmt: skip
            if recs:
                xs = [r["case"]["traffic_bytes"] for r in recs]
                ax.plot(
                    xs,
                    [x / bw for x in xs],
                    "k:",
                    lw=1.0,
                    label=f"copy roofline {bw / 1e9:.0f} GB/s",
                )
                c = cross.get((fam, mode))
                if (
                    c
                    and c["crossover_numel"] is not None
                    and c["crossover_numel"] > min(math.prod(r["case"]["shape"]) for r in recs)
                ):
                    per_elem = recs[0]["case"]["traffic_bytes"] / math.prod(
                        recs[0]["case"]["shape"]
                    )
                    ax.axvline(c["crossover_numel"] * per_elem, color="grey", lw=0.8, ls="--",
                               label="crossover")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if recs:
                # Top axis in elements: bytes per element is fixed within a panel.
                per = recs[0]["case"]["traffic_bytes"] / math.prod(recs[0]["case"]["shape"])
                top = ax.secondary_xaxis("top", functions=(lambda b, k=per: b / k,
                                                           lambda n, k=per: n * k))  # fmt: skip
                top.set_xlabel("elements", fontsize=8)
                top.tick_params(labelsize=7)
            ax.grid(True, which="both", lw=0.3, alpha=0.5)
            ax.set_title(f"{fam}  {mode}", fontsize=9)
            if i == len(modes) - 1:
                ax.set_xlabel("minimum bytes moved per call")
            if j == 0:
                ax.set_ylabel("median time per call [s]")
            ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--points", type=int, default=12, help="sizes from 1e3 to 6e7 (default 12)")
    p.add_argument("--min-size", type=float, default=1e3, help="smallest element count")
    p.add_argument("--max-size", type=float, default=6e7, help="largest element count")
    p.add_argument(
        "--families", nargs="+", choices=sorted(SWEEP_FAMILIES), default=DEFAULT_FAMILIES
    )
    p.add_argument("--modes", nargs="+", choices=["train_fwd", "eval_fwd", "fwd_bwd"],
                   default=DEFAULT_MODES)  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to JSON)")
    add_timing_args(p)
    p.set_defaults(repeats=15, warmup_s=0.1)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; exit status 1 if any point is INVALID."""
    args = parse_args(argv)
    started = _dt.datetime.now()
    threads = _harness.pin_threads(args.threads)
    _harness.freeze_gc()
    load_start = _harness.loadavg()
    print(f"threads: torch={threads['torch']} numba={threads['numba']}   load: {load_start}")
    section = run_sweep(
        args.families,
        sweep_sizes(args.points, args.min_size, args.max_size),
        args.modes,
        repeats=args.repeats,
        target_s=args.target_ms / 1e3,
        warmup_s=args.warmup_s,
        seed=args.seed,
        bandwidth_kwargs={"nbytes": int(args.copy_mb * 1e6)},
        verbose=args.verbose,
    )
    print()
    print(format_report(section))
    path = args.json or RESULTS_DIR / f"sweep-{started.strftime('%Y%m%d-%H%M%S')}.json"
    png = plot(section, args.plot or path.with_suffix(".png"), _title(threads, load_start))
    record = {
        "schema": 1,
        "benchmark": "bench_sweep",
        "started": started.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": _harness.loadavg(),
        "plot": str(png),
        **section,
    }
    _harness.write_json(path, record)
    print(f"wrote {path} and {png}")
    return 1 if any(not r["valid"] for r in section["cases"]) else 0


def _title(threads: dict, load: list[float] | None) -> str:
    load_s = "?" if load is None else f"{load[0]:.2f}"
    return (
        f"batchnorm vs torch.nn, float32, threads torch={threads['torch']} "
        f"numba={threads['numba']}, 1-min load at start {load_s}"
    )


if __name__ == "__main__":
    sys.exit(main())
