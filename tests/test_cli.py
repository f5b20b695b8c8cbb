"""The ``batchnorm`` command: subcommands, exit codes and error lines.

Most tests call ``cli.main([...])`` in-process (fast, and the Numba kernels compile once per
session); one runs ``python -m batchnorm info`` in a subprocess to check the entry point itself.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm import _demo, cli
from batchnorm.lab.experiments import figure1
from batchnorm.lab.registry import EXPERIMENTS

TINY = ["--epochs", "1", "--batch-size", "128"]


def test_info_prints_versions_and_backend_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "numpy", "numba threading layer", "numba threads"):
        assert f"\n{name} " in f"\n{out}"
    table = out[out.index("device  dtype") :].split("\n\n")[0].splitlines()
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table[1:]}
    assert set(rows) == {
        ("cpu", "float32"),
        ("cpu", "float64"),
        ("cpu", "bfloat16"),
        ("cpu", "float16"),
        ("meta", "float32"),
    }
    # The contract: contiguous CPU float32/float64 go to the kernels; half precision and
    # non-CPU devices fall back to torch.
    assert rows["cpu", "float32"][:2] == ["numba", "numba"]
    assert rows["cpu", "float64"][:2] == ["numba", "numba"]
    assert set(rows["cpu", "bfloat16"]) == {"torch"}
    assert set(rows["meta", "float32"]) == {"torch"}


def test_info_states_the_routing_policy_in_force(capsys):
    from batchnorm import use_routing

    with use_routing(serial_max_elements=12345, eval_native_bytes=3 << 20):
        assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert (
        "training: serial kernels up to 12,345 values (23,146 for a channels-last forward), "
        "parallel above" in out
    )
    assert "evaluation: inputs under 3 MiB run on torch's op" in out
    assert "output cache: outputs of 4 MiB or more reuse buffers; limit 1 GiB" in out


def test_info_states_that_kernels_are_off(capsys):
    from batchnorm import use_routing

    with use_routing(kernels=False):
        assert cli.main(["info"]) == 0
    assert "kernels: off (every call runs on torch's op)" in capsys.readouterr().out


def test_warmup_reports_time(capsys):
    assert cli.main(["warmup"]) == 0
    out = capsys.readouterr().out
    assert "ready in" in out or "NUMBA_DISABLE_JIT" in out


def test_demo_tiny_config_agrees_and_exits_0(capsys):
    assert cli.main(["demo", *TINY]) == 0
    captured = capsys.readouterr()
    assert "test accuracy, torch.nn.BatchNorm1d" in captured.out
    assert "test accuracy, batchnorm.BatchNorm1d" in captured.out
    assert "OK: the two models agree." in captured.out
    assert captured.err == ""


def test_run_demo_is_deterministic_for_a_seed():
    config = _demo.DemoConfig(epochs=1, batch_size=128, seed=7)
    first, second = _demo.run_demo(config), _demo.run_demo(config)
    for field in ("accuracy_torch", "accuracy_ours", "max_logit_diff", "prediction_mismatches"):
        assert getattr(first, field) == getattr(second, field), field
    assert first.n_train + first.n_test == 1797
    assert first.agree


def test_run_demo_reports_progress_for_every_step():
    calls = []
    result = _demo.run_demo(
        _demo.DemoConfig(epochs=2, batch_size=512), on_step=lambda *a: calls.append(a)
    )
    steps_per_epoch = result.n_train // 512
    total = 2 * steps_per_epoch
    assert calls == [(step, total) for step in range(1, total + 1)]


def test_demo_exits_1_with_one_error_line_when_models_disagree(capsys, monkeypatch):
    def disagreeing_run(config, on_step=None):
        return _demo.DemoResult(
            config=config,
            n_train=1438,
            n_test=359,
            accuracy_torch=0.97,
            accuracy_ours=0.50,
            max_logit_diff=3.5,
            prediction_mismatches=120,
            seconds=0.0,
        )

    monkeypatch.setattr(_demo, "run_demo", disagreeing_run)
    assert cli.main(["demo", *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("batchnorm demo: expected max |logit difference| < 1e-03")
    assert "got 3.50e+00 and 120 differing predictions." in err[0]


def test_demo_exits_1_when_batch_size_exceeds_training_set(capsys):
    assert cli.main(["demo", "--epochs", "1", "--batch-size", "100000"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchnorm demo: run_demo(): expected batch_size <= ")
    assert "got 100000." in err


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["demo", "--epochs", "0"], "'0'"),
        (["demo", "--epochs", "two"], "'two'"),
        (["demo", "--seed", "-1"], "'-1'"),
        (["demo", "--batch-size", "1"], "'1'"),
        (["demo", "--bogus"], "--bogus"),
        (["frobnicate"], "'frobnicate'"),
        ([], "COMMAND"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_usage_error_exits_2_naming_the_bad_value(argv, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: batchnorm" in err
    assert bad in err.splitlines()[-1]


def test_version_flag_prints_version(capsys):
    import batchnorm

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"


def test_progress_bar_is_off_under_ci(monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    on_step, close = cli._progress_bar("x")
    on_step(1, 2)
    close()
    assert capsys.readouterr().err == ""


def test_python_m_batchnorm_info_runs_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm", "info"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("batchnorm ")
    assert "device  dtype" in proc.stdout


# --- lab --------------------------------------------------------------------------------------


def test_lab_list_names_experiments_presets_and_datasets(capsys):
    assert cli.main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert "figure1" in out and "claim:" in out
    from batchnorm.lab.registry import EXPERIMENTS

    for experiment in EXPERIMENTS.values():  # every experiment, whatever its config's fields
        assert f"\n  {experiment.cli_name}  {experiment.title}\n" in out
    for preset in ("tiny", "quick (default)", "full", "paper"):
        assert f"preset {preset}" in out
    for dataset in ("mnist1d", "digits", "mnist"):
        assert f"\n  {dataset}  " in out


def test_lab_run_then_plot(tmp_path, capsys):
    argv = ["lab", "run", "figure1", "--preset", "tiny", "--seeds", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out
    verdicts = [
        line
        for line in out.splitlines()
        if line.startswith(("HELD:", "NOT HELD:", "INCONCLUSIVE:"))
    ]
    assert len(verdicts) == len(figure1.RULES)
    (run_dir,) = (tmp_path / "figure1").iterdir()
    assert f"wrote {run_dir}/" in out
    assert cli.main(["lab", "plot", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'figures' / 'figure1.png'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (
            ["lab", "run", "figure-1"],
            "unknown experiment 'figure-1'; choose one of: "
            + ", ".join(sorted(e.cli_name for e in EXPERIMENTS.values()))
            + ".",
        ),
        (["lab", "run", "figure1", "--preset", "fast"], "invalid choice: 'fast'"),
        (["lab", "run", "figure1", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["lab", "run", "figure1", "--seeds", "0"], "expected an int >= 1, got '0'."),
        (
            ["lab", "run", "figure1", "--resume", "x", "--seeds", "2"],
            "saved settings), got --seeds.",
        ),
        (["lab", "run"], "EXPERIMENT"),
        (["lab"], "LAB_COMMAND"),
        (["lab", "plot"], "RUN_DIR"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_lab_usage_error_exits_2_naming_the_bad_value(argv, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: batchnorm lab" in err
    assert bad in err.splitlines()[-1]


def test_lab_run_preset_error_lists_valid_presets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["lab", "run", "figure1", "--preset", "fast"])
    presets = dict.fromkeys(p for e in EXPERIMENTS.values() for p in e.presets)
    assert {"tiny", "quick", "paper"} <= set(presets)
    assert f"(choose from {', '.join(map(repr, presets))})" in capsys.readouterr().err


def test_lab_run_rejects_a_preset_of_another_experiment(capsys):
    assert "paper" not in EXPERIMENTS["population"].presets
    with pytest.raises(SystemExit) as exc:
        cli.main(["lab", "run", "population", "--preset", "paper"])
    assert exc.value.code == 2
    presets = ", ".join(EXPERIMENTS["population"].presets)
    assert f"expected one of {presets} for 'population', got 'paper'" in (capsys.readouterr().err)


def test_lab_run_all_writes_one_report_and_continues(tmp_path, capsys):
    argv = ["lab", "run", "all", "--preset", "tiny", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"report:  {tmp_path / 'report.html'}" in out
    assert "| experiment | claim |" in out
    for experiment in EXPERIMENTS.values():
        (run_dir,) = (tmp_path / experiment.name).iterdir()
        assert (run_dir / "summary.json").is_file()
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= len(EXPERIMENTS)
    summary = (tmp_path / "summary.md").read_text()
    n_rules = sum(len(e.rules) for e in EXPERIMENTS.values())
    assert summary.count("\n| ") >= n_rules
    # The same command again keeps the complete runs: nothing is trained twice.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("complete run kept") == len(EXPERIMENTS)
    for experiment in EXPERIMENTS.values():
        assert len(list((tmp_path / experiment.name).iterdir())) == 1


def test_lab_tune_writes_the_tuned_file_it_is_given(tmp_path, capsys):
    path = tmp_path / "tuned.json"
    argv = ["lab", "tune", "figure1", "--preset", "tiny", "--workers", "1"]
    assert cli.main([*argv, "--tuned-file", str(path)]) == 0
    record = json.loads(path.read_text())["figure1"]
    assert set(record["arms"]) == set(figure1.PRESETS["tiny"].arms)
    assert f"wrote {path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["lab", "run", "all", "--seeds", "2"], "got --seeds."),
        (["lab", "tune", "all"], "expected one experiment, got all."),
    ],
    ids=["all-with-seeds", "tune-all"],
)
def test_lab_all_usage_errors(argv, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert bad in capsys.readouterr().err.splitlines()[-1]


def test_lab_run_experiment_error_suggests_nearest(capsys):
    with pytest.raises(SystemExit):
        cli.main(["lab", "run", "figure-1"])
    assert "Did you mean 'figure1'?" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["lab", "run", "figure1", "--preset", "tiny", "--dataset", "mnist"],
            "batchnorm lab run: load_dataset('mnist'): expected data_dir",
        ),
        (["lab", "plot", "no/such/run"], "batchnorm lab plot: expected a run directory holding"),
        (
            ["lab", "run", "figure1", "--resume"],
            "batchnorm lab run: resume: expected an incomplete",
        ),
    ],
    ids=["mnist-without-data-dir", "plot-missing-dir", "resume-nothing"],
)
def test_lab_failure_exits_1_with_one_error_line(argv, message, tmp_path, capsys):
    assert cli.main([*argv, *(["--out", str(tmp_path)] if argv[1] == "run" else [])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(message)


def test_lab_help_is_available_for_every_subcommand(capsys):
    for argv in (["lab"], ["lab", "list"], ["lab", "run"], ["lab", "plot"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
        assert exc.value.code == 0
        assert "usage: batchnorm lab" in capsys.readouterr().out


# --- lab: resuming ----------------------------------------------------------------------------


def interrupt_run(out, monkeypatch) -> Path:
    """A tiny figure1 run stopped in seed 1 at step 30 (seed 0 done, a checkpoint at step 20)."""
    experiment = EXPERIMENTS["figure1"]

    def run_seed(config, data, seed, *, advance, **kwargs):
        def counting(n):
            advance(n)
            counting.done += n
            if seed == 1 and counting.done >= 30:
                raise KeyboardInterrupt

        counting.done = 0
        return experiment.run_seed(config, data, seed, advance=counting, **kwargs)

    with monkeypatch.context() as patch:
        patch.setitem(EXPERIMENTS, "figure1", dataclasses.replace(experiment, run_seed=run_seed))
        argv = ["lab", "run", "figure1", "--preset", "tiny", "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 130
    (run_dir,) = (out / "figure1").iterdir()
    return run_dir


def test_lab_run_resume_after_a_failed_start_continues_the_interrupted_run(
    tmp_path, monkeypatch, capsys
):
    run_dir = interrupt_run(tmp_path, monkeypatch)
    argv = ["lab", "run", "figure1", "--preset", "tiny", "--dataset", "mnist"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 1  # no --data-dir
    assert list((tmp_path / "figure1").iterdir()) == [run_dir]
    capsys.readouterr()
    resume = ["lab", "run", "figure1", "--resume", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(resume) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir}" in out
    assert (run_dir / "summary.json").is_file()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("checkpoints/seed-1.pt", b""),
        ("checkpoints/seed-1.pt", b"\x80\x02garbage" * 20),
        ("seeds/seed-0.json", b"{}"),
        ("config.json", b"{}"),
    ],
    ids=["checkpoint-empty", "checkpoint-random", "seed-empty-object", "config-empty-object"],
)
def test_lab_run_resume_with_a_damaged_file_exits_1_with_one_line_naming_it(
    name, content, tmp_path, monkeypatch, capsys
):
    run_dir = interrupt_run(tmp_path, monkeypatch)
    (run_dir / name).write_bytes(content)
    capsys.readouterr()
    assert cli.main(["lab", "run", "figure1", "--resume", str(run_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"batchnorm lab run: {run_dir / name}: expected "), err[0]
    assert "weights_only" not in err[0] or "weights_only=True" in err[0]
    assert (run_dir / name).read_bytes() == content
