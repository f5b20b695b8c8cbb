"""Eval-time speed of a small ResNet-style CNN with its BatchNorm layers folded into the convs.

Usage::

    python -m benchmarks.bench_fold [--quick] [--threads N] [--repeats K] [--json PATH]

One model (stem conv-bn-relu, four basic blocks with residual adds, global pooling, a linear
head), three implementations of it, timed in one process, interleaved A B C A B C ...:

- ``torch_bn``: unfolded, ``torch.nn.BatchNorm2d`` (the model as a user has it);
- ``ours_bn``: unfolded, ``batchnorm.BatchNorm2d`` (the same model after ``batchnorm.convert``);
- ``folded``: ``batchnorm.tools.fold.fold`` of the ``torch_bn`` model (no BatchNorm left).

All run in evaluation mode under ``torch.no_grad()``. The ratios are ``unfolded / folded``
(above 1: folding is faster); folding removes one read and one write of every BatchNorm's input
per forward, while the convolutions, which dominate, stay the same.

Validation before timing: each implementation's first call (which also pays Numba's compile or
cache load) is compared with the ``torch_bn`` model run in float64. A mismatch beyond the
tolerance below marks the implementation INVALID and it is not timed. A canary (see
:func:`benchmarks._harness.canary`) before and after each case marks a contended machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import _harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Validation tolerance against the float64 model. Measured: float32 through the ten
#: convolutions drifts from float64 by 2e-6 to 5e-6 on logits of magnitude 15-20, for all three
#: implementations; 1e-4 leaves room for other BLAS builds, and a wrong fold is off by the order
#: of the activations.
TOL = {"rtol": 1e-4, "atol": 1e-4}

IMPLS = ("torch_bn", "ours_bn", "folded")


@dataclass(frozen=True)
class FoldCase:
    """One timed configuration: input ``(batch, 3, size, size)``, base width, memory format."""

    name: str
    batch: int
    width: int
    size: int = 32
    memory_format: str = "contiguous"

    @property
    def torch_memory_format(self) -> torch.memory_format:
        if self.memory_format == "channels_last":
            return torch.channels_last
        return torch.contiguous_format

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


CASE_SETS = {
    "quick": [FoldCase("n32-w32", batch=32, width=32)],
    "full": [
        FoldCase("n32-w32", batch=32, width=32),
        FoldCase("n32-w32-cl", batch=32, width=32, memory_format="channels_last"),
        FoldCase("n8-w64", batch=8, width=64),
        FoldCase("n1-w32", batch=1, width=32),
    ],
    # Seconds, numbers meaningless: for a smoke test of this file.
    "smoke": [FoldCase("n2-w8-s8", batch=2, width=8, size=8)],
}


# --------------------------------------------------------------------------- the model


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the input (through conv1x1-bn when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-sized ResNet: widths ``w, w, 2w, 2w``, one stride-2 stage, 10 classes."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(
            BasicBlock(width, width, 1),
            BasicBlock(width, width, 1),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 2 * width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def make_model(width: int, seed: int) -> nn.Module:
    """A float32 eval-mode SmallResNet with seeded weights and trained-looking BN statistics.

    Conv weights are He-scaled so activations keep a magnitude of about 1 through the blocks;
    the BatchNorm parameters and running statistics are away from their defaults so that the
    folded weights differ from the unfolded ones.
    """
    gen = torch.Generator().manual_seed(seed)
    model = SmallResNet(width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model.eval()


def implementations(model: nn.Module) -> dict[str, nn.Module]:
    """The three eval-mode models to compare, built from one ``torch_bn`` model."""
    from batchnorm.tools.convert import convert
    from batchnorm.tools.fold import fold

    return {
        "torch_bn": model,
        "ours_bn": convert(copy.deepcopy(model), to="batchnorm").eval(),
        "folded": fold(model),
    }


# --------------------------------------------------------------------------- one case


def _runner(model: nn.Module, x: torch.Tensor) -> _harness.Runner:
    def run(n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                model(x)

    return run


def bench_case(
    case: FoldCase, repeats: int, target_s: float, warmup_s: float, seed: int = 0
) -> dict:
    """Validate and time one case; returns its JSON record."""
    canary_before = _harness.canary()
    loadavg = _harness.loadavg()
    model = make_model(case.width, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.batch, 3, case.size, case.size, generator=gen)
    x = x.contiguous(memory_format=case.torch_memory_format)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())

    models = implementations(model)
    first_call_s, max_abs_diff, invalid = {}, {}, {}
    for name, m in models.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            y = m(x)
        first_call_s[name] = time.perf_counter() - t0
        max_abs_diff[name] = float((y.double() - reference).abs().max())
        try:
            torch.testing.assert_close(y.double(), reference, **TOL)
        except AssertionError as err:
            invalid[name] = " ".join(str(err).split("\n")[:3])

    runners = {k: _runner(m, x) for k, m in models.items() if k not in invalid}
    timing = _harness.compare(runners, repeats, target_s, warmup_s, candidate="folded")
    canary_after = _harness.canary()
    return {
        "case": case.to_dict(),
        "loadavg_at_start": loadavg,
        "valid": not invalid,
        "invalid_reason": invalid,
        "max_abs_diff_vs_float64": max_abs_diff,
        "batchnorm_layers": sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "first_call_s": first_call_s,
        **timing,
        "canary_s": [canary_before, canary_after],
        "contended": max(canary_before, canary_after) > _harness.CONTENDED_CANARY_S,
    }


# --------------------------------------------------------------------------- report


def _fmt_ms(t: dict | None) -> str:
    if t is None:
        return "-"
    return f"{t['median'] * 1e3:.2f} ms ({t['iqr'] * 1e3:.2f})"


def report(records: list[dict]) -> str:
    """The printed table: ratios first, then the medians they come from."""
    header = ["case", "valid"]
    for name in ("torch_bn", "ours_bn"):
        header += [f"{name}/folded", "paired IQR"]
    header += ["folded median (IQR)", "torch_bn median (IQR)", "ours_bn median (IQR)"]
    rows = []
    for r in records:
        valid = "ok" if r["valid"] else "INVALID"
        row = [r["case"]["name"], valid + ("~" if r["contended"] else "")]
        for name in ("torch_bn", "ours_bn"):
            if name in r["ratio"]:
                p = r["paired_ratio"][name]
                row += [f"{r['ratio'][name]:.3f}", f"{p['q1']:.3f}-{p['q3']:.3f}"]
            else:
                row += ["-", "-"]
        row += [_fmt_ms(r["times"].get(k)) for k in ("folded", "torch_bn", "ours_bn")]
        rows.append(row)
    table = _harness.format_table(header, rows, "<<>>>>>>>")
    return table + "\n" + _harness.contended_summary(records)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_fold", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one case, 15 repetitions, short warm-up (about 20 s) instead of the full set",
    )
    p.add_argument("--cases", choices=sorted(CASE_SETS), default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--threads", type=int, default=2, help="torch and Numba intra-op threads (default: 2)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions per implementation, >= 15 (default: 15 quick, 21 full)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="JSON record path (default: benchmarks/results/fold-<timestamp>.json)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 15 if args.quick else 21
    if args.repeats < 15:
        p.error(f"--repeats: expected at least 15, got {args.repeats!r}.")
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads!r}.")
    if args.cases is None:
        args.cases = "quick" if args.quick else "full"
    return args


def run(args: argparse.Namespace) -> dict:
    """Every case of ``args.cases``, timed; returns the JSON record (also printed as a table)."""
    target_s, warmup_s = (0.1, 0.3) if args.quick else (0.2, 1.0)
    started = _dt.datetime.now()
    threads = _harness.pin_threads(args.threads)
    loadavg_start = _harness.loadavg()
    print(
        f"threads: torch={threads['torch']} numba={threads['numba']}   load average at start: "
        f"{' '.join(f'{v:.2f}' for v in loadavg_start or [])}"
    )
    _harness.freeze_gc()
    records = []
    cases = CASE_SETS[args.cases]
    for i, case in enumerate(cases, 1):
        rec = bench_case(case, args.repeats, target_s, warmup_s, args.seed)
        records.append(rec)
        ratios = "  ".join(f"{k}/folded {v:.3f}" for k, v in rec["ratio"].items())
        status = ratios if rec["valid"] else f"INVALID: {rec['invalid_reason']}"
        print(f"[{i}/{len(cases)}] {case.name}: {status}", file=sys.stderr, flush=True)
    print()
    print(report(records))
    return {
        "schema": 1,
        "benchmark": "bench_fold",
        "started": started.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": _harness.loadavg(),
        "implementations": list(IMPLS),
        "tolerance": TOL,
        "target_s": target_s,
        "warmup_s": warmup_s,
        "cases": records,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON record; returns 1 if any case is INVALID."""
    args = parse_args(argv)
    record = run(args)
    stamp = _dt.datetime.fromisoformat(record["started"]).strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"fold-{stamp}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 0 if all(r["valid"] for r in record["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
