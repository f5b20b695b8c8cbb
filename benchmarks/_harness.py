"""Timing, statistics, machine description and report formatting for the benchmarks.

Nothing here knows about BatchNorm: a timed unit is a callable ``run(number)`` that performs
``number`` calls of the operation under test.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

__all__ = [
    "Summary",
    "calibrate_number",
    "canary",
    "compare",
    "contended_summary",
    "copy_bandwidth",
    "format_table",
    "freeze_gc",
    "interleaved_samples",
    "loadavg",
    "machine_info",
    "pin_threads",
    "roofline",
    "summarize",
    "write_json",
]

Runner = Callable[[int], None]


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of per-call times, in seconds."""

    median: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        """Interquartile range ``q3 - q1``."""
        return self.q3 - self.q1

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "iqr": self.iqr, "n": self.n}


def summarize(samples: list[float]) -> Summary:
    """Median and quartiles (linear interpolation, numpy's default) of ``samples``."""
    q1, med, q3 = np.percentile(np.asarray(samples, dtype=np.float64), [25, 50, 75])
    return Summary(float(med), float(q1), float(q3), len(samples))


def pin_threads(n: int) -> dict:
    """Set torch's and Numba's intra-op thread counts to ``n``; return what each reports."""
    torch.set_num_threads(n)
    try:
        numba.set_num_threads(n)
    except ValueError as err:
        # Numba cannot go above NUMBA_NUM_THREADS (fixed at import); say so rather than run
        # with a thread count other than the one printed.
        raise SystemExit(
            f"pin_threads(): expected n <= {numba.config.NUMBA_NUM_THREADS} "
            f"for Numba, got {n!r} ({err})."
        ) from err
    return {"torch": torch.get_num_threads(), "numba": numba.get_num_threads()}


def _time_runner(run: Runner, number: int) -> float:
    t0 = time.perf_counter()
    run(number)
    return (time.perf_counter() - t0) / number


def calibrate_number(
    runners: dict[str, Runner],
    target_s: float,
    warmup_s: float,
    min_warmup_calls: int = 3,
    max_slowest_factor: float = 10.0,
) -> tuple[int, dict[str, dict[str, float]]]:
    """Warm every runner up, then pick calls-per-repetition so a repetition lasts ``target_s``.

    Each runner is called one call at a time, alternating between runners, until each has had
    ``min_warmup_calls`` calls and ``warmup_s`` seconds have passed. Calibration uses the
    fastest runner's fastest warm-up call: on a loaded machine a single call is often
    descheduled for a whole time slice, which would inflate a median, while the minimum stays
    near the true cost. A shared ``number`` keeps even the fastest implementation's
    repetitions long enough for ``perf_counter`` to resolve.

    ``number`` is capped so that a repetition of the *slowest* runner (its median warm-up call)
    lasts at most ``max_slowest_factor * target_s``. Without the cap, a 60 us call next to a
    25 ms one (torch's tiny BatchNorm1d with 2 threads when another job holds a core: its
    parallel region waits for a scheduler tick) gave ``number`` = 500 and a 110 s case.

    Returns:
        ``(number, warm)``: ``number`` >= 1, and per runner the ``min`` and ``median`` of its
        warm-up calls in seconds.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    t_start = time.perf_counter()
    while (
        min(len(v) for v in times.values()) < min_warmup_calls
        or time.perf_counter() - t_start < warmup_s
    ):
        for key, run in runners.items():
            times[key].append(_time_runner(run, 1))
    warm = {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}
    fastest = max(min(w["min"] for w in warm.values()), 1e-9)
    slowest = max(max(w["median"] for w in warm.values()), 1e-9)
    cap = max(1, math.floor(max_slowest_factor * target_s / slowest))
    number = max(1, min(100_000, cap, math.ceil(target_s / fastest)))
    return number, warm


def interleaved_samples(
    runners: dict[str, Runner], repeats: int, number: int, max_rep_s: float = 1.0
) -> dict[str, list[float]]:
    """Time each runner ``repeats`` times, interleaved and rotated so drift hits every runner.

    Repetition ``r`` runs the runners in the order rotated by ``r`` (A B C, B C A, C A B, ...),
    so each runner follows each other one equally often. A fixed order (A B A B ...) is biased:
    a large memory-bound call runs measurably slower right after one that mapped a fresh large
    output (torch's), and with a fixed order the same runner always came second. Measured on
    (64, 64, 56, 56) float32 with our layer timed twice under two names in one fixed-order run:
    the copy that came right after torch ran at 0.78-0.87x of the other.

    The garbage collector is collected once before and disabled during the loop (as ``timeit``
    does), so a collection triggered by one runner is not charged to another.

    If one repetition takes longer than ``max_rep_s`` while ``number > 1``, the machine changed
    under the calibration (typically another job took a core and every short call now waits
    for a scheduler tick): ``number`` is scaled down for the following repetitions, for every
    runner alike, so that the case ends in bounded time. Samples stay per-call means. Measured:
    without this, a case calibrated at 60 us per call ran at 23 ms per call for 110 s.

    Returns:
        Per runner, ``repeats`` per-call times in seconds (each the mean of the calls of one
        repetition).
    """
    samples: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for repetition in range(repeats):
            longest = 0.0
            shift = repetition % len(keys)
            for key in keys[shift:] + keys[:shift]:
                run = runners[key]
                per_call = _time_runner(run, number)
                samples[key].append(per_call)
                longest = max(longest, per_call * number)
            if number > 1 and longest > max_rep_s:
                number = max(1, math.floor(number * max_rep_s / longest))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def compare(
    runners: dict[str, Runner],
    repeats: int,
    target_s: float,
    warmup_s: float,
    candidate: str = "batchnorm",
) -> dict:
    """Warm up, calibrate and time ``runners`` interleaved; ratios of every other runner to
    ``candidate``.

    Returns:
        ``{"number", "warmup_s", "times", "ratio", "paired_ratio"}``: ``times[k]`` is the
        :class:`Summary` of runner ``k`` as a dict plus its ``samples``; ``ratio[k]`` is
        ``median(k) / median(candidate)`` (above 1: the candidate is faster) and
        ``paired_ratio[k]`` the quartiles of the per-repetition ratios.
    """
    number, warm = calibrate_number(runners, target_s, warmup_s)
    samples = interleaved_samples(runners, repeats, number)
    times = {k: {**summarize(s).to_dict(), "samples": s} for k, s in samples.items()}
    ratio, paired = {}, {}
    if candidate in samples:
        ours = samples[candidate]
        for k, s in samples.items():
            if k != candidate:
                ratio[k] = times[k]["median"] / times[candidate]["median"]
                paired[k] = summarize([a / b for a, b in zip(s, ours, strict=True)]).to_dict()
    return {
        "number": number,
        "warmup_s": warm,
        "times": times,
        "ratio": ratio,
        "paired_ratio": paired,
    }


def roofline(traffic_bytes: int, bytes_per_s: float, times: dict[str, dict]) -> dict[str, float]:
    """Fraction of the copy-speed roofline per implementation: ``(bytes / bandwidth) / median``."""
    return {k: (traffic_bytes / bytes_per_s) / t["median"] for k, t in times.items()}


#: A canary above this means the case ran on a contended machine (see :func:`canary`).
CONTENDED_CANARY_S = 1e-3

_CANARY_X = torch.randn(60, 100)


def progress_line(position: str, rec: dict) -> str:
    """One stderr line per finished case: ``[k/n] name: torch/ours 1.23`` or ``INVALID: why``."""
    msg = (
        f"torch/ours {rec['ratio']['torch']:.2f}"
        if rec["valid"] and "torch" in rec["ratio"]
        else f"INVALID: {rec['invalid_reason'].get('batchnorm')}"
    )
    return f"[{position}] {rec['case']['name']}: {msg}"


def attach_roofline(
    records: list[dict], bandwidth: float | None, bw_start: dict | None, bw_kwargs: dict
) -> tuple[float, dict]:
    """Give every record its roofline fractions, measuring the end bandwidth if none was given.

    The faster of the start and end copy measurements is the roofline (a slower one was
    disturbed). Returns ``(bytes_per_s, {"start": ..., "end": ...})``; the dict is empty when
    ``bandwidth`` was given by the caller.
    """
    measured = {}
    if bandwidth is None:
        bw_end = copy_bandwidth(**bw_kwargs)
        bandwidth = max(bw_start["bytes_per_s"], bw_end["bytes_per_s"])
        measured = {"start": bw_start, "end": bw_end}
    for rec in records:
        rec["roofline"] = roofline(rec["case"]["traffic_bytes"], bandwidth, rec["times"])
    return bandwidth, measured


def canary(calls: int = 5) -> float:
    """Median time of torch's training BatchNorm1d on (60, 100), at the current thread count.

    About 25-50 us on this machine when it is quiet. When another job keeps a core busy, every
    multi-threaded parallel region waits for the descheduled thread, i.e. for a scheduler tick:
    the canary then takes 4-50 ms, and so does every short call of ours and of torch's, at any
    size. Cases record it (``canary_s``, and ``contended`` when above
    :data:`CONTENDED_CANARY_S`) so that such figures can be told apart and not quoted.
    """
    mean = torch.zeros(100)
    var = torch.ones(100)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.nn.functional.batch_norm(_CANARY_X, mean, var, training=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def contended_summary(records: list[dict]) -> str:
    """One line naming the cases whose canary says the machine was contended."""
    bad = [r["case"]["name"] for r in records if r.get("contended")]
    if not bad:
        return "contention: none (canary below 1 ms before and after every case)"
    return (
        f"~ = contended: {len(bad)} of {len(records)} cases ran while the canary took > 1 ms "
        "(another job holds a core; times are scheduler ticks, do not quote them)"
    )


def freeze_gc() -> None:
    """Move every object alive now to the garbage collector's permanent generation.

    ``interleaved_samples`` and ``bench_modules.bench_case`` call ``gc.collect()``, which walks
    every tracked object: with torch, Numba and matplotlib imported that took 0.19 s per call
    here (two per case, more than the timing of a small case). Objects created after the freeze
    (those of the cases) are still collected; the start-up objects are never garbage anyway.
    Measured: ``gc.collect()`` 0.19 s before, 2 us after.
    """
    gc.collect()
    gc.freeze()


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS does not report them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def copy_bandwidth(nbytes: int = 50_000_000, repeats: int = 21) -> dict:
    """Measure the memory copy bandwidth with ``dst.copy_(src)`` on preallocated float32 tensors.

    Both tensors are written before timing so no page fault is counted. Bytes per copy are
    read + write, ``2 * nbytes``, the convention the roofline uses.

    Returns:
        ``{"bytes_per_copy", "samples_s", "median_s", "bytes_per_s"}`` with the median-based rate.
    """
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32).uniform_()
    dst = torch.zeros(n, dtype=torch.float32)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - t0)
    med = statistics.median(samples)
    moved = 2 * n * 4
    return {
        "bytes_per_copy": moved,
        "samples_s": samples,
        "median_s": med,
        "bytes_per_s": moved / med,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def machine_info() -> dict:
    """Versions, CPU, threads, git state and the environment knobs that move memory-bound times."""
    try:
        import batchnorm

        bn_version = getattr(batchnorm, "__version__", "unknown")
    except ImportError:
        bn_version = None
    try:
        threading_layer = numba.threading_layer()
    except ValueError:
        threading_layer = None  # only known after a parallel kernel has run
    status = _git("status", "--porcelain")
    return {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "numba": numba.__version__,
            "batchnorm": bn_version,
        },
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": {
            "torch": torch.get_num_threads(),
            "numba": numba.get_num_threads(),
            "numba_threading_layer": threading_layer,
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "transparent_hugepage": _read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "env": {
            k: os.environ.get(k)
            for k in (
                "THP_MEM_ALLOC_ENABLE",
                "OMP_NUM_THREADS",
                "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS",
                "NUMBA_THREADING_LAYER",
                "NUMBA_DISABLE_JIT",
            )
        },
        "platform": platform.platform(),
    }


def format_number(v: float) -> str:
    """About three significant digits, never in exponent notation."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def format_time(t: dict | None) -> str:
    """A timing summary as ``"<median> <unit> (<iqr>)"`` in ms or us; ``"-"`` for none."""
    if t is None:
        return "-"
    scale, unit = (1e3, "ms") if t["median"] >= 1e-3 else (1e6, "us")
    return f"{format_number(t['median'] * scale)} {unit} ({format_number(t['iqr'] * scale)})"


def format_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """Fixed-width text table; ``align`` holds one ``<`` or ``>`` per column."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            f"{str(c):{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` as indented JSON, creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
