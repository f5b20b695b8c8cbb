"""Kernel-level benchmark: our Numba kernels against torch's CPU kernels, outputs preallocated.

Usage::

    python -m benchmarks.bench_kernels [--shapes quick|full] [--threads N] [--repeats K]
                                       [--json PATH] [--filter TEXT ...]

Per case (see :func:`benchmarks.cases.kernel_cases`), a kernel sequence on one shape and layout:

- ``train_fwd``: ``moments`` + the per-channel coefficients + ``normalize``; torch:
  ``aten.native_batch_norm.out`` (training, into a preallocated output).
- ``eval_fwd``: ``normalize`` with precomputed coefficients; torch: ``aten.native_batch_norm.out``
  in inference mode.
- ``backward``: ``backward_reduce`` + coefficients + ``backward_apply`` into a preallocated
  ``dx``; torch: ``aten.native_batch_norm_backward``. torch has no out= kernel for it (its
  ``.out`` overload is generated: the functional op, then a copy), so torch's ``dx`` is
  allocated by every call; the functional op is still torch's fastest way to run it.

Running statistics are not updated on either side (``None`` to torch): this is the kernel cost.

1. Validate: one call of every implementation is compared with torch's op run in float64 on the
   same data (float32 tolerance ``rtol=1e-4, atol=1e-5``): the output and the batch mean and
   biased variance for ``train_fwd``; ``dx``, ``dweight`` (sum of ``dy * x_hat``) and ``dbias``
   for ``backward``. A mismatch of ours marks the case INVALID and it is not timed. A mismatch
   of torch's float32 op is recorded as a note (its float32 per-channel sums can be the
   inaccurate side, see README) and torch is still timed: it is the baseline.
2. Warm up, calibrate, time interleaved A B A B ... (``_harness.compare``).
3. Roofline fraction for both implementations from :data:`benchmarks.cases.KERNEL_TRAFFIC`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import _harness
from .cases import KERNEL_CASE_SETS, KernelCase, kernel_cases

#: Same table as bench_modules and the test suite.
TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
}
EPS = 1e-5
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: An implementation of one case: ``call()`` runs the kernel sequence once, ``observe()`` returns
#: what it computed (tensors), read after a call.
Impl = tuple[Callable[[], None], Callable[[], dict]]
Factory = Callable[[KernelCase, dict], Impl]


# --------------------------------------------------------------------------- data


def kernel_view(t: torch.Tensor, layout: str) -> np.ndarray:
    """Zero-copy NumPy view of ``t`` in the kernel's ``(N, C, S)`` or ``(M, C)`` shape."""
    n, c = t.shape[0], t.shape[1]
    if layout == "nchw":
        v = t.view(n, c, -1)
    else:
        v = t.permute(0, *range(2, t.dim()), 1).reshape(-1, c)
    arr = v.numpy()
    if arr.ctypes.data != t.data_ptr():  # pragma: no cover - reshape copied: a harness bug
        raise RuntimeError(f"kernel_view(): {layout} view of {tuple(t.shape)} is not zero-copy.")
    return arr


def make_buffers(case: KernelCase, seed: int) -> dict:
    """Inputs shared by all implementations: ``x`` and ``dy`` in the case's memory format, the
    affine parameters and running statistics. ``x`` has per-channel offsets."""
    gen = torch.Generator().manual_seed(seed)
    dtype, c = case.torch_dtype, case.num_features

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    offset = randn(*((1, c) + (1,) * (len(case.shape) - 2)))
    x = (randn(*case.shape) * 2.0 + offset).contiguous(memory_format=case.torch_memory_format)
    dy = randn(*case.shape).contiguous(memory_format=case.torch_memory_format)
    return {
        "x": x,
        "dy": dy,
        "weight": 1.0 + 0.1 * randn(c),
        "bias": 0.1 * randn(c),
        "running_mean": 0.1 * randn(c),
        "running_var": 4.0 + torch.rand(c, generator=gen, dtype=dtype),
    }


def _axes(case: KernelCase) -> list[int]:
    return [0, *range(2, len(case.shape))]


def reference(case: KernelCase, b: dict) -> dict[str, torch.Tensor]:
    """torch's ops in float64 on the same data: what every implementation is checked against."""
    x = b["x"].double()
    w, bias = b["weight"].double(), b["bias"].double()
    if case.op == "eval_fwd":
        rm, rv = b["running_mean"].double(), b["running_var"].double()
        y, _, _ = torch.ops.aten.native_batch_norm(x, w, bias, rm, rv, False, 0.1, EPS)
        return {"output": y}
    y, mean, invstd = torch.ops.aten.native_batch_norm(x, w, bias, None, None, True, 0.1, EPS)
    if case.op == "train_fwd":
        var = x.var(dim=_axes(case), unbiased=False)
        return {"output": y, "mean": mean, "var": var}
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        b["dy"].double(), x, w, None, None, mean, invstd, True, EPS, [True, True, True]
    )
    return {"grad input": dx, "grad weight": dw, "grad bias": db}


# --------------------------------------------------------------------------- implementations


def _ours(case: KernelCase, b: dict) -> Impl:
    from batchnorm import kernels

    layout, dtype, c = case.layout, case.dtype, case.num_features
    m = case.numel // c
    x = b["x"]
    xv = kernel_view(x, layout)
    w64 = b["weight"].double().numpy()
    b64 = b["bias"].double().numpy()
    mean, m2, var = np.empty(c), np.empty(c), np.empty(c)
    invstd, scale = np.empty(c), np.empty(c)

    def coefficients() -> None:
        # var = m2 / m; invstd = 1 / sqrt(var + eps); scale = weight * invstd (all in place)
        np.multiply(m2, 1.0 / m, out=var)
        np.add(var, EPS, out=invstd)
        np.sqrt(invstd, out=invstd)
        np.divide(1.0, invstd, out=invstd)
        np.multiply(w64, invstd, out=scale)

    if case.op in ("train_fwd", "eval_fwd"):
        normalize = kernels.select_kernel("normalize", layout, dtype)
        y = torch.empty_like(x)
        yv = kernel_view(y, layout)
        if case.op == "eval_fwd":
            rm64 = b["running_mean"].double().numpy()
            eval_scale = w64 / np.sqrt(b["running_var"].double().numpy() + EPS)

            def call() -> None:
                normalize(xv, rm64, eval_scale, b64, yv)

            return call, lambda: {"output": y}

        moments = kernels.select_kernel("moments", layout, dtype)

        def call() -> None:
            moments(xv, mean, m2)
            coefficients()
            normalize(xv, mean, scale, b64, yv)

        def observe() -> dict:
            return {
                "output": y,
                "mean": torch.from_numpy(mean.copy()),
                "var": torch.from_numpy(var.copy()),
            }

        return call, observe

    # backward: the statistics come from our own forward, as in training.
    reduce = kernels.select_kernel("backward_reduce", layout, dtype)
    apply = kernels.select_kernel("backward_apply", layout, dtype)
    kernels.select_kernel("moments", layout, dtype)(xv, mean, m2)
    coefficients()
    dyv = kernel_view(b["dy"], layout)
    dx = torch.empty_like(x)
    dxv = kernel_view(dx, layout)
    sum_dy, sum_dy_xmu = np.empty(c), np.empty(c)
    k_xmu, k_const, tmp = np.empty(c), np.empty(c), np.empty(c)
    k_dy = scale  # weight * invstd

    def call() -> None:
        reduce(dyv, xv, mean, sum_dy, sum_dy_xmu)
        # k_xmu = -k_dy * invstd**2 * sum_dy_xmu / m ; k_const = -k_dy * sum_dy / m
        np.multiply(invstd, invstd, out=tmp)
        np.multiply(tmp, sum_dy_xmu, out=tmp)
        np.multiply(tmp, k_dy, out=k_xmu)
        np.multiply(k_xmu, -1.0 / m, out=k_xmu)
        np.multiply(k_dy, sum_dy, out=k_const)
        np.multiply(k_const, -1.0 / m, out=k_const)
        apply(dyv, xv, mean, k_dy, k_xmu, k_const, dxv)

    def observe() -> dict:
        return {
            "grad input": dx,
            "grad weight": torch.from_numpy(sum_dy_xmu * invstd),
            "grad bias": torch.from_numpy(sum_dy.copy()),
        }

    return call, observe


def _torch(case: KernelCase, b: dict) -> Impl:
    x, w, bias = b["x"], b["weight"], b["bias"]
    c = case.num_features
    y = torch.empty_like(x)
    save_mean = torch.empty(c, dtype=x.dtype)
    save_invstd = torch.empty(c, dtype=x.dtype)
    bn_out = torch.ops.aten.native_batch_norm.out
    if case.op == "eval_fwd":
        rm, rv = b["running_mean"], b["running_var"]

        def call() -> None:
            bn_out(x, w, bias, rm, rv, False, 0.1, EPS, out=y, save_mean=save_mean,
                   save_invstd=save_invstd)  # fmt: skip

        return call, lambda: {"output": y}

    if case.op == "train_fwd":

        def call() -> None:
            bn_out(x, w, bias, None, None, True, 0.1, EPS, out=y, save_mean=save_mean,
                   save_invstd=save_invstd)  # fmt: skip

        def observe() -> dict:
            var = save_invstd.double().pow(-2) - EPS
            return {"output": y, "mean": save_mean.clone(), "var": var}

        return call, observe

    bn_out(x, w, bias, None, None, True, 0.1, EPS, out=y, save_mean=save_mean,
           save_invstd=save_invstd)  # fmt: skip
    dy = b["dy"]
    bwd = torch.ops.aten.native_batch_norm_backward
    last: list = []

    def call() -> None:
        last[:] = bwd(dy, x, w, None, None, save_mean, save_invstd, True, EPS, [True] * 3)

    def observe() -> dict:
        return dict(zip(("grad input", "grad weight", "grad bias"), last, strict=True))

    return call, observe


def implementations() -> dict[str, Factory]:
    """``"torch"`` (the baseline, first) and ``"batchnorm"`` (ours)."""
    return {"torch": _torch, "batchnorm": _ours}


# --------------------------------------------------------------------------- one case


def _mismatch(got: dict, want: dict, tol: dict) -> str | None:
    for key, w in want.items():
        g = got.get(key)
        if g is None:
            return f"{key}: missing"
        g, w = g.double(), w.double()
        # isclose is the same test as assert_close (|g - w| <= atol + rtol * |w|, NaN == NaN)
        # at half the cost on 1e7 elements; assert_close only runs to describe a mismatch.
        if g.shape == w.shape and bool(torch.isclose(g, w, equal_nan=True, **tol).all()):
            continue
        try:
            torch.testing.assert_close(g, w, **tol)
        except AssertionError as err:
            return f"{key}: " + " ".join(str(err).split("\n")[:4])
    return None


def bench_case(
    case: KernelCase,
    impls: dict[str, Factory],
    *,
    repeats: int,
    target_s: float,
    warmup_s: float,
    seed: int = 0,
    verbose: bool = False,
) -> dict:
    """Validate and time one kernel case; returns its JSON record (roofline added by caller)."""
    load = _harness.loadavg()
    canary = _harness.canary()
    t_case = time.perf_counter()
    b = make_buffers(case, seed)
    want = reference(case, b)
    tol = TOL[case.torch_dtype]
    calls, validity, notes, first_s = {}, {}, {}, {}
    for name, factory in impls.items():
        try:
            t0 = time.perf_counter()
            call, observe = factory(case, b)
            call()
            first_s[name] = time.perf_counter() - t0
            got = observe()
        except Exception as err:  # noqa: BLE001 - a failure of ours is a finding, not a crash
            if name == "torch":
                raise
            validity[name] = f"first call raised {type(err).__name__}: {err}".splitlines()[0]
            if verbose:
                traceback.print_exc()
            continue
        reason = _mismatch(got, want, tol)
        if reason is not None and name == "torch":
            # The baseline is timed anyway; its float32 deviation is reported.
            notes[name] = [f"torch float32 differs from torch float64: {reason}"]
            reason = None
        validity[name] = reason
        if reason is None:
            calls[name] = call
    del want

    def runner(call):
        def run(n: int) -> None:
            for _ in range(n):
                call()

        return run

    timing = _harness.compare({k: runner(f) for k, f in calls.items()}, repeats, target_s, warmup_s)
    canary = [canary, _harness.canary()]
    record = {
        "case": case.to_dict(),
        "loadavg_at_start": load,
        "canary_s": canary,
        "contended": max(canary) > _harness.CONTENDED_CANARY_S,
        "valid": validity.get("batchnorm") is None,
        "invalid_reason": {k: v for k, v in validity.items() if v is not None},
        "notes": notes,
        "first_call_s": first_s,
        **timing,
        "wall_s": time.perf_counter() - t_case,
    }
    del calls, b
    gc.collect()
    return record


def run_cases(
    cases: list[KernelCase],
    impls: dict[str, Factory] | None = None,
    *,
    repeats: int = 21,
    target_s: float = 0.02,
    warmup_s: float = 0.2,
    seed: int = 0,
    bandwidth: float | None = None,
    bandwidth_kwargs: dict | None = None,
    verbose: bool = False,
) -> dict:
    """Run ``cases`` and return the section record: ``copy_bandwidth``, ``cases``, ``geomean``.

    ``bandwidth`` (bytes/s) is measured before and after the cases unless given.
    """
    impls = impls or implementations()
    bw_kwargs = bandwidth_kwargs or {}
    bw_start = _harness.copy_bandwidth(**bw_kwargs) if bandwidth is None else None
    records = []
    for i, case in enumerate(cases, 1):
        rec = bench_case(
            case,
            impls,
            repeats=repeats,
            target_s=target_s,
            warmup_s=warmup_s,
            seed=seed,
            verbose=verbose,
        )
        records.append(rec)
        print(_harness.progress_line(f"{i}/{len(cases)}", rec), file=sys.stderr, flush=True)
    bandwidth, bw = _harness.attach_roofline(records, bandwidth, bw_start, bw_kwargs)
    geo: dict[str, list[float]] = {}
    for r in records:
        if r["valid"] and "torch" in r["ratio"]:
            for key in (r["case"]["op"], "all"):
                geo.setdefault(key, []).append(np.log(r["ratio"]["torch"]))
    return {
        "copy_bandwidth": {"bytes_per_s": bandwidth, **bw},
        "implementations": list(impls),
        "cases": records,
        "geomean_ratio": {k: float(np.exp(np.mean(v))) for k, v in geo.items()},
    }


# --------------------------------------------------------------------------- report


def _fmt_t(t: dict | None) -> str:
    if t is None:
        return "-"
    med, iqr = t["median"], t["iqr"]
    scale, unit = (1e3, "ms") if med >= 1e-3 else (1e6, "us")
    return f"{med * scale:.3g} {unit} ({iqr * scale:.2g})"


def format_report(section: dict) -> str:
    """The printed table of a kernel section."""
    header = [
        "case",
        "valid",
        "torch/ours",
        "paired IQR",
        "ours roof",
        "torch roof",
        "torch median (IQR)",
        "ours median (IQR)",
    ]
    rows = []
    for r in section["cases"]:
        t = r["times"]
        roof = r.get("roofline", {})
        if "torch" in r["ratio"]:
            p = r["paired_ratio"]["torch"]
            ratio, paired = f"{r['ratio']['torch']:.2f}", f"{p['q1']:.2f}-{p['q3']:.2f}"
        else:
            ratio = paired = "-"
        rows.append(
            [
                r["case"]["name"],
                ("ok" if r["valid"] else "INVALID") + ("~" if r.get("contended") else ""),
                ratio,
                paired,
                f"{100 * roof['batchnorm']:.0f}%" if "batchnorm" in roof else "-",
                f"{100 * roof['torch']:.0f}%" if "torch" in roof else "-",
                _fmt_t(t.get("torch")),
                _fmt_t(t.get("batchnorm")),
            ]
        )
    lines = [_harness.format_table(header, rows, "<<>>>>>>")]
    if section["geomean_ratio"]:
        lines.append(
            "geometric mean torch/ours: "
            + "  ".join(f"{k} {v:.2f}" for k, v in section["geomean_ratio"].items())
        )
    bw = section["copy_bandwidth"]["bytes_per_s"]
    lines.append(f"roofline: copy bandwidth {bw / 1e9:.1f} GB/s (read+write)")
    lines.append(_harness.contended_summary(section["cases"]))
    for r in section["cases"]:
        for who, ns in r["notes"].items():
            for n in ns:
                lines.append(f"note {r['case']['name']} [{who}]: {n[:160]}")
        for who, why in r["invalid_reason"].items():
            lines.append(f"INVALID {r['case']['name']} [{who}]: {why[:200]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def add_timing_args(p: argparse.ArgumentParser, default_shapes: str = "quick") -> None:
    """Options shared by the kernel and sweep entry points."""
    p.add_argument("--threads", type=int, default=2, help="torch and Numba threads (default: 2)")
    p.add_argument("--repeats", type=int, default=21, help="timed repetitions, >= 15 (default 21)")
    p.add_argument("--json", type=Path, default=None, help="JSON record path")
    p.add_argument("--target-ms", type=float, default=20.0, help="repetition length (default 20)")
    p.add_argument("--warmup-s", type=float, default=0.2, help="warm-up per case (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--copy-mb", type=float, default=50.0, help="copy-bandwidth buffer size (default 50 MB)"
    )
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed calls")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules every entry point enforces."""
    if args.repeats < 15:
        p.error(f"--repeats: expected at least 15, got {args.repeats!r}.")
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads!r}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n")[0]
    )
    p.add_argument("--shapes", choices=KERNEL_CASE_SETS, default="quick", help="case set")
    p.add_argument("--filter", nargs="+", default=None, metavar="TEXT", help="name filter")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    add_timing_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; exit status 1 if any case is INVALID."""
    args = parse_args(argv)
    cases = kernel_cases(args.shapes)
    if args.filter:
        cases = [c for c in cases if all(t in c.name for t in args.filter)]
    if args.list or not cases:
        print("\n".join(c.name for c in cases))
        return 0 if cases else 2
    started = _dt.datetime.now()
    threads = _harness.pin_threads(args.threads)
    _harness.freeze_gc()
    load_start = _harness.loadavg()
    print(f"threads: torch={threads['torch']} numba={threads['numba']}   load: {load_start}")
    section = run_cases(
        cases,
        repeats=args.repeats,
        target_s=args.target_ms / 1e3,
        warmup_s=args.warmup_s,
        seed=args.seed,
        bandwidth_kwargs={"nbytes": int(args.copy_mb * 1e6)},
        verbose=args.verbose,
    )
    print()
    print(format_report(section))
    record = {
        "schema": 1,
        "benchmark": "bench_kernels",
        "started": started.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": _harness.loadavg(),
        "tolerance": {str(k): v for k, v in TOL.items()},
        **section,
    }
    path = args.json or RESULTS_DIR / f"kernels-{started.strftime('%Y%m%d-%H%M%S')}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if any(not r["valid"] for r in section["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
