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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not add the root
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    _harness,
    bench_kernels,
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
