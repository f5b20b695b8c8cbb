"""A run directory's files read back, each checked before the runner trusts it.

``config.json`` must name a known experiment and hold a config of it that the config class
accepts, every field present with a value of its type. A checkpoint is read with
``torch.load(weights_only=True)`` only, and must record the experiment, seed and config it was
saved for (:func:`checkpoint_record`), which must be the run's own; its step must be one at
which a checkpoint is saved, and the experiment's ``check_checkpoint`` must accept the
training state. A finished seed's result must parse and pass the experiment's
``check_result``: every key, every measurement. Anything else raises :class:`RunFileError`,
one line naming the file and what is wrong with it, so that a damaged file is reported before
any training and never turns into a wrong result or a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from . import _checks as check
from ._training import checkpoint_steps
from .registry import EXPERIMENTS, Experiment

__all__ = [
    "CHECKPOINT_FORMAT",
    "CONFIG_FILE",
    "RunFileError",
    "RunSpec",
    "checkpoint_record",
    "load_checkpoint",
    "read_json",
    "read_result",
    "read_spec",
    "read_summary",
    "verify_written_result",
]

CONFIG_FILE = "config.json"
# The version of the dict checkpoint_record wraps a training state in. 1: format, experiment,
# seed, config, state. Checkpoints of earlier versions were the bare training state.
CHECKPOINT_FORMAT = 1


class RunFileError(ValueError):
    """A file of a run directory that cannot be used: empty, cut short, not what the lab
    writes, or written for another run.

    The message is one line that starts with the file:
    ``<file>: expected <what>, got <what>.[ <what to do>]``.

    Attributes:
        path: The file.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.message)


def _sentence(err: BaseException) -> str:
    """An exception's message as one sentence ending in a full stop."""
    text = " ".join(str(err).split())
    return text if text.endswith(".") else f"{text}."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path, what: str, fix: str = "") -> Any:
    """The JSON in ``path``; :class:`RunFileError` if the file is empty, not UTF-8 or not JSON
    (``NaN`` and ``Infinity`` included: the lab never writes them). ``fix`` (a sentence with a
    leading space) ends the message."""
    data = path.read_bytes()
    if not data:
        raise RunFileError(path, f"expected {what}, got an empty file.{fix}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if isinstance(err, UnicodeDecodeError):
            reason = f"not UTF-8 at byte {err.start}"
        elif isinstance(err, json.JSONDecodeError):
            reason = f"{err.msg} at line {err.lineno} column {err.colno}"
        else:
            reason = str(err)
        raise RunFileError(
            path, f"expected {what}, got {len(data)} bytes that are not valid JSON ({reason}).{fix}"
        ) from err


# --- config.json ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """What ``config.json`` says was run.

    Attributes:
        experiment: The experiment.
        config: Its configuration, rebuilt and checked by the config class.
        preset: The preset the configuration started from (``None`` if not recorded).
    """

    experiment: Experiment
    config: Any
    preset: str | None


# Annotations of the config classes' fields -> the JSON values they accept.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "tuple[float, ...]": (list, tuple),
}


def _value_fits(annotation: str, value: Any) -> bool:
    """Whether a JSON value fits a field annotated ``annotation`` (e.g. ``"int | None"``);
    annotations this table does not know are left to the config class's own checks."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None":
            if value is None:
                return True
            continue
        kinds = _FIELD_TYPES.get(part)
        if kinds is None:
            return True
        if isinstance(value, bool) and bool not in kinds:
            continue
        if isinstance(value, kinds):
            if part.startswith("tuple") and isinstance(value, (list, tuple)):
                return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            return True
    return False


def read_spec(run_dir: Path) -> RunSpec:
    """Read and check ``run_dir/config.json``.

    Raises:
        FileNotFoundError: If there is no ``config.json``.
        RunFileError: If it is not a config the lab wrote: not JSON, a key missing, an unknown
            experiment, a config field missing or unknown or of the wrong type, or a value the
            config class refuses.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"expected a run directory holding {CONFIG_FILE}, got {str(run_dir)!r}"
            + (", which does not exist." if not run_dir.exists() else " without one.")
        )
    fix = " The run cannot be resumed or plotted from it; start a new run."
    keys = ["experiment", "preset", "config"]
    spec = read_json(path, f"a JSON object with the keys {keys}", fix)
    if not isinstance(spec, Mapping) or any(k not in spec for k in keys):
        got = check.describe(spec)
        if isinstance(spec, Mapping):
            got = f"one without {[k for k in keys if k not in spec]}"
        raise RunFileError(path, f"expected a JSON object with the keys {keys}, got {got}.{fix}")
    by_name = {e.name: e for e in EXPERIMENTS.values()}
    if not isinstance(spec["experiment"], str) or spec["experiment"] not in by_name:
        raise RunFileError(
            path,
            f"expected 'experiment' to be one of {sorted(by_name)}, got "
            f"{check.describe(spec['experiment'])}.{fix}",
        )
    experiment = by_name[spec["experiment"]]
    if spec["preset"] is not None and not isinstance(spec["preset"], str):
        got = check.describe(spec["preset"])
        raise RunFileError(path, f"expected 'preset' to be a name or null, got {got}.{fix}")
    config_type = experiment.config_type
    values = spec["config"]
    annotations = {f.name: str(f.type) for f in fields(config_type)}
    if not isinstance(values, Mapping) or set(values) != set(annotations):
        got = check.describe(values)
        if isinstance(values, Mapping):
            missing = sorted(set(annotations) - set(values))
            unknown = sorted(set(values) - set(annotations))
            got = f"one without {missing}" if missing else f"one with unknown {unknown}"
        raise RunFileError(
            path,
            f"expected 'config' to hold every field of {config_type.__name__} "
            f"({', '.join(annotations)}), got {got}.{fix}",
        )
    for name, annotation in annotations.items():
        if not _value_fits(annotation, values[name]):
            raise RunFileError(
                path,
                f"expected config[{name!r}] to be {annotation}, got "
                f"{check.describe(values[name])}.{fix}",
            )
    try:
        config = config_type(**values)
    except (TypeError, ValueError) as err:
        raise RunFileError(
            path,
            f"expected a config {config_type.__name__} accepts, got one it refuses "
            f"({_sentence(err).rstrip('.')}).{fix}",
        ) from err
    return RunSpec(experiment, config, spec["preset"])


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_record(experiment: Experiment, config: Any, seed: int, state: dict) -> dict:
    """What the runner saves as a checkpoint: the training state ``run_seed`` handed over, with
    the experiment, seed and config it belongs to."""
    return {
        "format": CHECKPOINT_FORMAT,
        "experiment": experiment.name,
        "seed": seed,
        "config": asdict(config),
        "state": state,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _config_difference(saved: Any, config: Any) -> str:
    """The fields in which a checkpoint's saved config differs from ``config``, as text; empty
    if there are none."""
    want = asdict(config)
    if not isinstance(saved, Mapping):
        return check.describe(saved)
    missing = object()
    differ = [
        f"{name}={saved.get(name, 'nothing')!r} where {CONFIG_FILE} has {want.get(name)!r}"
        for name in sorted(set(saved) | set(want), key=str)
        if _plain(saved.get(name, missing)) != _plain(want.get(name, missing))
    ]
    return ", ".join(differ)


def _check_record(record: Any, experiment: Experiment, config: Any, seed: int) -> dict:
    """The training state in a checkpoint, after checking what it says it belongs to."""
    keys = ["format", "experiment", "seed", "config", "state"]
    if isinstance(record, Mapping) and "format" not in record and "step" in record:
        raise ValueError(
            f"expected a checkpoint that records its experiment, seed and config (format "
            f"{CHECKPOINT_FORMAT}), got one of an earlier version without them, which cannot be "
            "matched to this run."
        )
    if not isinstance(record, Mapping) or any(k not in record for k in keys):
        got = check.describe(record)
        if isinstance(record, Mapping):
            got = f"one without {[k for k in keys if k not in record]}"
        raise ValueError(f"expected a dict with the keys {keys}, got {got}.")
    if record["format"] != CHECKPOINT_FORMAT:
        got = check.describe(record["format"])
        raise ValueError(f"expected checkpoint format {CHECKPOINT_FORMAT}, got {got}.")
    if record["experiment"] != experiment.name:
        got = check.describe(record["experiment"])
        raise ValueError(f"expected a checkpoint of experiment {experiment.name!r}, got {got}.")
    if record["seed"] != seed or isinstance(record["seed"], bool):
        got = check.describe(record["seed"])
        raise ValueError(f"expected a checkpoint of seed {seed}, got one of seed {got}.")
    difference = _config_difference(record["config"], config)
    if difference:
        raise ValueError(
            f"expected a checkpoint of this run's config ({CONFIG_FILE}), got one saved with "
            f"{difference}."
        )
    state = record["state"]
    if not hasattr(config, "checkpoint_every"):
        # Checkpointed per unit (batchnorm.lab._units): the experiment's check_checkpoint
        # holds the step to the units the state holds.
        check.integer(
            check.item(state, "step", "state"), "state['step']", range(1, 2**62), "an int >= 1"
        )
        check.number(check.item(state, "seconds", "state"), "state['seconds']", low=0)
        return state
    steps = checkpoint_steps(config)
    every = config.checkpoint_every
    if not steps:
        raise ValueError(
            f"expected no checkpoint, as this config saves none (checkpoint_every {every}, "
            f"steps {config.steps}), got one."
        )
    expected = f"a multiple of {every} in [{every}, {config.steps})"
    check.integer(check.item(state, "step", "state"), "state['step']", steps, expected)
    check.number(check.item(state, "seconds", "state"), "state['seconds']", low=0)
    return state


def _load_failure(err: BaseException) -> str:
    """Why torch.load failed, in a few words; never torch's advice to load unsafely."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if not first or "weights_only" in first or len(first) > 120:
        return type(err).__name__
    return f"{type(err).__name__}: {first}"


def load_checkpoint(path: Path, experiment: Experiment, config: Any, seed: int, data: Any) -> dict:
    """The training state in checkpoint ``path`` of seed ``seed``, checked against the run.

    Raises:
        RunFileError: If torch cannot read it with ``weights_only=True``, or it belongs to
            another experiment, seed or config, or its step or training state is not one
            ``run_seed`` could have saved.
    """
    fix = f" Move the file away to restart seed {seed} from step 0."
    size = path.stat().st_size
    what = "a checkpoint saved by batchnorm lab run"
    if not size:
        raise RunFileError(path, f"expected {what}, got an empty file.{fix}")
    import torch

    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the unpickler meets in a damaged file
        raise RunFileError(
            path,
            f"expected {what}, got {size} bytes that torch.load(weights_only=True) cannot "
            f"read ({_load_failure(err)}).{fix}",
        ) from err
    try:
        state = _check_record(record, experiment, config, seed)
        experiment.check_checkpoint(config, data, seed, state)
    except ValueError as err:
        raise RunFileError(path, f"{_sentence(err)}{fix}") from err
    except (TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:  # a check missed
        raise RunFileError(
            path, f"expected {what}, got contents it cannot use ({err!r}).{fix}"
        ) from err
    return state


# --- results and summaries --------------------------------------------------------------------


def read_result(path: Path, experiment: Experiment, config: Any, seed: int) -> dict:
    """The result of seed ``seed`` in ``path``, checked by the experiment's ``check_result``.

    Raises:
        RunFileError: If it is not JSON, or not a complete result of this seed and config.
    """
    fix = f" Move the file away to train seed {seed} again with --resume."
    result = read_json(path, f"the result of seed {seed}", fix)
    try:
        check.number(check.item(result, "seconds", "result"), "result['seconds']", low=0)
        experiment.check_result(config, seed, result)
    except ValueError as err:
        raise RunFileError(path, f"{_sentence(err)}{fix}") from err
    except (TypeError, KeyError, IndexError, AttributeError, RuntimeError) as err:  # a check missed
        raise RunFileError(
            path, f"expected the result of seed {seed}, got one it cannot use ({err!r}).{fix}"
        ) from err
    return result


def verify_written_result(
    path: Path, result: dict, experiment: Experiment, config: Any, seed: int
) -> dict:
    """Read a result just written back; it must pass its check and equal what was written.

    Returns:
        The result as read back.

    Raises:
        RunFileError: If the file does not hold what was written.
    """
    found = read_result(path, experiment, config, seed)
    if found != json.loads(json.dumps(result)):
        raise RunFileError(
            path,
            f"expected the result of seed {seed} just written, got a file that differs from it "
            "when read back. Check the disk, then resume the run.",
        )
    return found


def read_summary(path: Path) -> dict | None:
    """``summary.json`` if it exists (``None`` if not).

    Raises:
        RunFileError: If it is not a JSON object.
    """
    if not path.is_file():
        return None
    what = "the JSON object batchnorm lab run writes as a run's summary"
    fix = " Move it away and resume the run to write it again."
    summary = read_json(path, what, fix)
    if not isinstance(summary, dict):
        raise RunFileError(path, f"expected {what}, got {check.describe(summary)}.{fix}")
    return summary
