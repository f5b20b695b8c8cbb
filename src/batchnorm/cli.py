"""The ``batchnorm`` command line: thin argparse wrappers over library functions.

Subcommands:
    ``batchnorm info``    versions, thread settings, and which backend serves which input.
    ``batchnorm warmup``  compile (or load from Numba's on-disk cache) every kernel ahead of time.
    ``batchnorm demo``    train a digits MLP with torch.nn's and with our BatchNorm1d; compare.
    ``batchnorm lab list``              the lab's experiments, presets and datasets.
    ``batchnorm lab run EXPERIMENT``    run one (``--preset``, ``--dataset``, ``--seeds``,
                                        ``--out``, ``--resume``, ``--workers``); writes a run
                                        directory.
    ``batchnorm lab run all --preset P --out DIR``   every experiment, then ``DIR/report.html``
                                        and ``DIR/summary.md``; the same command continues.
    ``batchnorm lab tune EXPERIMENT``   tune each arm on the validation split; writes the
                                        tuned file the presets read.
    ``batchnorm lab plot RUN_DIR``      regenerate a run's figures from its saved results.

Exit codes: 0 on success, 2 on a usage error (argparse's convention), 1 when a run fails. A
failure is reported as one line on stderr, ``batchnorm <command>: <what was expected>, got
<what happened>.``. Also reachable as ``python -m batchnorm``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence

from . import __version__

__all__ = ["main"]

# Where `lab run` writes unless told otherwise.
_DEFAULT_OUT = "runs"
# Exceptions that carry a message meant for the user (house style b.4). Anything else is a bug
# and keeps its traceback.
_USER_ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError, ImportError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``batchnorm`` command.

    Args:
        argv: The arguments after the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The exit code: 0 on success, 1 when the run failed. Usage errors do not return: argparse
        prints the usage and a message naming the bad value, and raises ``SystemExit(2)``.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args, parser)
    except _USER_ERRORS as err:
        print(f"batchnorm {_label(args)}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"batchnorm {_label(args)}: interrupted.", file=sys.stderr)
        return 130


def _label(args: argparse.Namespace) -> str:
    """The command as the user typed it, for error lines: ``demo``, ``lab run``."""
    sub = getattr(args, "lab_command", None)
    return f"{args.command} {sub}" if sub else args.command


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers ``>= low``, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}.")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch Normalization for PyTorch on Numba CPU kernels.",
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info",
        help="versions, threads, and which backend serves which input",
        description="Print versions, thread settings and the backend chosen for each kind of "
        "input (numba: our kernels; torch: torch's native op).",
    )
    info.set_defaults(run=_cmd_info)

    warmup = sub.add_parser(
        "warmup",
        help="compile the Numba kernels ahead of time",
        description="Compile every Numba kernel, or load it from Numba's on-disk cache, so that "
        "the first batch-norm call of a later process does not pay for compilation.",
    )
    warmup.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes compiling at the same time (default: the number of CPUs)",
    )
    warmup.set_defaults(run=_cmd_warmup)

    demo = sub.add_parser(
        "demo",
        help="train a digits MLP with torch.nn's and our BatchNorm1d and compare them",
        description="Train a 64-128-BN-ReLU-128-BN-ReLU-10 MLP on scikit-learn's digits twice, "
        "with torch.nn.BatchNorm1d and with batchnorm.BatchNorm1d, from the same initial "
        "weights and batches. Exits 0 if the two agree (final logits within 1e-3, identical "
        "predictions), 1 otherwise.",
    )
    demo.add_argument("--epochs", type=_int_at_least(1), default=3, help="default: 3")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="default: 0")
    demo.add_argument(
        "--batch-size", type=_int_at_least(2), default=64, metavar="N", help="default: 64"
    )
    demo.set_defaults(run=_cmd_demo)
    _add_lab_parser(sub)
    return parser


# --- lab --------------------------------------------------------------------------------------


def _experiment_name(text: str) -> str:
    """An argparse ``type`` for an experiment's name; its error lists the valid names."""
    from .lab.registry import get_experiment

    if text == "all":
        return text
    try:
        return get_experiment(text).cli_name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_lab_parser(sub: argparse._SubParsersAction) -> None:
    from .lab.data import DATASETS
    from .lab.registry import EXPERIMENTS

    names = ", ".join(e.cli_name for e in EXPERIMENTS.values())
    presets = list(dict.fromkeys(p for e in EXPERIMENTS.values() for p in e.presets))
    lab = sub.add_parser(
        "lab",
        help="experiments that reproduce the paper's claims, with figures",
        description="Experiments that reproduce claims of Ioffe & Szegedy (2015) on real data "
        "(offline), with several seeds, saved results and figures.",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)

    listing = lab_sub.add_parser(
        "list",
        help="the experiments, their presets and the datasets",
        description="List the experiments (with the claim each tests), their presets and the "
        "datasets.",
    )
    listing.set_defaults(run=_cmd_lab_list)

    run = lab_sub.add_parser(
        "run",
        help="run an experiment; writes runs/<experiment>/<timestamp>/",
        description="Run an experiment for all its seeds and write config.json, metrics.jsonl, "
        "summary.json, summary.md and figures/*.png to OUT/<experiment>/<timestamp>/. Prints "
        "whether the paper's claim held. Interrupted runs continue with --resume.",
    )
    run.add_argument(
        "experiment",
        type=_experiment_name,
        metavar="EXPERIMENT",
        help=f"one of: {names}; or all (every experiment, then OUT/report.html)",
    )
    run.add_argument(
        "--preset",
        choices=presets,
        default=None,
        help="tiny: seconds, for CI; quick: minutes, for a person; full: the record "
        "(figure1's paper is its full) (default: quick)",
    )
    run.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help="default: the preset's (mnist1d for quick and paper)",
    )
    run.add_argument(
        "--data-dir", default=None, metavar="DIR", help="directory with the MNIST IDX files"
    )
    run.add_argument(
        "--seeds", type=_int_at_least(1), default=None, metavar="N", help="default: the preset's"
    )
    run.add_argument(
        "--out",
        default=_DEFAULT_OUT,
        metavar="DIR",
        help="default: runs (with all: runs/lab-<preset>-<timestamp>)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run (default: the newest incomplete one under --out "
        "that can be resumed; its name is printed) with its saved settings",
    )
    run.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="seeds trained at once, one process each (default: in parallel when it pays)",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is off without a TTY)"
    )
    run.set_defaults(run=_cmd_lab_run, subparser=run)

    tune = lab_sub.add_parser(
        "tune",
        help="tune each arm of an experiment on the validation split; writes the tuned file",
        description="Tune each arm of an experiment on its own over a grid that is extended "
        "until it brackets the optimum, on the validation split and a seed no preset reports; "
        "write the chosen values to the tuned file (src/batchnorm/lab/tuned.json), which the "
        "presets read. Commit that file with the code.",
    )
    tune.add_argument(
        "experiment", type=_experiment_name, metavar="EXPERIMENT", help=f"one of: {names}"
    )
    tune.add_argument(
        "--preset", choices=presets, default=None, help="default: the experiment's tuning preset"
    )
    tune.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="grid points scored at once, one process each (default: the number of CPUs)",
    )
    tune.add_argument(
        "--tuned-file", default=None, metavar="PATH", help="default: the package's tuned.json"
    )
    tune.set_defaults(run=_cmd_lab_tune, subparser=tune)

    plot = lab_sub.add_parser(
        "plot",
        help="regenerate a run's figures from its saved results",
        description="Redraw figures/*.png of a run directory from config.json and seeds/*.json "
        "alone: no training.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `lab run`")
    plot.set_defaults(run=_cmd_lab_plot)


def _cmd_lab_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .lab.data import DATASETS
    from .lab.registry import EXPERIMENTS

    print("experiments (batchnorm lab run EXPERIMENT [--preset P]):")
    for experiment in EXPERIMENTS.values():
        print(f"  {experiment.cli_name}  {experiment.title}")
        print(f"    claim: {experiment.claim}")
        for name, config in experiment.presets.items():
            default = " (default)" if name == experiment.default_preset else ""
            print(
                f"    preset {name}{default}: {config.seeds} seeds x "
                f"{experiment.steps_per_seed(config)} steps on {config.dataset}"
            )
    print("datasets (--dataset):")
    for name, description in DATASETS.items():
        print(f"  {name}  {description}")
    return 0


def _cmd_lab_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .lab import runner
    from .lab.registry import get_experiment

    progress = False if args.no_progress else None
    if args.experiment == "all":
        return _lab_run_all(args, progress)
    if args.resume is not None:
        given = [
            flag
            for flag, value in (
                ("--preset", args.preset),
                ("--dataset", args.dataset),
                ("--data-dir", args.data_dir),
                ("--seeds", args.seeds),
            )
            if value is not None
        ]
        if given:
            args.subparser.error(
                "argument --resume: expected no --preset, --dataset, --data-dir or --seeds "
                f"with it (a resumed run keeps its saved settings), got {' '.join(given)}."
            )
        run_dir = args.resume or runner.find_resumable(args.out, args.experiment, verbose=True)
        spec = runner.load_run(run_dir)
        if spec.experiment.cli_name != args.experiment:
            raise ValueError(
                f"expected a run of {args.experiment!r} to resume, got {str(run_dir)!r}, a run "
                f"of {spec.experiment.cli_name!r}."
            )
        runner.resume_run(run_dir, progress=progress, workers=args.workers)
        return 0
    # --preset's choices are every experiment's presets; one experiment's is a usage error.
    presets = get_experiment(args.experiment).presets
    if args.preset is not None and args.preset not in presets:
        args.subparser.error(
            f"argument --preset: expected one of {', '.join(presets)} for "
            f"{args.experiment!r}, got {args.preset!r}."
        )
    runner.run_experiment(
        args.experiment,
        preset=args.preset,
        overrides={"dataset": args.dataset, "data_dir": args.data_dir, "seeds": args.seeds},
        out=args.out,
        progress=progress,
        workers=args.workers,
    )
    return 0


def _lab_run_all(args: argparse.Namespace, progress: bool | None) -> int:
    from .lab.report import claims_table_markdown
    from .lab.suite import run_all

    given = [
        flag
        for flag, value in (
            ("--dataset", args.dataset),
            ("--data-dir", args.data_dir),
            ("--seeds", args.seeds),
            ("--resume", args.resume),
        )
        if value is not None
    ]
    if given:
        args.subparser.error(
            "argument EXPERIMENT: expected only --preset, --out, --workers and --no-progress "
            f"with all (run the same command again to continue), got {' '.join(given)}."
        )
    preset = args.preset or "quick"
    out = args.out
    if out == _DEFAULT_OUT:
        # A directory of its own per suite run, so that one report never mixes two runs.
        out = os.path.join(out, f"lab-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    try:
        suite = run_all(preset, out, workers=args.workers, progress=progress, log=print)
    except KeyboardInterrupt:
        print(
            f"interrupted; continue with: batchnorm lab run all --preset {preset} --out {out}",
            file=sys.stderr,
        )
        raise
    print()
    print(f"Claims ({preset} preset):")
    print(claims_table_markdown(suite.claims))
    print()
    for name, seconds in suite.seconds.items():
        print(f"{name}: {seconds:.0f} s ({suite.run_dirs[name]})")
    print(f"summary: {suite.markdown}")
    print(f"report:  {suite.html}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    return 0


def _cmd_lab_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .lab.tuning import tune_experiment

    if args.experiment == "all":
        args.subparser.error("argument EXPERIMENT: expected one experiment, got all.")
    workers = args.workers or (os.cpu_count() or 1)
    tune_experiment(
        args.experiment, preset=args.preset, workers=workers, path=args.tuned_file, log=print
    )
    return 0


def _cmd_lab_plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .lab import runner

    runner.plot_run(args.run_dir)
    return 0


# --- info -------------------------------------------------------------------------------------


def _threading_layer() -> str:
    """Name of Numba's threading layer, choosing it by running a tiny parallel loop if needed.

    Numba picks its layer (tbb, omp or workqueue) at the first parallel launch of a process;
    the probe makes that choice the same way the kernels' first call would.
    """
    import numba

    # numba.config sets its settings at run time, so numba's inline types miss them.
    if numba.config.DISABLE_JIT:  # type: ignore[attr-defined]
        return "none (NUMBA_DISABLE_JIT=1)"
    try:
        return numba.threading_layer()
    except ValueError:  # not chosen yet in this process
        pass

    @numba.njit(parallel=True)
    def probe(n):
        total = 0
        for i in numba.prange(n):
            total += i
        return total

    probe(2)
    return numba.threading_layer()


def _environment() -> list[tuple[str, str]]:
    import numba
    import numpy
    import torch

    # numba.config sets its settings at run time, so numba's inline types miss them.
    disable_jit = numba.config.DISABLE_JIT  # type: ignore[attr-defined]
    max_threads = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    jit = "disabled (NUMBA_DISABLE_JIT=1)" if disable_jit else "enabled"
    cache = os.environ.get("NUMBA_CACHE_DIR") or "__pycache__ beside the kernel sources"
    return [
        ("batchnorm", __version__),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("platform", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
        ("numba", numba.__version__),
        ("numba jit", jit),
        ("numba threading layer", _threading_layer()),
        (
            "numba threads",
            f"{numba.get_num_threads()} (NUMBA_NUM_THREADS={max_threads})",
        ),
        ("numba cache", cache),
        (
            "torch threads",
            f"{torch.get_num_threads()} (interop: {torch.get_num_interop_threads()})",
        ),
    ]


def _backend_table() -> tuple[list[str], list[list[str]]]:
    """Rows ``[device, dtype, backend per layout...]`` from :func:`batchnorm.backend_for`.

    The meta device stands for every non-CPU device: it carries no data, so the table can be
    built on any machine.
    """
    import torch

    from .functional import backend_for

    layouts = {
        "(N, C)": lambda t: t.flatten(2).sum(2),
        "(N, C, H, W)": lambda t: t,
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "strided": lambda t: t[..., ::2],
    }
    header = ["device", "dtype", *layouts]
    rows = []
    cases = [("cpu", dt) for dt in ("float32", "float64", "bfloat16", "float16")]
    cases.append(("meta", "float32"))
    for device, dtype in cases:
        base = torch.zeros(4, 3, 2, 6, dtype=getattr(torch, dtype), device=device)
        row = [device, dtype]
        for make in layouts.values():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.append(backend_for(make(base)))
            except Exception as err:  # a table cell, not a crash: show what went wrong
                row.append(f"error: {type(err).__name__}")
        rows.append(row)
    return header, rows


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip()
    return "\n".join([head, *lines])


def _cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    env = _environment()
    width = max(len(name) for name, _ in env)
    for name, value in env:
        print(f"{name.ljust(width)}  {value}")
    print()
    print("backend per input in training mode (numba: our kernels; torch: torch's native op;")
    print("meta stands for any non-CPU device):")
    header, rows = _backend_table()
    print(_format_table(header, rows))
    print()
    for line in _dispatch_lines():
        print(line)
    return 0


def _dispatch_lines() -> list[str]:
    """The routing policy in force and the state of the output cache, read from the code."""
    from . import outputs
    from .routing import format_bytes, routing_policy

    cache = outputs.output_cache_info()
    return [
        *routing_policy().describe(),
        f"output cache: outputs of {format_bytes(outputs.MIN_BYTES)} or more reuse buffers; "
        f"limit {format_bytes(cache.limit)}, holding {format_bytes(cache.held)} "
        f"({format_bytes(cache.idle)} idle) in {cache.buffers} buffers",
    ]


# --- warmup -----------------------------------------------------------------------------------


def _cmd_warmup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numba

    from .kernels import ACTIVATED_CODES, GROUPED_KERNELS, KERNELS, activated, warmup

    # numba.config sets its settings at run time, so numba's inline types miss them.
    if numba.config.DISABLE_JIT:  # type: ignore[attr-defined]
        print("NUMBA_DISABLE_JIT=1: the kernels run as plain Python; there is nothing to compile.")
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs!r}.")
    start = time.perf_counter()
    warmup(jobs=args.jobs)
    elapsed = time.perf_counter() - start
    kernels = set(KERNELS.values()) | set(GROUPED_KERNELS.values())
    for code in ACTIVATED_CODES:
        layer_kernels = activated.kernels_for(code)
        kernels |= {
            getattr(layer_kernels, f"{op}_{v}")
            for op in ("train", "eval", "backward")
            for v in ("rows", "cols")
        }
    specialisations = sum(len(getattr(k, "signatures", ())) for k in kernels)
    print(
        f"{len(kernels)} Numba kernels ({specialisations} type specialisations) ready in "
        f"{elapsed:.1f} s: compiled, or loaded from Numba's on-disk cache."
    )
    return 0


# --- demo -------------------------------------------------------------------------------------


def _progress_bar(total_hint: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """An ``on_step`` callback driving a tqdm bar, and a function that closes the bar.

    The bar is off when stdout is not a terminal or ``CI`` is set, and when tqdm (the ``lab``
    extra) is missing.
    """
    enabled = sys.stdout.isatty() and not os.environ.get("CI")
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        enabled = False
    bar = None

    def on_step(step: int, total: int) -> None:
        nonlocal bar
        if not enabled:
            return
        if bar is None:
            bar = tqdm(total=total, desc=total_hint, unit="step", leave=False)
        bar.update(step - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return on_step, close


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._demo import LOGITS_ATOL, DemoConfig, run_demo

    try:
        config = DemoConfig(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2
    on_step, close = _progress_bar("training both models")
    try:
        result = run_demo(config, on_step=on_step)
    finally:
        close()

    h = config.hidden
    epochs = f"{config.epochs} epoch" + ("s" if config.epochs != 1 else "")
    print(
        f"MLP 64-{h}-BN-ReLU-{h}-BN-ReLU-10 on scikit-learn digits: {result.n_train} train / "
        f"{result.n_test} test images, {epochs} of SGD, batch {config.batch_size}, "
        f"seed {config.seed}"
    )
    print(f"  test accuracy, torch.nn.BatchNorm1d:   {result.accuracy_torch:.4f}")
    print(f"  test accuracy, batchnorm.BatchNorm1d:  {result.accuracy_ours:.4f}")
    print(
        f"  max |logit difference|:                {result.max_logit_diff:.2e}"
        f" (tolerance {LOGITS_ATOL:.0e})"
    )
    same = result.n_test - result.prediction_mismatches
    print(f"  identical predictions:                 {same}/{result.n_test}")
    print(f"  time:                                  {result.seconds:.1f} s")
    if result.agree:
        print("OK: the two models agree.")
        return 0
    print(
        f"batchnorm demo: expected max |logit difference| < {LOGITS_ATOL:.0e} and identical "
        f"predictions, got {result.max_logit_diff:.2e} and "
        f"{result.prediction_mismatches} differing predictions.",
        file=sys.stderr,
    )
    return 1
