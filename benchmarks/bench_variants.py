"""What the BatchNorm variants cost: ghost batches and batch renormalization next to BatchNorm.

Usage::

    python -m benchmarks.bench_variants [--shapes quick|full] [--repeats N] [--json PATH]
                                        [--threads N] [--virtual-batch-size V] [--filter TEXT ...]

One training step of a layer (``module(x).backward(g)``, gradients set to ``None`` before each
call) for four implementations, timed in one process, interleaved and rotated (A B C D,
B C D A, ...):

- ``batchnorm``: our ``BatchNorm*d`` (the yardstick of the ``/ours`` columns);
- ``torch``: ``torch.nn.BatchNorm*d``;
- ``ghost``: our ``GhostBatchNorm*d`` with ``virtual_batch_size`` 32 (``--virtual-batch-size``);
- ``renorm``: our ``BatchRenorm*d`` with ``warmup=0`` (full limits ``rmax=3, dmax=5`` from the
  first step) and ``momentum=0.1``, running statistics away from the batch's, so that ``r`` and
  ``d`` are not the identity and the correction is on the timed path.

Ratios are ``X/Y = median time of X / median time of Y``: ``torch/ours`` above 1 means our
BatchNorm is faster than torch's (as in ``bench_modules``); ``ghost/ours`` is what a ghost batch
costs over our BatchNorm (above 1: slower), ``ghost/torch`` the same over torch.nn's. Each ratio
comes with the quartiles of its per-repetition ratios.

Validation before timing: the first call of ``batchnorm``, ``ghost`` and ``renorm`` (which also
pays Numba's compile or cache load, so compile time never enters a figure) is compared with a
float64 computation from ``torch.nn.functional.batch_norm``: the output, the input, weight and
bias gradients, and the updated running buffers. For ghost the reference is BatchNorm of each
chunk alone (the running buffers from the whole batch); for renorm the paper's formula with
``r`` and ``d`` as constants. A mismatch marks that implementation INVALID and it is not timed.
torch.nn is the yardstick and is not validated (in float32 its own reductions can be the less
accurate side; see ``bench_modules``).

Inputs: the timed calls cycle through pairs (input, upstream gradient) of the case's shape
(different values and per-channel offsets), so consecutive calls see different data and renorm's
running statistics keep moving, as in training. The cycle spans at least ``--cycle-mib`` MiB
(default 512, twice this machine's 260 MB L3; at least 2 pairs): each call reads its data from
memory, as a layer deep in a network does, instead of re-reading a tensor still in cache, which
flatters a memory-bound op and made the ghost/ours ratio of ``(256, 64, 16, 16)`` swing between
0.96 and 1.43 with how many inputs rotated. Outputs are dropped after every call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import itertools
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from . import _harness
from .bench_modules import RESULTS_DIR, TOL, first_call, mismatch
from .cases import CASE_SETS, Case, make_case

#: The implementations, in the order of the table; ``batchnorm`` is the ``/ours`` yardstick.
IMPLS = ("batchnorm", "torch", "ghost", "renorm")

#: Batch renormalization's settings: full limits from the first step.
RENORM = {"rmax": 3.0, "dmax": 5.0, "warmup": 0, "momentum": 0.1}
MOMENTUM = 0.1
EPS = 1e-5

#: Shapes added to the module case sets: a batch of 256 is 8 ghost batches of 32, where the
#: quick set's N <= 64 gives at most 2 (and N <= 33 is one chunk, i.e. BatchNorm itself).
EXTRA_SHAPES = [(256, 64, 16, 16), (256, 512)]


def variant_cases(which: str) -> list[Case]:
    """The ``fwd_bwd`` cases of the module set ``which``, plus :data:`EXTRA_SHAPES` (not for
    ``smoke``)."""
    cases = [c for c in CASE_SETS[which]() if c.mode == "fwd_bwd"]
    if which != "smoke":
        cases += [make_case(s, "fwd_bwd") for s in EXTRA_SHAPES]
    return cases


# --------------------------------------------------------------------------- one case


def make_inputs(
    case: Case, seed: int, count: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """``count`` inputs (leaves requiring grad), as many upstream gradients, the layers' state.

    Each input has its own per-channel offset; the running buffers are away from the batches'
    statistics, so renorm's ``r`` and ``d`` are not 1 and 0.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype, c = case.torch_dtype, case.num_features

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    offset_shape = (1, c) + (1,) * (len(case.shape) - 2)
    fmt = case.torch_memory_format
    inputs = [
        (randn(*case.shape) * 2.0 + randn(*offset_shape)).contiguous(memory_format=fmt)
        for _ in range(count)
    ]
    for x in inputs:
        x.requires_grad_(True)
    grads = [randn(*case.shape).contiguous(memory_format=fmt) for _ in range(count)]
    state = {
        "weight": 1.0 + 0.1 * randn(c),
        "bias": 0.1 * randn(c),
        "running_mean": 0.5 * randn(c),
        "running_var": 2.0 + 4.0 * torch.rand(c, generator=gen, dtype=dtype),
        "num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    return inputs, grads, state


def cycle_length(case: Case, cycle_mib: float) -> int:
    """Pairs (input, gradient) whose total reaches ``cycle_mib`` MiB: at least 2, at most 64."""
    pair_bytes = 2 * math.prod(case.shape) * case.torch_dtype.itemsize
    return max(2, min(64, math.ceil(cycle_mib * 2**20 / pair_bytes)))


def build(name: str, case: Case, state: dict, virtual_batch_size: int) -> torch.nn.Module:
    """One implementation's layer, in training mode, with the shared parameters and buffers."""
    import batchnorm

    c, dtype, rank = case.num_features, case.torch_dtype, case.kind[-2:]
    if name == "batchnorm":
        module = getattr(batchnorm, case.kind)(c, momentum=MOMENTUM, dtype=dtype)
    elif name == "torch":
        module = getattr(torch.nn, case.kind)(c, momentum=MOMENTUM, dtype=dtype)
    elif name == "ghost":
        cls = getattr(batchnorm, f"GhostBatchNorm{rank}")
        module = cls(c, virtual_batch_size, momentum=MOMENTUM, dtype=dtype)
    elif name == "renorm":
        module = getattr(batchnorm, f"BatchRenorm{rank}")(c, **RENORM, dtype=dtype)
    else:
        raise ValueError(f"build(): expected a name in {IMPLS}, got {name!r}.")
    module.load_state_dict(state)
    return module.train()


def _chunk_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """Ghost batch sizes, written from the documented rule (not from the code under test):
    consecutive chunks of ``virtual_batch_size``; a remainder of one example joins the chunk
    before it."""
    sizes = [virtual_batch_size] * (n // virtual_batch_size)
    remainder = n % virtual_batch_size
    if remainder == 1 and sizes:
        sizes[-1] += 1
    elif remainder:
        sizes.append(remainder)
    return sizes


def reference(name: str, x: torch.Tensor, g: torch.Tensor, state: dict, vbs: int) -> dict:
    """What ``name``'s first call must give, computed in float64 from torch's functional op."""
    # Copies even in float64 (where .double() would alias): the shared state must not collect
    # gradients or running updates of the reference.
    x64, w, b, running_mean, running_var = (
        t.detach().to(torch.float64, copy=True)
        for t in (x, state["weight"], state["bias"], state["running_mean"], state["running_var"])
    )
    for t in (x64, w, b):
        t.requires_grad_(True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if name == "ghost":
        chunks = x64.split(_chunk_sizes(x.shape[0], vbs))
        y = torch.cat([F.batch_norm(t, None, None, w, b, True, 0.0, EPS) for t in chunks])
    elif name == "renorm":
        dims = [0, *range(2, x.dim())]
        mean_b = x64.detach().mean(dims)
        sigma_b = torch.sqrt(x64.detach().var(dims, correction=0) + EPS)
        sigma = torch.sqrt(running_var + EPS)
        r = (sigma_b / sigma).clamp(1 / RENORM["rmax"], RENORM["rmax"])
        d = ((mean_b - running_mean) / sigma).clamp(-RENORM["dmax"], RENORM["dmax"])
        x_hat = F.batch_norm(x64, None, None, None, None, True, 0.0, EPS)
        y = w.reshape(shape) * (x_hat * r.reshape(shape) + d.reshape(shape)) + b.reshape(shape)
    else:
        y = F.batch_norm(x64, None, None, w, b, True, 0.0, EPS)
    y.backward(g.double())
    # Every variant updates the running statistics as BatchNorm does on the whole batch.
    F.batch_norm(x64.detach(), running_mean, running_var, None, None, True, MOMENTUM, EPS)
    return {
        "output": y.detach(),
        "grad input": x64.grad,
        "grad weight": w.grad,
        "grad bias": b.grad,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": torch.tensor(1, dtype=torch.long),
    }


def make_runner(module: torch.nn.Module, inputs: list[torch.Tensor], grads: list[torch.Tensor]):
    """``run(n)``: ``n`` training steps of the layer, each on the next pair of the cycle."""
    params = list(module.parameters())
    next_pair = itertools.cycle(list(zip(inputs, grads, strict=True))).__next__

    def run(n: int) -> None:
        for _ in range(n):
            x, g = next_pair()
            # zero_grad(set_to_none=True), torch's default: backward allocates fresh grads.
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(g)

    return run


def _paired(samples: dict[str, list[float]], a: str, b: str) -> dict:
    return _harness.summarize(
        [p / q for p, q in zip(samples[a], samples[b], strict=True)]
    ).to_dict()


def bench_case(case: Case, args: argparse.Namespace, impls=IMPLS, build_fn=build) -> dict:
    """Validate and time one case; returns its JSON record.

    ``build_fn(name, case, state, virtual_batch_size)`` makes each layer (the tests pass a
    deliberately wrong one to see validation catch it).
    """
    loadavg = _harness.loadavg()
    canary_before = _harness.canary()
    inputs, grads, state = make_inputs(case, args.seed, cycle_length(case, args.cycle_mib))
    g = grads[0]
    vbs = args.virtual_batch_size
    tol = TOL[case.torch_dtype]
    modules, first_s, invalid = {}, {}, {}
    for name in impls:
        try:
            module = build_fn(name, case, state, vbs)
            observed, first_s[name] = first_call(module, case, inputs[0], g)
        except Exception as err:  # noqa: BLE001 - a failure of ours is a finding, not a crash
            if name == "torch":
                raise
            invalid[name] = "first call raised " + f"{type(err).__name__}: {err}".splitlines()[0]
            if args.verbose:
                traceback.print_exc()
            continue
        if name != "torch":
            reason = mismatch(observed, reference(name, inputs[0], g, state, vbs), tol)
            if reason is not None:
                invalid[name] = reason
                continue
        modules[name] = module

    runners = {k: make_runner(m, inputs, grads) for k, m in modules.items()}
    timing = _harness.compare(
        runners, args.repeats, args.target_ms / 1e3, args.warmup_s, candidate="batchnorm"
    )
    samples = {k: t["samples"] for k, t in timing["times"].items()}
    ratio_torch, paired_torch = {}, {}
    if "torch" in samples:
        for k in samples:
            if k != "torch":
                ratio_torch[k] = timing["times"][k]["median"] / timing["times"]["torch"]["median"]
                paired_torch[k] = _paired(samples, k, "torch")
    canary_after = _harness.canary()
    record = {
        "case": case.to_dict(),
        "virtual_batch_size": vbs,
        "cycle_pairs": len(inputs),
        "ghost_chunks": _chunk_sizes(case.shape[0], vbs),
        "loadavg_at_start": loadavg,
        "canary_s": [canary_before, canary_after],
        "contended": max(canary_before, canary_after) > _harness.CONTENDED_CANARY_S,
        "valid": not invalid,
        "invalid_reason": invalid,
        "first_call_s": first_s,
        "number": timing["number"],
        "warmup_s": timing["warmup_s"],
        "times": timing["times"],
        # X/ours = median time of X / median time of our BatchNorm, and X/torch likewise.
        "ratio": timing["ratio"],
        "paired_ratio": timing["paired_ratio"],
        "ratio_torch": ratio_torch,
        "paired_ratio_torch": paired_torch,
    }
    del modules, runners, inputs, grads, g
    gc.collect()
    return record


# --------------------------------------------------------------------------- report


def _fmt_ratio(ratio: dict, paired: dict, key: str) -> str:
    if key not in ratio:
        return "-"
    p = paired[key]
    return f"{ratio[key]:.2f} ({p['q1']:.2f}-{p['q3']:.2f})"


#: The ratio columns: (header, which ratio table, implementation).
COLUMNS = [
    ("torch/ours", "ratio", "torch"),
    ("ghost/ours", "ratio", "ghost"),
    ("ghost/torch", "ratio_torch", "ghost"),
    ("renorm/ours", "ratio", "renorm"),
    ("renorm/torch", "ratio_torch", "renorm"),
]


def report_rows(records: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """Table header, rows and alignment."""
    header = ["case", "valid", *(c[0] for c in COLUMNS), "ours median (IQR)"]
    rows = []
    for r in records:
        valid = "ok" if r["valid"] else "INVALID " + ",".join(sorted(r["invalid_reason"]))
        valid += "~" if r["contended"] else ""
        row = [r["case"]["name"], valid]
        for _, table, key in COLUMNS:
            row.append(_fmt_ratio(r[table], r[f"paired_{table}"], key))
        row.append(_harness.format_time(r["times"].get("batchnorm")))
        rows.append(row)
    return header, rows, "<<" + ">" * (len(COLUMNS) + 1)


def geomean(records: list[dict], table: str, key: str) -> float | None:
    """Geometric mean of one ratio over the cases that have it, or None."""
    logs = [math.log(r[table][key]) for r in records if key in r[table]]
    return math.exp(sum(logs) / len(logs)) if logs else None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_variants", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--shapes",
        choices=sorted(CASE_SETS),
        default="quick",
        help="module case set, fwd_bwd cases only, plus (256, 64, 16, 16) and (256, 512) "
        "(default: quick)",
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
        help="JSON record path (default: benchmarks/results/variants-<timestamp>.json)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch and Numba intra-op threads (default: 2)"
    )
    p.add_argument(
        "--virtual-batch-size",
        type=int,
        default=32,
        help="examples per ghost batch (default: 32)",
    )
    p.add_argument(
        "--filter",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="keep cases whose name contains every TEXT (e.g. --filter 256x512)",
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
    p.add_argument(
        "--cycle-mib",
        type=float,
        default=512.0,
        help="the timed calls cycle through (input, gradient) pairs spanning at least this "
        "many MiB, so each call reads from memory (default: 512; 0: two pairs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed calls")
    args = p.parse_args(argv)
    if args.repeats < 15:
        p.error(f"--repeats: expected at least 15, got {args.repeats!r}.")
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads!r}.")
    if not args.cycle_mib >= 0:
        p.error(f"--cycle-mib: expected a number >= 0, got {args.cycle_mib!r}.")
    if args.virtual_batch_size < 1:
        p.error(f"--virtual-batch-size: expected an int >= 1, got {args.virtual_batch_size!r}.")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 if any implementation is INVALID)."""
    args = parse_args(argv)
    cases = variant_cases(args.shapes)
    if args.filter:
        cases = [c for c in cases if all(t in c.name for t in args.filter)]
    if args.list or not cases:
        for c in cases:
            print(c.name)
        return 0 if cases else 2

    started = _dt.datetime.now()
    loadavg_start = _harness.loadavg()
    threads = _harness.pin_threads(args.threads)
    print(
        f"threads: torch={threads['torch']} numba={threads['numba']}   load average at start: "
        f"{' '.join(f'{v:.2f}' for v in loadavg_start or [])}"
    )
    if loadavg_start and loadavg_start[0] > 0.5:
        print(
            f"WARNING: the machine is busy (1-min load {loadavg_start[0]:.2f}); expect noisy "
            "times and quote ratios only."
        )
    print(f"ghost: virtual_batch_size={args.virtual_batch_size}; renorm: {RENORM}")

    records = []
    t_run = time.perf_counter()
    for i, case in enumerate(cases, 1):
        rec = bench_case(case, args)
        records.append(rec)
        line = "  ".join(
            f"{head} {_fmt_ratio(rec[table], rec[f'paired_{table}'], key).split()[0]}"
            for head, table, key in COLUMNS
        )
        if not rec["valid"]:
            line += f"  INVALID: {rec['invalid_reason']}"
        print(f"[{i}/{len(cases)}] {case.name}: {line}", file=sys.stderr, flush=True)

    header, rows, align = report_rows(records)
    loadavg_end = _harness.loadavg()
    print()
    print(_harness.format_table(header, rows, align))
    print()
    geo = {
        head: value
        for head, table, key in COLUMNS
        if (value := geomean(records, table, key)) is not None
    }
    print("geometric mean: " + "  ".join(f"{k} {v:.2f}" for k, v in geo.items()))
    print(
        "X/Y = median time of X / median time of Y, (q1-q3) of the per-repetition ratios; "
        "torch/ours > 1: our BatchNorm is faster; ghost/ours > 1: the variant costs more."
    )
    print(
        f"load average at end: {' '.join(f'{v:.2f}' for v in loadavg_end or [])}; "
        f"{time.perf_counter() - t_run:.0f} s"
    )
    n_invalid = sum(not r["valid"] for r in records)
    if n_invalid:
        print(f"{n_invalid} case(s) with an INVALID implementation (not timed; see the JSON).")
    if any(r["contended"] for r in records):
        print(_harness.contended_summary(records))

    record = {
        "schema": 1,
        "benchmark": "bench_variants",
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
        "implementations": list(IMPLS),
        "renorm": RENORM,
        "tolerance": {str(k): v for k, v in TOL.items()},
        "geomean_ratio": geo,
        "cases": records,
    }
    path = args.json or RESULTS_DIR / f"variants-{started.strftime('%Y%m%d-%H%M%S')}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if n_invalid else 0


if __name__ == "__main__":
    sys.exit(main())
