"""Smoke tests of ``benchmarks/``: every entry point on tiny cases, the JSON records' structure,
and that validation marks a deliberately wrong implementation INVALID (and does not time it).

The timings here mean nothing (3 repetitions of microsecond calls); one thread is pinned so that
tiny parallel calls are not stretched to scheduler time slices on a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numba
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not add the root
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    _harness,
    bench_activated,
    bench_kernels,
    bench_memory,
    bench_modules,
    bench_sweep,
    bench_sync,
    bench_training,
    bench_variants,
    run_all,
)
from benchmarks.cases import make_case, make_kernel_case  # noqa: E402

from _distributed import run_distributed  # noqa: E402

FAST = {"repeats": 3, "target_s": 0.001, "warmup_s": 0.0, "bandwidth": 1e10}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = (torch.get_num_threads(), numba.get_num_threads())
    _harness.pin_threads(1)
    _harness.freeze_gc()  # every case calls gc.collect(): 0.2 s each without this
    yield
    gc.unfreeze()
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def _timed_record_ok(rec: dict, impls: list[str]) -> None:
    assert rec["valid"] is True, rec["invalid_reason"]
    assert set(rec["times"]) == set(impls)
    for t in rec["times"].values():
        assert t["q1"] <= t["median"] <= t["q3"] and t["n"] == len(t["samples"]) >= 3
    assert rec["ratio"]["torch"] > 0 and set(rec["paired_ratio"]["torch"]) >= {"q1", "q3"}
    assert set(rec["roofline"]) == set(impls)
    assert rec["case"]["traffic_bytes"] > 0


# --------------------------------------------------------------------------- bench_modules


def _wrong_module(case, state):
    """torch.nn with a shifted bias: a plausible-looking, wrong implementation."""
    return bench_modules._torch_nn(case, {**state, "bias": state["bias"] + 0.5})


def test_bench_modules_case_valid_then_wrong_module_invalid():
    args = argparse.Namespace(repeats=3, target_ms=1.0, warmup_s=0.0, seed=0, verbose=False)
    case = make_case((6, 3), "fwd_bwd")
    impls = bench_modules.implementations(compiled=False, stand_in=False)
    rec = bench_modules.bench_case(case, impls, args)
    rec["roofline"] = _harness.roofline(case.traffic_bytes, 1e10, rec["times"])
    _timed_record_ok(rec, ["torch", "batchnorm"])

    bad = bench_modules.bench_case(
        case, {"torch": impls["torch"], "batchnorm": _wrong_module}, args
    )
    assert bad["valid"] is False
    assert bad["invalid_reason"]["batchnorm"].startswith("output:")
    assert "batchnorm" not in bad["times"] and "torch" in bad["times"]


def test_bench_modules_main_writes_json(tmp_path, capsys):
    path = tmp_path / "modules.json"
    argv = ["--shapes", "smoke", "--filter", "6x3", "eval_fwd", "--threads", "1"]
    argv += ["--repeats", "15", "--target-ms", "0.5", "--warmup-s", "0", "--json", str(path)]
    assert bench_modules.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_modules" and len(rec["cases"]) == 1
    assert "torch/ours" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench_variants


def _variant_args(**kwargs):
    options = {"repeats": 3, "target_ms": 1.0, "warmup_s": 0.0, "seed": 0, "verbose": False}
    options["cycle_mib"] = 0.0
    return argparse.Namespace(**{**options, "virtual_batch_size": 2, **kwargs})


def _wrong_variant(name, case, state, virtual_batch_size):
    """The real layers, except ghost and renorm built with a wrong epsilon."""
    module = bench_variants.build(name, case, state, virtual_batch_size)
    if name in ("ghost", "renorm"):
        module.eps = 1e-2
    return module


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bench_variants_case_times_all_four_then_wrong_variants_invalid(dtype):
    # N = 7 with ghost batches of 2: chunks 2, 2, 3 (the grouped kernels and a merged remainder).
    # float64 too: there .double() aliases, and the references must not touch the shared state.
    case = make_case((7, 3, 2, 2), "fwd_bwd", dtype=dtype)
    rec = bench_variants.bench_case(case, _variant_args())
    assert rec["valid"] is True, rec["invalid_reason"]
    assert rec["ghost_chunks"] == [2, 2, 3]
    assert set(rec["times"]) == set(bench_variants.IMPLS)
    for t in rec["times"].values():
        assert t["q1"] <= t["median"] <= t["q3"] and t["n"] == len(t["samples"]) == 3
    assert set(rec["ratio"]) == {"torch", "ghost", "renorm"}
    assert set(rec["ratio_torch"]) == {"batchnorm", "ghost", "renorm"}
    assert all(set(p) >= {"q1", "q3"} for p in rec["paired_ratio_torch"].values())

    bad = bench_variants.bench_case(case, _variant_args(), build_fn=_wrong_variant)
    assert bad["valid"] is False and set(bad["invalid_reason"]) == {"ghost", "renorm"}
    assert bad["invalid_reason"]["ghost"].startswith("output:")
    assert set(bad["times"]) == {"batchnorm", "torch"} and set(bad["ratio"]) == {"torch"}


def test_bench_variants_main_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "variants.json"
    argv = ["--shapes", "smoke", "--threads", "1", "--repeats", "15", "--target-ms", "0.5"]
    argv += ["--warmup-s", "0", "--virtual-batch-size", "2", "--json", str(path)]
    assert bench_variants.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_variants" and rec["implementations"] == [
        "batchnorm",
        "torch",
        "ghost",
        "renorm",
    ]
    assert [c["case"]["mode"] for c in rec["cases"]] == ["fwd_bwd", "fwd_bwd"]
    assert set(rec["machine"]["versions"]) >= {"python", "torch", "numpy", "numba"}
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("case"))
    assert header.split() == [
        "case",
        "valid",
        "torch/ours",
        "ghost/ours",
        "ghost/torch",
        "renorm/ours",
        "renorm/torch",
        "ours",
        "median",
        "(IQR)",
    ]
    rows = [line for line in out.splitlines() if line.startswith("bn")]
    assert len(rows) == 2 and all(row.split()[1] in ("ok", "ok~") for row in rows)


def test_bench_variants_cycles_through_enough_pairs_to_read_from_memory():
    # (256, 64, 16, 16) float32: 16 MiB an input, 32 MiB a pair with its gradient.
    big = make_case((256, 64, 16, 16), "fwd_bwd")
    assert bench_variants.cycle_length(big, 512.0) == 16
    assert bench_variants.cycle_length(big, 0.0) == 2  # at least two: consecutive calls differ
    assert bench_variants.cycle_length(make_case((7, 3), "fwd_bwd"), 512.0) == 64  # capped
    rec = bench_variants.bench_case(make_case((7, 3, 2), "fwd_bwd"), _variant_args(cycle_mib=1e-3))
    assert rec["valid"] and rec["cycle_pairs"] == 4  # ceil(1048.6 B / (2 * 42 * 4 B)) = 4


def test_bench_variants_quick_set_is_fwd_bwd_with_the_large_batches():
    names = [c.name for c in bench_variants.variant_cases("quick")]
    assert "bn2d-64x64x56x56-f32-nc-fwd_bwd" in names
    assert {"bn2d-256x64x16x16-f32-nc-fwd_bwd", "bn1d-256x512-f32-nc-fwd_bwd"} <= set(names)
    assert all(name.endswith("fwd_bwd") for name in names)


# --------------------------------------------------------------------------- bench_activated


class _OverwriteFn(torch.autograd.Function):
    """Stand-in in-place BatchNorm + activation: the out-of-place layer's values written over
    the input, and the upstream gradient scribbled on in the backward (as in-place ABN may)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        from batchnorm.activated import BatchNormActBase

        with torch.enable_grad():
            ctx.leaf = x.detach().clone().requires_grad_(True)
            ctx.y = BatchNormActBase.forward(layer, ctx.leaf)
        ctx.params = (weight, bias)
        x.copy_(ctx.y.detach())
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        grads = torch.autograd.grad(ctx.y, (ctx.leaf, *ctx.params), g)
        g.mul_(0.5)
        return (*grads, None)


def _stand_in_inplace(case, state, activation, param):
    import batchnorm

    cls = getattr(batchnorm, f"BatchNormAct{case.kind[-2:]}")
    stand_in = type("StandInInPlace", (cls,), {})
    stand_in.forward = lambda self, x: _OverwriteFn.apply(x, self.weight, self.bias, self)
    module = stand_in(case.num_features, activation, param, momentum=0.1, dtype=case.torch_dtype)
    module.load_state_dict(state)
    return module.train()


def _activated_build(name, case, state, activation, param, pair_inplace):
    """The real layers, except ``inplace``: the stand-in (independent of src/.../inplace.py)."""
    if name == "inplace":
        return _stand_in_inplace(case, state, activation, param)
    return bench_activated.build(name, case, state, activation, param, pair_inplace)


def _wrong_activated(name, case, state, activation, param, pair_inplace):
    """The fused layer with the wrong slope, the in-place one with the wrong epsilon."""
    if name == "fused":
        return bench_activated.build(name, case, state, activation, 0.2, pair_inplace)
    module = _activated_build(name, case, state, activation, param, pair_inplace)
    if name == "inplace":
        module.eps = 1e-2
    return module


def _activated_args(**kwargs):
    options = {"repeats": 3, "target_ms": 1.0, "warmup_s": 0.0, "seed": 0, "verbose": False}
    options |= {"cycle_mib": 0.0, "activation": "leaky_relu", "activation_param": None}
    return argparse.Namespace(**{**options, "pair_inplace": False, **kwargs})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bench_activated_case_times_four_then_wrong_layers_invalid(dtype):
    case = make_case((7, 3, 2, 2), "fwd_bwd", dtype=dtype)
    rec = bench_activated.bench_case(case, _activated_args(), build_fn=_activated_build)
    assert rec["valid"] is True, rec["invalid_reason"]
    assert set(rec["times"]) == set(bench_activated.IMPLS)  # the restore runner is not reported
    for t in rec["times"].values():
        assert t["q1"] <= t["median"] <= t["q3"] and t["n"] == len(t["samples"]) == 3
    assert set(rec["ratio"]) == {"ours_pair", "torch_pair", "inplace"}
    assert all(set(p) >= {"q1", "q3"} for p in rec["paired_ratio"].values())
    assert rec["notes"]["inplace"] == ["the backward wrote into its upstream gradient"]
    assert rec["restore_s"]["n"] == 3 and rec["inplace_uses_per_pair"] >= 1

    bad = bench_activated.bench_case(case, _activated_args(), build_fn=_wrong_activated)
    assert bad["valid"] is False and set(bad["invalid_reason"]) == {"fused", "inplace"}
    assert bad["invalid_reason"]["fused"].startswith("output:")
    assert set(bad["times"]) == {"ours_pair", "torch_pair"} and bad["ratio"] == {}


def test_bench_activated_notes_an_inplace_layer_that_is_not_in_place():
    def out_of_place(name, case, state, activation, param, pair_inplace):
        real = "fused" if name == "inplace" else name
        return bench_activated.build(real, case, state, activation, param, pair_inplace)

    case = make_case((7, 3, 2, 2), "fwd_bwd")
    rec = bench_activated.bench_case(case, _activated_args(), build_fn=out_of_place)
    assert rec["valid"] and "did not run in place" in rec["notes"]["inplace"][0]


def test_bench_activated_restore_puts_back_what_the_inplace_layer_overwrote():
    case = make_case((7, 3, 2, 2), "fwd_bwd")
    inputs, grads, state = bench_activated.make_inputs(case, seed=0, count=3)
    bases = [x.detach().clone().requires_grad_(True) for x in inputs]
    own = [g.clone() for g in grads]
    layer = _stand_in_inplace(case, state, "leaky_relu", 0.01)
    bench_activated.make_inplace_runner(layer, bases, own)(3)
    assert not any(torch.equal(b, x) for b, x in zip(bases, inputs, strict=True))
    assert not any(torch.equal(g, h) for g, h in zip(own, grads, strict=True))
    restore = bench_activated.make_restore([*bases, *own], [*inputs, *grads])
    restore(100)  # one copy whatever the count
    assert all(torch.equal(b, x) for b, x in zip(bases, inputs, strict=True))
    assert all(torch.equal(g, h) for g, h in zip(own, grads, strict=True))
    assert len(restore.durations) == 1


def test_bench_activated_keeps_the_first_input_off_the_kink():
    case = make_case((64, 3, 8, 8), "fwd_bwd")
    (x,), _, state = bench_activated.make_inputs(case, seed=0, count=1)
    moved = bench_activated.keep_off_kinks(x, state)
    assert moved > 0  # ~0.16% of 12288 values of N(0, 1) lie within 1e-3 of the kink
    z = bench_activated.reference(x, x, state, "identity", None)["output"]
    # The moved values sit at 2e-3; the statistics moved by ~1e-6, far less than the margin.
    assert float(z.abs().min()) > 0.99 * bench_activated.KINK_MARGIN


def _activated_main_argv(path, *extra):
    argv = ["--shapes", "smoke", "--threads", "1", "--repeats", "15", "--target-ms", "0.5"]
    return [*argv, "--warmup-s", "0", "--copy-mb", "2", "--cycle-mib", "0", "--json", str(path)]


def test_bench_activated_main_relu_has_no_inplace_arm_and_writes_json(tmp_path, capsys):
    path = tmp_path / "activated.json"
    assert bench_activated.main(_activated_main_argv(path)) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_activated" and rec["activation"] == "relu"
    assert rec["unavailable"]["inplace"] == "not applicable: relu is not invertible"
    assert [c["case"]["mode"] for c in rec["cases"]] == ["fwd_bwd", "fwd_bwd"]
    for c in rec["cases"]:
        assert set(c["times"]) == {"fused", "ours_pair", "torch_pair"}
        assert set(c["roofline"]) == set(c["times"]) and c["case"]["traffic_bytes"] > 0
    assert [g["threshold"] for g in rec["goals"]] == [1.3, 2.0]
    assert rec["copy_bandwidth"]["bytes_per_s"] > 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("case"))
    assert header.split()[:5] == [
        "case",
        "valid",
        "ours_pair/fused",
        "torch_pair/fused",
        "inplace/fused",
    ]
    assert "goals of the issue (relu)" in out and "inplace: unavailable" in out


def test_bench_activated_main_leaky_relu_times_inplace_or_marks_it_unavailable(tmp_path):
    path = tmp_path / "activated.json"
    argv = [*_activated_main_argv(path), "--activation", "leaky_relu", "--filter", "6x3"]
    assert bench_activated.main(argv) == 0
    (case,) = json.loads(path.read_text())["cases"]
    if "inplace" in case["unavailable"]:  # src/batchnorm/inplace.py not importable yet
        assert "not importable" in case["unavailable"]["inplace"]
    else:
        assert "inplace" in case["times"] and "inplace" in case["ratio"]


# --------------------------------------------------------------------------- bench_memory


def _memory_args(**kwargs):
    options = {"batch": 4, "size": 6, "channels": 3, "blocks": 2, "warmup_batch": 2}
    return argparse.Namespace(**{**options, "threads": 1, **kwargs})


def test_bench_memory_check_catches_a_wrong_network():
    def wrong_slope(arm, channels, blocks):
        model = bench_memory.build_network(arm, channels, blocks)
        for m in model.modules():
            if hasattr(m, "activation_param"):
                m.activation_param = 0.2  # a plausible slip: the wrong negative slope
        return model

    args = _memory_args()
    runs = {
        "torch": [bench_memory.measure("torch", args)],
        "fused": [bench_memory.measure("fused", args)],
        "inplace": [bench_memory.measure("inplace", args)],
        "wrong": [bench_memory.measure("fused", args, build=wrong_slope)],
    }
    verdict = bench_memory.check_runs(runs)
    assert verdict["torch"] is None and verdict["fused"] is None and verdict["inplace"] is None
    assert verdict["wrong"].startswith("output_norm")
    summary = bench_memory.summarize_runs(runs, verdict)
    assert "wrong" not in summary and summary["torch"]["growth_mib"]["median"] >= 0
    assert runs["torch"][0]["check"].keys() == runs["fused"][0]["check"].keys()
    report = bench_memory.format_report(summary, runs, verdict)
    if not runs["inplace"][0]["available"]:  # src/batchnorm/inplace.py not importable yet
        assert "not importable" in runs["inplace"][0]["reason"] and "unavailable" in report
    else:
        assert "inplace" in summary


def test_bench_memory_main_measures_each_arm_in_a_fresh_process(tmp_path, capsys):
    path = tmp_path / "memory.json"
    argv = ["--arms", "torch", "fused", "--batch", "4", "--size", "6", "--channels", "3"]
    argv += ["--blocks", "2", "--repeats", "1", "--threads", "1", "--json", str(path)]
    assert bench_memory.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_memory" and rec["invalid_reason"] == {}
    assert set(rec["runs"]) == {"torch", "fused"}
    for (run,) in rec["runs"].values():
        assert run["available"] and run["maxrss_after_kib"] >= run["maxrss_before_kib"] > 0
        assert run["threads"] == {"torch": 1, "numba": 1}
    # None when the tiny step did not raise the peak at all (it often fits in freed memory).
    assert rec["summary"]["torch"]["ratio_to_torch"] in (1.0, None)
    assert rec["target"] == {"arm": "inplace", "max_ratio_to_torch": 0.6, "ratio": None}
    assert "growth / torch" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench_training


def test_bench_training_first_step_check_catches_a_wrong_layer():
    workload = bench_training.WORKLOADS["fig1-mlp"]
    models = bench_training.variants(workload, seed=0)
    x, target = torch.randn(workload.input_shape), torch.randint(0, 10, (60,))
    assert bench_training.check_same_first_step(models, x, target) is None

    converted = models["batchnorm"]
    layer = next(m for m in converted.modules() if type(m).__module__.startswith("batchnorm"))
    layer.eps = 1e-2  # a plausible slip: the wrong epsilon
    problem = bench_training.check_same_first_step(models, x, target)
    assert problem is not None and problem.startswith("loss")


def test_bench_training_main_writes_json_and_skips_invalid(tmp_path, capsys, monkeypatch):
    path = tmp_path / "training.json"
    argv = ["--workloads", "fig1-mlp", "--threads", "1", "--repeats", "3"]
    argv += ["--target-ms", "1", "--warmup-s", "0", "--json", str(path)]
    assert bench_training.main(argv) == 0
    rec = json.loads(path.read_text())
    (workload,) = rec["workloads"]
    assert workload["valid"] and workload["eager"]["torch/ours"] > 0
    assert set(workload["eager"]["times"]) == {"torch", "batchnorm", "no-bn"}
    assert "torch/ours" in capsys.readouterr().out

    monkeypatch.setattr(bench_training, "check_same_first_step", lambda *a: "broken on purpose")
    assert bench_training.main(argv) == 1
    rec = json.loads(path.read_text())
    assert "eager" not in rec["workloads"][0]
    assert "INVALID" in capsys.readouterr().out


def _fuse_sequential_relus(model: nn.Module, activation="relu", param=None) -> nn.Module:
    """A stand-in for ``batchnorm.fuse_activations``: (our BatchNorm1d, ReLU) pairs of every
    Sequential become ``BatchNormAct1d(activation, param)`` and ``Identity``."""
    import batchnorm

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            norm, act = seq._modules[a], seq._modules[b]
            if type(norm) is batchnorm.BatchNorm1d and type(act) is nn.ReLU:
                fused = batchnorm.BatchNormAct1d(norm.num_features, activation, param)
                fused.load_state_dict(norm.state_dict())
                seq._modules[a], seq._modules[b] = fused, nn.Identity()
    return model


def test_bench_training_fused_arm_is_timed_then_a_wrong_fusion_is_dropped(
    tmp_path, capsys, monkeypatch
):
    # The stand-in keeps this test independent of tools/fuse.py's state; the real function is
    # exercised by the fig1-mlp test above (nothing to fuse there) and by the benchmark itself.
    import batchnorm

    monkeypatch.setattr(bench_training, "fuse_unavailable", lambda: None)
    monkeypatch.setattr(batchnorm, "fuse_activations", _fuse_sequential_relus, raising=False)
    path = tmp_path / "training.json"
    argv = ["--workloads", "cnn1d", "--threads", "1", "--repeats", "3"]
    argv += ["--target-ms", "1", "--warmup-s", "0", "--json", str(path)]
    assert bench_training.main(argv) == 0
    (workload,) = json.loads(path.read_text())["workloads"]
    assert workload["valid"] and workload["fused_pairs"] == 3 and workload["fused_problem"] is None
    eager = workload["eager"]
    assert set(eager["times"]) == {"torch", "batchnorm", "no-bn", "fused", "no-bn-act"}
    assert eager["torch/fused"] > 0 and eager["ours/fused"] > 0
    assert set(eager["paired_fused"]) >= {"q1", "q3"} and eager["bn_act_share"] < 1
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("workload"))
    assert "torch/fused" in header and "BN+act share" in header

    # A fusion with the wrong activation is caught by the first-step check: the fused arms are
    # not timed, ours and torch's still are, and the exit status says something is wrong.
    wrong = lambda model: _fuse_sequential_relus(model, "leaky_relu", 0.5)  # noqa: E731
    monkeypatch.setattr(batchnorm, "fuse_activations", wrong)
    assert bench_training.main(argv) == 1
    (workload,) = json.loads(path.read_text())["workloads"]
    assert workload["valid"] and workload["fused_problem"].startswith("fused: loss")
    assert set(workload["eager"]["times"]) == {"torch", "batchnorm", "no-bn"}
    assert "fused arm INVALID" in capsys.readouterr().out


def test_bench_versions_times_a_commit_next_to_this_checkout(tmp_path, capsys):
    # HEAD exists in every git checkout; the old package is imported as batchnorm_base.
    from benchmarks import bench_versions

    path = tmp_path / "versions.json"
    argv = ["--base", "HEAD", "--shapes", "smoke", "--filter", "6x3", "eval_fwd"]
    argv += ["--threads", "1", "--repeats", "15", "--target-ms", "0.5", "--warmup-s", "0"]
    assert bench_versions.main([*argv, "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    assert rec["implementations"] == ["torch", "batchnorm", "base@HEAD"]
    assert "base@HEAD" in rec["cases"][0]["ratio"]
    assert "base@HEAD/ours" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench_kernels


def _broken_kernels(case, buffers):
    """Our kernels, then the first output corrupted in place: must be caught before timing."""
    call, observe = bench_kernels._ours(case, buffers)

    def bad_call() -> None:
        call()
        next(iter(observe().values())).add_(0.5)

    return bad_call, observe


@pytest.mark.parametrize("op", ["train_fwd", "eval_fwd", "backward"])
@pytest.mark.parametrize("shape_layout", [((4, 3, 5, 5), "nchw"), ((4, 3, 5, 5), "nhwc")])
def test_bench_kernels_valid_then_broken_invalid(op, shape_layout):
    shape, layout = shape_layout
    case = make_kernel_case(shape, layout, op)
    good = bench_kernels.run_cases([case], **FAST)
    (rec,) = good["cases"]
    _timed_record_ok(rec, ["torch", "batchnorm"])
    assert (
        rec["case"]["traffic_bytes"]
        == {"train_fwd": 3, "eval_fwd": 2, "backward": 5}[op] * 4 * case.numel
    )

    impls = {"torch": bench_kernels._torch, "batchnorm": _broken_kernels}
    (bad,) = bench_kernels.run_cases([case], impls, **FAST)["cases"]
    assert bad["valid"] is False and "batchnorm" in bad["invalid_reason"]
    assert list(bad["times"]) == ["torch"] and bad["ratio"] == {}


def test_bench_kernels_main_writes_json(tmp_path):
    path = tmp_path / "kernels.json"
    argv = ["--shapes", "smoke", "--filter", "16x8", "--threads", "1", "--repeats", "15"]
    argv += ["--target-ms", "0.5", "--warmup-s", "0", "--copy-mb", "2", "--json", str(path)]
    assert bench_kernels.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_kernels"
    assert {c["case"]["op"] for c in rec["cases"]} == {"train_fwd", "eval_fwd", "backward"}
    assert set(rec["machine"]["versions"]) >= {"python", "torch", "numpy", "numba"}
    assert len(rec["loadavg_start"]) == 3


# --------------------------------------------------------------------------- bench_sweep


def test_bench_sweep_crossover_plot_and_invalid(tmp_path):
    impls = bench_modules.implementations(compiled=False, stand_in=False)
    sec = bench_sweep.run_sweep(["c256-2d"], [1e3, 3e3], ["train_fwd"], impls=impls, **FAST)
    assert [r["case"]["shape"] for r in sec["cases"]] == [[4, 256], [12, 256]]
    (cross,) = sec["crossover"]
    assert cross["family"] == "c256-2d" and cross["mode"] == "train_fwd"
    assert len(cross["points"]) == 2 and cross["invalid_points"] == []
    if cross["crossover_numel"] is not None:
        assert cross["crossover_numel"] in (1024, 3072)
    png = bench_sweep.plot(sec, tmp_path / "sweep.png", "test")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "crossover" in bench_sweep.format_report(sec)

    impls["batchnorm"] = _wrong_module
    bad = bench_sweep.run_sweep(["c256-2d"], [1e3], ["train_fwd"], impls=impls, **FAST)
    assert bad["crossover"][0]["points"] == [] and bad["crossover"][0]["invalid_points"]
    assert "no valid uncontended point" in bench_sweep.format_report(bad)


def test_bench_sweep_main_writes_json_and_png(tmp_path):
    path = tmp_path / "sweep.json"
    argv = ["--points", "2", "--max-size", "3e3", "--families", "c256-2d", "--modes", "train_fwd"]
    argv += ["--threads", "1", "--repeats", "15", "--target-ms", "0.5", "--warmup-s", "0"]
    argv += ["--copy-mb", "2", "--json", str(path)]
    assert bench_sweep.main(argv) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "bench_sweep" and len(rec["cases"]) == 2
    assert all(len(c["canary_s"]) == 2 and "contended" in c for c in rec["cases"])
    assert path.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def test_crossover_is_from_the_last_loss():
    def rec(n, ratio):
        return {
            "family": "f",
            "valid": True,
            "case": {"shape": [n, 1], "mode": "train_fwd", "traffic_bytes": 12 * n},
            "ratio": {"torch": ratio},
            "paired_ratio": {"torch": {"q1": ratio, "q3": ratio}},
        }

    (c,) = bench_sweep.crossovers([rec(10, 0.5), rec(20, 1.2), rec(40, 0.9), rec(80, 1.5)])
    assert c["crossover_numel"] == 80 and c["first_win_numel"] == 20
    (c,) = bench_sweep.crossovers([rec(10, 1.1), rec(20, 0.8)])
    assert c["crossover_numel"] is None
    # A contended point (scheduler ticks) neither makes nor breaks the crossover.
    stalled = {**rec(40, 0.2), "contended": True}
    (c,) = bench_sweep.crossovers([rec(10, 0.5), rec(20, 1.2), stalled, rec(80, 1.5)])
    assert c["crossover_numel"] == 20 and c["contended_points"] == [40]


# --------------------------------------------------------------------------- run_all


def test_run_all_smoke_suite(tmp_path, capsys):
    path = tmp_path / "suite.json"
    assert run_all.main(["--suite", "smoke", "--threads", "1", "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "run_all" and rec["suite"] == "smoke"
    assert set(rec["machine"]["versions"]) >= {"python", "torch", "numpy", "numba", "batchnorm"}
    assert rec["machine"]["cpu_model"] and len(rec["loadavg"]["start"]) == 3
    sections = rec["sections"]
    assert set(sections) == {"modules", "threads", "kernels", "sweep"}
    timed = {
        # The modules section also times ours with the output cache bypassed.
        "modules": ["torch", "batchnorm", bench_modules.UNCACHED],
        "kernels": ["torch", "batchnorm"],
        "sweep": ["torch", "batchnorm"],
    }
    for name, impls in timed.items():
        assert sections[name]["copy_bandwidth"]["bytes_per_s"] > 0
        for case in sections[name]["cases"]:
            _timed_record_ok(case, impls)
    threads = sections["threads"]
    assert threads["reused_from_modules"] == 1 and list(threads["runs"]) == ["2"]
    assert {r["case"] for r in threads["scaling"]} == {
        c["case"]["name"] for c in sections["modules"]["cases"]
    }
    assert all(set(r["speedup"]) == {"torch", "batchnorm"} for r in threads["scaling"])
    assert sections["sweep"]["crossover"] and Path(rec["plot"]).read_bytes()[:8] == PNG_MAGIC
    assert [t["threshold"] for t in rec["targets"]] == [3.0, 2.5, 1.0, 1.0, 0.7]
    out = capsys.readouterr().out
    assert "targets of the issue" in out and "thread scaling" in out


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_sync_tiny_run_writes_a_valid_record(tmp_path):
    path = tmp_path / "sync.json"
    argv = ["--channels", "4", "--repeats", "3", "--target-s", "0.001", "--timeout", "120"]
    assert bench_sync.main([*argv, "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    assert [c["case"] for c in rec["cases"]] == ["bn2d-16x4x16x16", "bn1d-256x4"]
    assert rec["machine"]["threads"]["per_rank"] == [{"torch": 1, "numba": 1}] * 2
    for case in rec["cases"]:
        assert case["valid"], case["validation"]
        assert set(case["times"]) == {"local", "sync", "collectives"}
        assert all(t["n"] == 3 for t in case["times"].values())
        assert case["ratio_sync_local"] > 0 and 0 < case["collective_share"]


def _validate_local_as_if_sync(rank, world_size):
    # Per-rank BatchNorm in place of SyncBatchNorm: statistics of one shard, not of both.
    local, _, state = bench_sync._make_modules((16, 4, 5, 5), seed=0)
    x, g = bench_sync._make_shard((16, 4, 5, 5), seed=0, rank=rank)
    return bench_sync.validate(local, state, x, g, rank)


@pytest.mark.distributed
def test_bench_sync_validation_rejects_unsynchronized_batchnorm(tmp_path):
    checks = run_distributed(_validate_local_as_if_sync, 2, rendezvous_dir=tmp_path)
    assert checks[0] == checks[1]  # reduced over ranks: both decide alike
    failed = {k for k, c in checks[0].items() if not c["ok"]}
    assert {"output", "running_mean", "running_var", "input_grad"} <= failed, checks[0]
