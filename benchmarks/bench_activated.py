"""What fusing the activation into BatchNorm saves: forward+backward of BatchNorm + activation.

Usage::

    python -m benchmarks.bench_activated [--shapes quick|full|smoke] [--activation NAME]
                                         [--activation-param P] [--impls NAME ...]
                                         [--pair-inplace] [--cycle-mib MIB] [--repeats N]
                                         [--threads N] [--filter TEXT ...] [--json PATH]

One training step of the layer pair (``layer(x).backward(g)``, gradients set to ``None`` before
each call) on the ``fwd_bwd`` cases of the module set, for four implementations, timed in one
process, interleaved and rotated (A B C D, B C D A, ...):

- ``fused``: ``batchnorm.BatchNormAct*d(C, activation, activation_param)`` (the yardstick);
- ``ours_pair``: our ``BatchNorm*d`` followed by the ``torch.nn`` activation module;
- ``torch_pair``: ``torch.nn.BatchNorm*d`` followed by the same activation module;
- ``inplace``: ``batchnorm.InPlaceABN*d`` (only for the invertible activations ``identity``,
  ``leaky_relu`` and ``elu`` with a positive parameter).

The activation modules are torch.nn's defaults (``inplace=False``); ``--pair-inplace`` builds
them with ``inplace=True`` where torch.nn has that option (ReLU, LeakyReLU, ELU, SiLU), the pair
a memory-conscious torch user writes. A layer that is not importable yet (``InPlaceABN*d`` while
it is being written) is reported as unavailable, not as a failure.

Ratios are ``X/fused = median time of X / median time of fused`` with the quartiles of the
per-repetition ratios: above 1 the fused layer is faster. The issue's goals are
``ours_pair/fused >= 1.3`` and ``torch_pair/fused >= 2`` on conv shapes (3-D to 5-D inputs) of
at least 1M values; the end of the output checks them. The roofline column is the fraction of
the measured copy bandwidth reached for the minimum traffic of a fused forward+backward, 6 reads
and 2 writes of x-sized tensors, the same as BatchNorm's (``cases.TRAFFIC``): the activation
and its derivative are recomputed on the fly and add no pass.

Validation before timing: the first call of each implementation (which also pays Numba's
compile or cache load) is compared with a float64 composite, ``torch.nn.functional.batch_norm``
then the activation, on the same data: output, input, weight and bias gradients, and the
running buffers. A mismatch marks the implementation INVALID and it is not timed (exit status
1); for ``torch_pair`` (the baseline, in float32) a mismatch is only a note. Inputs are nudged
so that no value of the first input lands within 1e-3 of the activation's kink at 0: there,
float32 rounding of ``z`` can flip the sign and change the gradient by a whole ``g``, which
would fail a correct layer on large shapes (about 10 of 1.3e7 values of ``N(0, 1)`` lie within
1e-6 of 0).

Inputs: as ``bench_variants``, the timed calls cycle through (input, gradient) pairs spanning
``--cycle-mib`` MiB (default 512, twice the L3 of the machines here), so each call reads its
data from memory as a layer deep in a network does.

The in-place layer overwrites its input with its output (and may overwrite its upstream
gradient in the backward, as the original in-place ABN does): it gets a cycle of its own, a copy
of the shared one that nothing else reads. Two things keep its figure comparable without timing
a clone:

- Its input must be a non-leaf (autograd forbids writing into a leaf that requires grad), so
  each call passes ``x`` through a zero-copy identity ``autograd.Function`` that returns an
  alias of the leaf's memory. No data moves; the cost is one extra Function call forward and
  backward (a few us, about 8 us measured for ``Function.apply``, see ``FACTS.md``), which the
  inplace figure includes and the others do not: negligible from ~1e5 values up.
- Its cycle is restored from the shared one (``copy_``) by an extra runner ``restore`` that the
  rotation places right after ``inplace`` and whose times are thrown away (``restore_s`` in the
  JSON), so every repetition of ``inplace`` starts from the same data as the others' and
  repeatedly rescaled gradients never drift towards subnormal numbers. At least two other
  implementations run between a restore and the next ``inplace`` repetition (they stream their
  own cycle, so the restored pairs are out of cache again). Within one repetition a pair is used
  ``inplace_uses_per_pair`` times (``ceil(number / cycle_pairs)``, in the JSON).
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
from torch import nn

from batchnorm.activations import ACTIVATIONS, Activation, get_activation, resolve_param

from . import _harness
from .bench_kernels import add_timing_args, check_args
from .bench_modules import RESULTS_DIR, TOL, first_call, layout_notes, mismatch
from .bench_variants import cycle_length, make_inputs, make_runner
from .cases import CASE_SETS, Case
from .run_all import LARGE, format_targets

#: The implementations, in the order of the table; ``fused`` is the yardstick of the ratios.
IMPLS = ("fused", "ours_pair", "torch_pair", "inplace")
#: The untimed runner that restores the in-place layer's cycle (see the module docstring).
RESTORE = "restore"
MOMENTUM = 0.1
EPS = 1e-5
#: Half-width of the band around the activation's kink that the first input avoids.
KINK_MARGIN = 1e-3

#: The issue's goals: (what, implementation, threshold on X/fused, which cases).
GOALS = [
    ("fused >= 1.3x our BatchNorm + activation", "ours_pair", 1.3, "all"),
    ("fused >= 2x torch.nn's, conv shapes >= 1M values", "torch_pair", 2.0, "conv_large"),
]


class Unavailable(Exception):
    """An implementation this checkout cannot build (not importable yet, or not applicable)."""


def activated_cases(which: str) -> list[Case]:
    """The ``fwd_bwd`` cases of the module case set ``which`` (quick, full or smoke)."""
    return [c for c in CASE_SETS[which]() if c.mode == "fwd_bwd"]


def inplace_applicable(activation: Activation, param: float | None) -> str | None:
    """Why the in-place layer cannot run this activation, or None."""
    if not activation.invertible:
        return f"not applicable: {activation.name} is not invertible"
    if param is not None and not param > 0:
        return f"not applicable: {activation.name} with activation_param {param!r} <= 0"
    return None


# --------------------------------------------------------------------------- implementations


def _activation_module(activation: Activation, param: float | None, inplace: bool) -> nn.Module:
    module = activation.make_module(param)
    if inplace and hasattr(module, "inplace"):
        module.inplace = True
    return module


def _ours(name: str):
    try:
        import batchnorm

        return getattr(batchnorm, name)
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"batchnorm.{name} is not importable ({type(err).__name__})") from err


def build(
    name: str, case: Case, state: dict, activation: str, param: float | None, pair_inplace: bool
) -> nn.Module:
    """One implementation, in training mode, with the shared parameters and buffers.

    Raises:
        Unavailable: If the layer is not importable in this checkout.
    """
    spec = ACTIVATIONS[activation]
    c, dtype, rank = case.num_features, case.torch_dtype, case.kind[-2:]
    options = {"momentum": MOMENTUM, "eps": EPS, "dtype": dtype}
    if name in ("fused", "inplace"):
        cls = _ours(f"BatchNormAct{rank}" if name == "fused" else f"InPlaceABN{rank}")
        module = cls(c, activation=activation, activation_param=param, **options)
        module.load_state_dict(state)
    elif name in ("ours_pair", "torch_pair"):
        cls = _ours(case.kind) if name == "ours_pair" else getattr(nn, case.kind)
        norm = cls(c, **options)
        norm.load_state_dict(state)
        module = nn.Sequential(norm, _activation_module(spec, param, pair_inplace))
    else:
        raise ValueError(f"build(): expected a name in {IMPLS}, got {name!r}.")
    return module.train()


class _NonLeafAlias(torch.autograd.Function):
    """Identity whose output is a non-leaf alias of the input's memory: no data moves.

    ``detach()`` shares the storage (and the version counter) without being an autograd view,
    so an in-place layer may write into the output; the gradient passes through unchanged to
    the leaf's ``.grad``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def make_inplace_runner(module: nn.Module, bases: list[torch.Tensor], grads: list[torch.Tensor]):
    """``run(n)``: ``n`` steps of the in-place layer, each on the next pair of its own cycle."""
    params = list(module.parameters())
    next_pair = itertools.cycle(list(zip(bases, grads, strict=True))).__next__
    alias = _NonLeafAlias.apply

    def run(n: int) -> None:
        for _ in range(n):
            x, g = next_pair()
            x.grad = None
            for p in params:
                p.grad = None
            module(alias(x)).backward(g)

    return run


def make_restore(dst: list[torch.Tensor], src: list[torch.Tensor]):
    """``run(n)``: one ``copy_`` of every ``src`` into its ``dst`` (``n`` is ignored); each
    call's duration in seconds is appended to ``run.durations``."""

    def run(n: int) -> None:
        t0 = time.perf_counter()
        with torch.no_grad():
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        run.durations.append(time.perf_counter() - t0)

    run.durations = []
    return run


# --------------------------------------------------------------------------- validation


def keep_off_kinks(x: torch.Tensor, state: dict, margin: float = KINK_MARGIN) -> int:
    """Move every value of ``x`` whose ``z = weight * x_hat + bias`` is within ``margin`` of 0
    to ``z = +-2 margin`` (in place, keeping its sign); returns how many moved.

    The batch statistics move by about ``fraction moved * 2 margin`` standard deviations
    (~3e-6 for ``N(0, 1)``), far less than the margin, so no value re-enters the band.
    """
    with torch.no_grad():
        x64 = x.detach().double()
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = x64.mean(dims, keepdim=True)
        std = torch.sqrt(x64.var(dims, correction=0, keepdim=True) + EPS)
        weight = state["weight"].double().reshape(shape)
        z = (x64 - mean) / std * weight + state["bias"].double().reshape(shape)
        near = z.abs() < margin
        target = torch.where(z >= 0, 2 * margin, -2 * margin)
        x.copy_(torch.where(near, x64 + (target - z) * std / weight, x64))
    return int(near.sum())


def reference(
    x: torch.Tensor, g: torch.Tensor, state: dict, activation: str, param: float | None
) -> dict:
    """The first call's observables in float64: ``functional.batch_norm``, then the activation."""
    x64, w, b, running_mean, running_var = (
        t.detach().to(torch.float64, copy=True)
        for t in (x, state["weight"], state["bias"], state["running_mean"], state["running_var"])
    )
    for t in (x64, w, b):
        t.requires_grad_(True)
    z = F.batch_norm(x64, running_mean, running_var, w, b, True, MOMENTUM, EPS)
    y = ACTIVATIONS[activation].forward(z, param)
    y.backward(g.double())
    return {
        "output": y.detach(),
        "grad input": x64.grad,
        "grad weight": w.grad,
        "grad bias": b.grad,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": torch.tensor(1, dtype=torch.long),
    }


def first_call_inplace(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor
) -> tuple[dict, float, list[str]]:
    """The in-place layer's validation call on copies of ``x`` and ``g``.

    The output is read before the backward (which may recompute the input in the same memory).
    Notes say when the output is not in the input's memory (then the layer is not in place)
    and when the backward wrote into its upstream gradient.
    """
    base = x.detach().clone().requires_grad_(True)
    g_copy = g.clone()
    params = {k.split(".")[-1]: p for k, p in module.named_parameters()}
    t0 = time.perf_counter()
    y = module(_NonLeafAlias.apply(base))
    elapsed = time.perf_counter() - t0
    observed = {"output": y.detach().clone()}
    notes = []
    if y.data_ptr() != base.data_ptr():
        notes.append("output is not in its input's memory: the layer did not run in place")
    t0 = time.perf_counter()
    y.backward(g_copy)
    elapsed += time.perf_counter() - t0
    if not torch.equal(g_copy, g):
        notes.append("the backward wrote into its upstream gradient")
    observed["grad input"] = base.grad
    observed["grad weight"] = params["weight"].grad
    observed["grad bias"] = params["bias"].grad
    buffers = {k.split(".")[-1]: b for k, b in module.named_buffers()}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        observed[name] = buffers[name].detach().clone()
    for p in params.values():
        p.grad = None
    return observed, elapsed, notes


# --------------------------------------------------------------------------- one case


def _ratios(samples: dict[str, list[float]], times: dict, candidate: str) -> tuple[dict, dict]:
    ratio, paired = {}, {}
    if candidate in samples:
        for k, s in samples.items():
            if k != candidate:
                ratio[k] = times[k]["median"] / times[candidate]["median"]
                paired[k] = _harness.summarize(
                    [a / b for a, b in zip(s, samples[candidate], strict=True)]
                ).to_dict()
    return ratio, paired


def bench_case(case: Case, args: argparse.Namespace, impls=IMPLS, build_fn=build) -> dict:
    """Validate and time one case; returns its JSON record.

    ``build_fn(name, case, state, activation, param, pair_inplace)`` makes each implementation
    (the tests pass a deliberately wrong one to see validation catch it); it raises
    :class:`Unavailable` for a layer this checkout does not have.
    """
    loadavg = _harness.loadavg()
    canary_before = _harness.canary()
    activation = args.activation
    spec = get_activation("bench_activated", activation)
    param = resolve_param("bench_activated", spec, args.activation_param)
    inputs, grads, state = make_inputs(case, args.seed, cycle_length(case, args.cycle_mib))
    nudged = keep_off_kinks(inputs[0], state)
    want = reference(inputs[0], grads[0], state, activation, param)
    tol = TOL[case.torch_dtype]

    modules, first_s, invalid, unavailable, notes = {}, {}, {}, {}, {}
    observed: dict = {}
    for name in impls:
        if name == "inplace" and (why := inplace_applicable(spec, param)):
            unavailable[name] = why
            continue
        try:
            module = build_fn(name, case, state, activation, param, args.pair_inplace)
            if name == "inplace":
                observed, first_s[name], notes[name] = first_call_inplace(
                    module, inputs[0], grads[0]
                )
            else:
                observed, first_s[name] = first_call(module, case, inputs[0], grads[0])
                notes[name] = []
            notes[name] += layout_notes(observed, case)
        except Unavailable as err:
            unavailable[name] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - a failure of ours is a finding, not a crash
            if name == "torch_pair":
                raise
            invalid[name] = "first call raised " + f"{type(err).__name__}: {err}".splitlines()[0]
            if args.verbose:
                traceback.print_exc()
            continue
        reason = mismatch(observed, want, tol)
        if reason is not None and name == "torch_pair":
            notes[name].append(f"torch.nn float32 differs from float64: {reason}")
        elif reason is not None:
            invalid[name] = reason
            continue
        modules[name] = module
    del want, observed  # float64 copies of the first pair: not alive while timing

    runners = {k: make_runner(m, inputs, grads) for k, m in modules.items() if k != "inplace"}
    restore = None
    if "inplace" in modules:
        bases = [x.detach().clone().requires_grad_(True) for x in inputs]
        own_grads = [g.clone() for g in grads]
        runners["inplace"] = make_inplace_runner(modules["inplace"], bases, own_grads)
        restore = make_restore([*bases, *own_grads], [*inputs, *grads])
    runners = {k: runners[k] for k in impls if k in runners}  # the table's order
    number, warm = 0, {}
    if runners:  # else every implementation asked for is INVALID or unavailable
        number, warm = _harness.calibrate_number(runners, args.target_ms / 1e3, args.warmup_s)
    if restore is not None:
        restore(1)  # the warm-up ran the in-place layer on its own outputs
        # Right after inplace in the rotation: the others run between a restore and inplace.
        order = [
            *itertools.chain.from_iterable([k, RESTORE] if k == "inplace" else [k] for k in runners)
        ]
        runners = {k: restore if k == RESTORE else runners[k] for k in order}
    samples = _harness.interleaved_samples(runners, args.repeats, number) if runners else {}
    samples.pop(RESTORE, None)  # per-call means of a once-per-repetition copy: meaningless
    times = {k: {**_harness.summarize(s).to_dict(), "samples": s} for k, s in samples.items()}
    ratio, paired = _ratios(samples, times, "fused")
    canary_after = _harness.canary()
    record = {
        "case": case.to_dict(),
        "activation": activation,
        "activation_param": param,
        "pair_inplace": args.pair_inplace,
        "cycle_pairs": len(inputs),
        "nudged_off_kink": nudged,
        "loadavg_at_start": loadavg,
        "canary_s": [canary_before, canary_after],
        "contended": max(canary_before, canary_after) > _harness.CONTENDED_CANARY_S,
        "valid": not invalid,
        "invalid_reason": invalid,
        "unavailable": unavailable,
        "notes": {k: v for k, v in notes.items() if v},
        "first_call_s": first_s,
        "number": number,
        "warmup_s": warm,
        "times": times,
        # X/fused = median time of X / median time of the fused layer (> 1: fused is faster).
        "ratio": ratio,
        "paired_ratio": paired,
    }
    if restore is not None:
        record["restore_s"] = _harness.summarize(restore.durations[1:]).to_dict()
        record["inplace_uses_per_pair"] = math.ceil(number / len(inputs))
    del modules, runners, inputs, grads, restore
    gc.collect()
    return record


# --------------------------------------------------------------------------- report


def _fmt_ratio(rec: dict, key: str) -> str:
    if key not in rec["ratio"]:
        return "n/a" if key in rec["unavailable"] else "-"
    p = rec["paired_ratio"][key]
    return f"{rec['ratio'][key]:.2f} ({p['q1']:.2f}-{p['q3']:.2f})"


def report_rows(records: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """Table header, rows and alignment."""
    others = [k for k in IMPLS if k != "fused"]
    header = ["case", "valid", *(f"{k}/fused" for k in others), "fused median (IQR)"]
    header += ["roofline fused", "roofline inplace"]
    rows = []
    for r in records:
        valid = "ok" if r["valid"] else "INVALID " + ",".join(sorted(r["invalid_reason"]))
        valid += "~" if r["contended"] else ""
        row = [r["case"]["name"], valid, *(_fmt_ratio(r, k) for k in others)]
        row.append(_harness.format_time(r["times"].get("fused")))
        roof = r.get("roofline", {})
        row += [f"{100 * roof[k]:.0f}%" if k in roof else "-" for k in ("fused", "inplace")]
        rows.append(row)
    return header, rows, "<<" + ">" * (len(header) - 2)


def geomean(records: list[dict], key: str) -> float | None:
    """Geometric mean of ``key``/fused over the cases that have it, or None."""
    logs = [math.log(r["ratio"][key]) for r in records if key in r["ratio"]]
    return math.exp(sum(logs) / len(logs)) if logs else None


def check_goals(records: list[dict]) -> list[dict]:
    """The issue's goals over the float32 cases, in ``run_all.format_targets``' structure."""
    out = []
    for what, key, thr, which in GOALS:
        items = []
        for r in records:
            shape = r["case"]["shape"]
            if r["case"]["dtype"] != "float32":
                continue
            if which == "conv_large" and (len(shape) < 3 or math.prod(shape) < LARGE):
                continue
            measured = {*r["ratio"], *r["invalid_reason"]}
            if key not in measured and "fused" not in measured:
                continue  # not asked for (--impls) or not available: nothing to check
            ratio = r["ratio"].get(key)
            p = r["paired_ratio"].get(key)
            items.append(
                {
                    "section": "activated",
                    "case": r["case"]["name"],
                    "ratio": ratio,
                    "pass": ratio is not None and ratio >= thr,
                    "tie": p is not None and p["q1"] < thr < p["q3"],
                    "contended": bool(r.get("contended")),
                }
            )
        out.append({"target": what, "threshold": thr, "items": items})
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_activated", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--shapes",
        choices=sorted(CASE_SETS),
        default="quick",
        help="module case set, fwd_bwd cases only (default: quick)",
    )
    p.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        default="relu",
        help="the activation after BatchNorm (default: relu)",
    )
    p.add_argument(
        "--activation-param",
        type=float,
        default=None,
        help="LeakyReLU's negative slope or ELU's alpha (default: the activation's own)",
    )
    p.add_argument(
        "--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to time"
    )
    p.add_argument(
        "--pair-inplace",
        action="store_true",
        help="build the pairs' activation modules with inplace=True where torch.nn allows it",
    )
    p.add_argument(
        "--filter",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="keep cases whose name contains every TEXT (e.g. --filter 56x56)",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--cycle-mib",
        type=float,
        default=512.0,
        help="the timed calls cycle through (input, gradient) pairs spanning at least this "
        "many MiB (default: 512; 0: two pairs)",
    )
    add_timing_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    if not args.cycle_mib >= 0:
        p.error(f"--cycle-mib: expected a number >= 0, got {args.cycle_mib!r}.")
    if "fused" not in args.impls:
        p.error("--impls: expected fused among them (the ratios' yardstick).")
    try:
        resolve_param("--activation-param", ACTIVATIONS[args.activation], args.activation_param)
    except (TypeError, ValueError) as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (1 if any implementation is INVALID)."""
    args = parse_args(argv)
    cases = activated_cases(args.shapes)
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
    param = resolve_param("bench_activated", ACTIVATIONS[args.activation], args.activation_param)
    pair = "inplace=True" if args.pair_inplace else "inplace=False"
    print(f"activation: {args.activation} (param {param}); pairs' activation modules: {pair}")
    bw_kwargs = {"nbytes": int(args.copy_mb * 1e6)}
    bw_start = _harness.copy_bandwidth(**bw_kwargs)

    records = []
    t_run = time.perf_counter()
    impls = tuple(k for k in IMPLS if k in args.impls)
    for i, case in enumerate(cases, 1):
        rec = bench_case(case, args, impls)
        records.append(rec)
        line = "  ".join(f"{k}/fused {_fmt_ratio(rec, k).split()[0]}" for k in impls[1:])
        if not rec["valid"]:
            line += f"  INVALID: {rec['invalid_reason']}"
        print(f"[{i}/{len(cases)}] {case.name}: {line}", file=sys.stderr, flush=True)
    bandwidth, bw = _harness.attach_roofline(records, None, bw_start, bw_kwargs)

    header, rows, align = report_rows(records)
    loadavg_end = _harness.loadavg()
    print()
    print(_harness.format_table(header, rows, align))
    print()
    geo = {k: v for k in impls[1:] if (v := geomean(records, k)) is not None}
    print("geometric mean: " + "  ".join(f"{k}/fused {v:.2f}" for k, v in geo.items()))
    print(
        "X/fused = median time of X / median time of the fused layer, (q1-q3) of the "
        "per-repetition ratios; > 1: fused is faster. roofline: minimum traffic (6 reads + 2 "
        "writes) at the copy bandwidth / median time."
    )
    unavailable = {k: v for r in records for k, v in r["unavailable"].items()}
    for k, why in unavailable.items():
        print(f"{k}: unavailable ({why})")
    notes = {f"{r['case']['name']} {k}": n for r in records for k, n in r["notes"].items()}
    for where, n in notes.items():
        print(f"note: {where}: {'; '.join(n)}")
    goals = check_goals(records)
    print(f"goals of the issue ({args.activation}):")
    print(format_targets(goals))
    print(
        f"copy bandwidth used for roofline: {bandwidth / 1e9:.1f} GB/s; load average at end: "
        f"{' '.join(f'{v:.2f}' for v in loadavg_end or [])}; "
        f"{time.perf_counter() - t_run:.0f} s"
    )
    n_invalid = sum(not r["valid"] for r in records)
    if n_invalid:
        print(f"{n_invalid} case(s) with an INVALID implementation (not timed; see the JSON).")
    if any(r["contended"] for r in records):
        print(_harness.contended_summary(records))

    record = {
        "schema": 1,
        "benchmark": "bench_activated",
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
        "implementations": list(impls),
        "activation": args.activation,
        "activation_param": param,
        "tolerance": {str(k): v for k, v in TOL.items()},
        "copy_bandwidth": {**bw, "bytes_per_s": bandwidth},
        "geomean_ratio": geo,
        "unavailable": unavailable,
        "goals": goals,
        "cases": records,
    }
    stamp = started.strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"activated-{args.activation}-{stamp}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if n_invalid else 0


if __name__ == "__main__":
    sys.exit(main())
