"""``batchnorm.lightning.SyncBatchNormPlugin`` under a real Lightning ``Trainer``: 2 DDP ranks, CPU.

One Trainer run, as users start one: this file is also the training script. The test runs
``python tests/test_lightning.py OUT`` in its own session; the script builds a tiny
LightningModule (torch.nn layers converted to ours by ``batchnorm.convert``) and fits it with
``Trainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True,
plugins=[SyncBatchNormPlugin()])``, and Lightning's ``ddp`` launcher starts rank 1 by running the
same command again. Each rank saves what it saw to ``OUT/rank<r>.pt``; the checks run in the
test process: the layers were our SyncBatchNorm while training (and when the checkpoint was
written) and their own classes again after ``fit``; both ranks end with identical running
statistics, equal to one process's plain training on the whole batch; the checkpoint loads into
our layers and into torch.nn's.

Why ``strategy="ddp"`` from a script and not ``"ddp_spawn"`` inside pytest: ``ddp`` is what the
plugin is for and what Lightning recommends, and its launcher re-runs ``sys.argv``, which under
pytest would start a second pytest; ``ddp_spawn`` would have to pickle the module and the data
to children that re-import the test module. A script in a subprocess is also what lets the test
kill every rank (one process group) if a collective hangs, as ``tests/test_examples.py`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

STEPS = 3  # optimizer steps: one epoch of 3 global batches
GLOBAL_BATCH = 64  # 32 per rank
SAMPLES = STEPS * GLOBAL_BATCH
LR = 0.1
BN_PATHS = ("net.1", "net.5")  # BatchNorm2d, BatchNorm1d

# Measured on 2 busy cores: ~25 s (Lightning's import and gloo's rendezvous, twice); a cold
# Numba cache adds ~20 s. A hung collective would wait for gloo's 30-minute default.
TIMEOUT_S = 240
GRACE_S = 5
_LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "PL_GLOBAL_SEED",
    "PL_TRAINER_GPUS",
)


def make_net() -> nn.Sequential:
    """A tiny CNN with one BatchNorm2d and one BatchNorm1d, torch.nn layers, fixed init."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),  # 0
        nn.BatchNorm2d(3),  # 1
        nn.ReLU(),  # 2
        nn.Flatten(),  # 3
        nn.Linear(3 * 4 * 4, 6),  # 4
        nn.BatchNorm1d(6),  # 5
        nn.ReLU(),  # 6
        nn.Linear(6, 2),  # 7
    )


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 1, 6, 6, generator=g) * 2.0 + 0.5
    y = torch.randint(0, 2, (SAMPLES,), generator=g)
    return x, y


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def reference_state() -> dict[str, torch.Tensor]:
    """One process, our plain BatchNorm layers, the whole global batch at every step."""
    import batchnorm

    net = batchnorm.convert(make_net())
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    x, y = make_data()
    net.train()
    for step in range(STEPS):
        rows = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------------------------
# The training script (both ranks)
# --------------------------------------------------------------------------------------------


def _train(out: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import batchnorm
    from batchnorm.lightning import SyncBatchNormPlugin

    torch.set_num_threads(1)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = batchnorm.convert(make_net())
            self.types_in_training: set[tuple[str, str]] = set()
            self.types_at_save: set[tuple[str, str]] = set()

        def _types(self) -> set[tuple[str, str]]:
            named = dict(self.named_modules())
            return {(path, _type_name(named[path])) for path in BN_PATHS}

        def training_step(self, batch, batch_idx):
            self.types_in_training |= self._types()
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_save_checkpoint(self, checkpoint) -> None:
            self.types_at_save |= self._types()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self):
            # Each rank's half of every global batch, in order (Lightning's own
            # DistributedSampler, turned off below, always shuffles a training set).
            half = GLOBAL_BATCH // 2
            rows = [
                step * GLOBAL_BATCH + self.global_rank * half + i
                for step in range(STEPS)
                for i in range(half)
            ]
            x, y = make_data()
            return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=half)

    model = Tiny()
    types_before = model._types()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        sync_batchnorm=True,
        plugins=[SyncBatchNormPlugin()],
        use_distributed_sampler=False,
        max_steps=STEPS,
        default_root_dir=str(out),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model)
    torch.save(
        {
            "world_size": trainer.world_size,
            "types_before": sorted(types_before),
            "types_in_training": sorted(model.types_in_training),
            "types_at_save": sorted(model.types_at_save),
            "types_after": sorted(model._types()),
            "state": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
            "checkpoint": trainer.checkpoint_callback.best_model_path,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    _train(Path(sys.argv[1]))
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------

import pytest  # noqa: E402  (the training script above does not need pytest)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _run_script(*argv: str) -> subprocess.CompletedProcess:
    """Run a Python script (both ranks) in a new session; kill the session's group when done."""
    args = [sys.executable, *argv]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: killpg reaches the rank Lightning starts
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(
            f"{' '.join(args)}: expected to finish within {TIMEOUT_S} s; it was killed.\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr[-5000:]}"
        )
    finally:
        _kill_group(proc.pid, signal.SIGKILL)  # a rank that outlived rank 0, if any
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("lightning")
    done = _run_script(str(Path(__file__).resolve()), str(out))
    assert done.returncode == 0, f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-5000:]}"
    return {rank: torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.mark.distributed
@pytest.mark.slow
def test_plugin_puts_our_sync_batchnorm_in_for_training_and_reverts_it(run):
    ours = {"net.1": "batchnorm.modules.BatchNorm2d", "net.5": "batchnorm.modules.BatchNorm1d"}
    sync = "batchnorm.distributed.SyncBatchNorm"
    for rank in (0, 1):
        seen = run[rank]
        assert seen["world_size"] == 2
        assert dict(seen["types_before"]) == ours
        assert dict(seen["types_in_training"]) == dict.fromkeys(BN_PATHS, sync)
        assert dict(seen["types_at_save"]) == dict.fromkeys(BN_PATHS, sync)
        assert dict(seen["types_after"]) == ours


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_agree_and_match_one_process_on_the_whole_batch(run):
    first, second = run[0]["state"], run[1]["state"]
    assert first.keys() == second.keys()
    for key in first:  # parameters and running statistics, identical on both ranks
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
    reference = reference_state()
    assert reference.keys() == first.keys()
    for path in BN_PATHS:
        assert int(first[f"{path.removeprefix('net.')}.num_batches_tracked"]) == STEPS
    for key, want in reference.items():
        torch.testing.assert_close(first[key], want, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_reloads_into_our_layers_and_into_torch_nn(run):
    import batchnorm

    path = run[0]["checkpoint"]
    assert path and Path(path).is_file(), f"no checkpoint written: {path!r}"
    assert run[1]["checkpoint"] == path
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("net."): v for k, v in saved.items()}
    final = run[0]["state"]
    ours, plain = batchnorm.convert(make_net()), make_net()
    for net in (ours, plain):
        net.load_state_dict(weights)  # strict: same keys as our and torch.nn's BatchNorm
        for key, value in net.state_dict().items():
            torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=key)
        net.eval()
    assert type(ours[1]) is batchnorm.BatchNorm2d and type(plain[1]) is nn.BatchNorm2d
    x, _ = make_data()
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:32]), plain(x[:32]), rtol=1e-5, atol=1e-6)


def test_importing_batchnorm_does_not_import_lightning():
    code = "import sys, batchnorm; batchnorm.SyncBatchNorm; print('lightning' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_without_lightning_the_module_says_what_to_install():
    # A meta-path finder that hides lightning, in a fresh interpreter.
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lightning" or name.startswith("lightning."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
try:
    import batchnorm.lightning
except ModuleNotFoundError as err:
    print(err.name); print(err)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    name, message = done.stdout.strip().split("\n", 1)
    assert name == "lightning"
    assert 'pip install "batchnorm[lightning]"' in message


def test_plugin_is_accepted_with_sync_batchnorm_true():
    # Lightning refuses sync_batchnorm=True with a LayerSync that is not a TorchSyncBatchNorm.
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import LayerSync

    from batchnorm.lightning import SyncBatchNormPlugin

    plugin = SyncBatchNormPlugin()
    assert isinstance(plugin, LayerSync)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        sync_batchnorm=True,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    assert trainer._accelerator_connector._layer_sync is plugin


def test_apply_and_revert_convert_in_place_without_a_trainer():
    import batchnorm
    from batchnorm.lightning import SyncBatchNormPlugin

    net = make_net()
    net[5] = batchnorm.BatchNorm1d(6)  # one of ours, one of torch.nn's
    weight = net[1].weight
    plugin = SyncBatchNormPlugin()
    assert plugin.apply(net) is net
    assert type(net[1]) is batchnorm.SyncBatchNorm and type(net[5]) is batchnorm.SyncBatchNorm
    assert net[1].weight is weight
    assert plugin.revert(net) is net
    assert type(net[1]) is nn.BatchNorm2d and type(net[5]) is batchnorm.BatchNorm1d


@pytest.mark.distributed
@pytest.mark.slow
def test_example_runs_as_documented(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning_sync.py"
    done = _run_script(str(example), "--max-steps", "2", "--out", str(tmp_path))
    assert done.returncode == 0, f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr[-5000:]}"
    assert "BatchNorm classes during training: ['SyncBatchNorm']" in done.stdout
    assert "BatchNorm classes after fit: ['BatchNorm2d']" in done.stdout
    assert "loaded into torch.nn layers" in done.stdout
    assert list(tmp_path.glob("checkpoints/*.ckpt"))
