"""Whole SGD training steps of real models: torch.nn's BatchNorm, ours, and none, in one process.

What a user who converts a model gets: each workload is built once, copied three ways (torch.nn's
BatchNorm; ``batchnorm.convert(model)``; every BatchNorm replaced by ``nn.Identity``), and one
training step (forward, cross-entropy loss, backward, SGD update, ``zero_grad``) of each is timed
on the same batch, interleaved and rotated repetition by repetition, medians compared. With
``--compile`` the three are also timed under ``torch.compile`` (the whole step's forward and
backward compiled; compile time is paid during warm-up and never timed).

When ``batchnorm.fuse_activations`` is importable, two more copies are timed alongside:
``fused`` = ``fuse_activations(convert(model))`` (each BatchNorm -> activation pair it finds
becomes one ``BatchNormAct`` layer; ``fused_pairs`` in the JSON counts them), and ``no-bn-act``
= that model with every BatchNorm and fused layer replaced by ``nn.Identity`` (BatchNorm and the
fused activations removed). Workloads where nothing is fused (the Figure-1 MLP: sigmoid is not
in the activation table) skip both (``fused_skipped`` says why). The fused model's first step
is checked like ours; a mismatch drops the fused arms (``fused_problem``, exit status 1) and
keeps the others.

Columns:
    ``torch/ours``: torch.nn's step time over ours (> 1: ours is faster).
    ``BN share``: ``1 - t(no BN) / t(torch.nn)``, the part of torch's step BatchNorm costs.
    ``torch/fused``: torch.nn's step time over the fused model's.
    ``BN+act share``: ``1 - t(no-bn-act) / t(torch.nn)``, the part of torch's step spent in
        BatchNorm and the activations that were fused.
    ``compiled torch/ours``: the same ratio with both models compiled (and ``compiled
        torch/fused``).

Workloads (``--workloads`` picks some; all float32, channels-first, on the CPU):
    resnet18-b32 / resnet18-b64: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), 32x32.
    fig1-mlp: the paper's Figure-1 network, 3 x (Linear 100 + BatchNorm1d + sigmoid), batch 60,
        40 inputs (MNIST-1D's length).
    tabular: 4 x (Linear 512 + BatchNorm1d + ReLU), batch 256, 64 inputs.
    cnn1d: a 1-D CNN on MNIST-1D-shaped input (batch 64, 1 x 40), 3 conv+BN+ReLU blocks.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _harness

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- models


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (He et al. 2016, with the CIFAR stem)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _mlp(sizes: list[int], activation: type[nn.Module], classes: int = 10) -> nn.Module:
    blocks = []
    for cin, cout in zip(sizes, sizes[1:], strict=False):
        blocks += [nn.Linear(cin, cout), nn.BatchNorm1d(cout), activation()]
    return nn.Sequential(*blocks, nn.Linear(sizes[-1], classes))


def _cnn1d(classes: int = 10) -> nn.Module:
    blocks, cin = [], 1
    for cout in (32, 64, 64):
        blocks += [nn.Conv1d(cin, cout, 5, padding=2), nn.BatchNorm1d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(cin, classes))


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int = 10


WORKLOADS = {
    w.name: w
    for w in (
        Workload("resnet18-b32", ResNet18, (32, 3, 32, 32)),
        Workload("resnet18-b64", ResNet18, (64, 3, 32, 32)),
        Workload("fig1-mlp", lambda: _mlp([40, 100, 100, 100], nn.Sigmoid), (60, 40)),
        Workload("tabular", lambda: _mlp([64, 512, 512, 512, 512], nn.ReLU), (256, 64)),
        Workload("cnn1d", _cnn1d, (64, 1, 40)),
    )
}


# --------------------------------------------------------------------------- variants


def _without_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return model


def fuse_unavailable() -> str | None:
    """Why ``batchnorm.fuse_activations`` cannot be used in this checkout, or None."""
    try:
        import batchnorm

        batchnorm.fuse_activations  # noqa: B018 - the lazy import is the check
    except (ImportError, AttributeError) as err:
        return f"batchnorm.fuse_activations is not importable ({type(err).__name__})"
    return None


def fused_pairs(model: nn.Module) -> int:
    """How many fused BatchNorm + activation layers (in place or not) ``model`` has."""
    from batchnorm.activated import BatchNormActBase

    return sum(isinstance(m, BatchNormActBase) for m in model.modules())


def variants(workload: Workload, seed: int) -> dict[str, nn.Module]:
    """torch.nn's model, the converted copy and the copy without BatchNorm, same weights."""
    import batchnorm

    torch.manual_seed(seed)
    base = workload.make()
    return {
        "torch": base,
        "batchnorm": batchnorm.convert(copy.deepcopy(base)),
        "no-bn": _without_batchnorm(copy.deepcopy(base)),
    }


def fused_variants(base: nn.Module) -> tuple[dict[str, nn.Module], str | None]:
    """``fuse_activations(convert(copy of base))`` and that copy without its BatchNorm and fused
    layers (``"fused"``, ``"no-bn-act"``); or ``({}, why not)``: not importable, raised, or
    nothing fused."""
    import batchnorm

    why = fuse_unavailable()
    if why is not None:
        return {}, why
    try:
        with warnings.catch_warnings():
            # A model with nothing to fuse is said so below, once, in the benchmark's words.
            warnings.filterwarnings("ignore", "fuse_activations.*none", UserWarning)
            fused = batchnorm.fuse_activations(batchnorm.convert(copy.deepcopy(base)))
    except Exception as err:  # noqa: BLE001 - a failure of ours is a finding, not a crash
        return {}, "fuse_activations raised " + f"{type(err).__name__}: {err}".splitlines()[0]
    if not fused_pairs(fused):
        return {}, "no BatchNorm -> activation pair fused"
    # The fused layers are BatchNorm*d subclasses: _without_batchnorm removes them too.
    return {"fused": fused, "no-bn-act": _without_batchnorm(copy.deepcopy(fused))}, None


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, compiled: bool):
    """``run(number)``: that many SGD training steps of ``model`` on one batch."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    loss_fn = nn.CrossEntropyLoss()

    def run(number: int) -> None:
        for _ in range(number):
            loss = loss_fn(forward(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def check_same_first_step(
    models: dict[str, nn.Module], x, target, names: tuple[str, ...] = ("batchnorm",)
) -> str | None:
    """Ours must compute torch.nn's loss and gradients on the first step (before timing).

    Compared in float64, where both are exact to ~1e-12: in float32 a deep network's gradients
    differ by ~1e-4 between any two correct implementations (ResNet-18: 5e-4), which would hide
    a real error of that size. ``names`` are the models checked against ``models["torch"]``;
    the first problem is returned, prefixed with the model's name unless it is ``batchnorm``.
    """
    losses, grads = {}, {}
    for name in ("torch", *names):
        model = copy.deepcopy(models[name]).double().train()
        loss = nn.CrossEntropyLoss()(model(x.double()), target)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = [p.grad for p in model.parameters()]
    for name in names:
        prefix = "" if name == "batchnorm" else f"{name}: "
        if abs(losses["torch"] - losses[name]) > 1e-9 * max(1.0, abs(losses["torch"])):
            return f"{prefix}loss {losses[name]} vs torch's {losses['torch']}"
        for ours, theirs in zip(grads[name], grads["torch"], strict=True):
            if not torch.allclose(ours, theirs, rtol=1e-7, atol=1e-9):
                return f"{prefix}a gradient differs by {float((ours - theirs).abs().max()):.3g}"
    return None


# --------------------------------------------------------------------------- one workload


def bench_workload(workload: Workload, args: argparse.Namespace) -> dict:
    models = variants(workload, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(workload.input_shape, generator=gen)
    target = torch.randint(0, workload.classes, (workload.input_shape[0],), generator=gen)
    problem = check_same_first_step(models, x, target)
    record = {"workload": workload.name, "valid": problem is None, "problem": problem}
    if problem is not None:  # a wrong implementation's speed means nothing: not timed
        return record
    fused, record["fused_skipped"] = fused_variants(models["torch"])
    record["fused_pairs"] = fused_pairs(fused["fused"]) if fused else 0
    record["fused_problem"] = None
    if fused:
        try:
            # Positional arguments: the tests replace this function by a lambda taking *args.
            both = {**models, **fused}
            record["fused_problem"] = check_same_first_step(both, x, target, ("fused",))
        except Exception as err:  # noqa: BLE001 - a failure of ours is a finding, not a crash
            msg = f"{type(err).__name__}: {err}".splitlines()[0]
            record["fused_problem"] = f"fused: first step raised {msg}"
        if record["fused_problem"] is None:
            models |= fused
    modes = ["eager"] + (["compiled"] if args.compile else [])
    for mode in modes:
        if mode == "compiled":
            # Every workload's models share code objects (nn.Sequential.forward), and Dynamo
            # keeps at most 8 compiled versions of one: without a reset, the third workload's
            # last model silently ran uncompiled.
            torch._dynamo.reset()
        runners = {
            name: make_step(copy.deepcopy(model), x, target, mode == "compiled")
            for name, model in models.items()
        }
        t0 = time.perf_counter()
        number, warm = _harness.calibrate_number(runners, args.target_ms / 1e3, args.warmup_s)
        warm_s = time.perf_counter() - t0
        samples = _harness.interleaved_samples(runners, args.repeats, number)
        times = {k: _harness.summarize(v).to_dict() for k, v in samples.items()}
        paired = [a / b for a, b in zip(samples["torch"], samples["batchnorm"], strict=True)]
        record[mode] = {
            "number": number,
            "warmup_s": warm_s,
            "times": times,
            "samples": samples,
            "torch/ours": times["torch"]["median"] / times["batchnorm"]["median"],
            "paired": _harness.summarize(paired).to_dict(),
            "bn_share": 1.0 - times["no-bn"]["median"] / times["torch"]["median"],
        }
        if "fused" in times:
            paired = [a / b for a, b in zip(samples["torch"], samples["fused"], strict=True)]
            record[mode] |= {
                "torch/fused": times["torch"]["median"] / times["fused"]["median"],
                "ours/fused": times["batchnorm"]["median"] / times["fused"]["median"],
                "paired_fused": _harness.summarize(paired).to_dict(),
                "bn_act_share": 1.0 - times["no-bn-act"]["median"] / times["torch"]["median"],
            }
    return record


# --------------------------------------------------------------------------- report


def _fused_cells(r: dict) -> list[str]:
    e = r["eager"]
    if "torch/fused" not in e:
        return ["-"] * 4
    return [
        f"{e['torch/fused']:.3f}",
        f"{e['paired_fused']['q1']:.2f}-{e['paired_fused']['q3']:.2f}",
        f"{100 * e['bn_act_share']:.0f}%",
        f"{1e3 * e['times']['fused']['median']:.2f} ms",
    ]


def report(records: list[dict], compiled: bool) -> str:
    header = [
        "workload",
        "valid",
        "torch/ours",
        "paired IQR",
        "BN share",
        "torch step",
        "ours step",
    ]
    fused = any("torch/fused" in r.get("eager", {}) for r in records)
    if fused:
        header += ["torch/fused", "fused IQR", "BN+act share", "fused step"]
    if compiled:
        header += ["compiled torch/ours", "paired IQR ", "compiled vs eager (torch)"]
        if fused:
            header += ["compiled torch/fused"]
    rows = []
    for r in records:
        if not r["valid"]:
            rows.append([r["workload"], "INVALID"] + ["-"] * (len(header) - 2))
            continue
        e = r["eager"]
        row = [
            r["workload"],
            "ok" if r["valid"] else "INVALID",
            f"{e['torch/ours']:.3f}",
            f"{e['paired']['q1']:.2f}-{e['paired']['q3']:.2f}",
            f"{100 * e['bn_share']:.0f}%",
            f"{1e3 * e['times']['torch']['median']:.2f} ms",
            f"{1e3 * e['times']['batchnorm']['median']:.2f} ms",
        ]
        if fused:
            row += _fused_cells(r)
        if compiled:
            c = r["compiled"]
            speedup = e["times"]["torch"]["median"] / c["times"]["torch"]["median"]
            row += [
                f"{c['torch/ours']:.3f}",
                f"{c['paired']['q1']:.2f}-{c['paired']['q3']:.2f}",
                f"{speedup:.2f}x",
            ]
            if fused:
                row.append(f"{c['torch/fused']:.3f}" if "torch/fused" in c else "-")
        rows.append(row)
    align = "<<" + ">" * (len(header) - 2)
    return _harness.format_table(header, rows, align)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_training", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--compile", action="store_true", help="also time under torch.compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--target-ms", type=float, default=100.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = _dt.datetime.now()
    threads = _harness.pin_threads(args.threads)
    load = _harness.loadavg()
    shown = "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)
    print(
        f"threads: torch={threads['torch']} numba={threads['numba']}   "
        f"load average at start: {shown}"
    )
    fuse_problem = fuse_unavailable()
    if fuse_problem is not None:
        print(f"fused arm skipped: {fuse_problem}")
    records = []
    for name in args.workloads:
        rec = bench_workload(WORKLOADS[name], args)
        records.append(rec)
        if not rec["valid"]:
            print(f"{name}: INVALID, not timed: {rec['problem']}", file=sys.stderr, flush=True)
            continue
        e = rec["eager"]
        fused = (
            f", torch/fused {e['torch/fused']:.3f} ({rec['fused_pairs']} pairs fused), "
            f"BN+act share {100 * e['bn_act_share']:.0f}%"
            if "torch/fused" in e
            else ""
        )
        print(
            f"{name}: torch/ours {e['torch/ours']:.3f}, BN share {100 * e['bn_share']:.0f}%"
            + fused
            + (f", compiled {rec['compiled']['torch/ours']:.3f}" if args.compile else ""),
            file=sys.stderr,
            flush=True,
        )
    print()
    print(report(records, args.compile))
    invalid = [r["workload"] for r in records if not r["valid"]]
    if invalid:
        print(f"INVALID (ours does not compute torch.nn's first step): {invalid}")
    if fuse_problem is None:
        for r in records:
            if r.get("fused_problem"):
                print(f"{r['workload']}: fused arm INVALID, not timed: {r['fused_problem']}")
            elif r.get("fused_skipped"):
                print(f"{r['workload']}: fused arm skipped: {r['fused_skipped']}")
    record = {
        "schema": 1,
        "benchmark": "bench_training",
        "started": started.isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _harness.machine_info(),
        "loadavg_start": load,
        "loadavg_end": _harness.loadavg(),
        "fused_unavailable": fuse_problem,
        "workloads": records,
    }
    path = args.json or RESULTS_DIR / f"training-{started.strftime('%Y%m%d-%H%M%S')}.json"
    _harness.write_json(path, record)
    print(f"wrote {path}")
    return 1 if invalid or any(r.get("fused_problem") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
