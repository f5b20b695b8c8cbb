"""Synchronized BatchNorm on CPU under PyTorch Lightning: ``SyncBatchNormPlugin``.

Run it as a plain script (Lightning's ``ddp`` launcher starts the second process itself)::

    python examples/lightning_sync.py            # 2 processes on CPU, gloo
    python examples/lightning_sync.py --devices 1

Needs the ``lightning`` extra: ``pip install "batchnorm[lightning]"``. Options: ``--devices``
(2), ``--max-steps`` (30), ``--batch-size`` per process (32), ``--out`` (where Lightning writes
its checkpoint; default ``lightning_sync_run``).

What it does: a small CNN of conv-BN-ReLU blocks, built from torch.nn layers and switched to
this package's by ``batchnorm.convert``, learns a synthetic two-class image task. The Trainer
line is the whole recipe::

    Trainer(accelerator="cpu", devices=2, strategy="ddp",
            sync_batchnorm=True, plugins=[SyncBatchNormPlugin()])

``sync_batchnorm=True`` alone would put in ``torch.nn.SyncBatchNorm``, which refuses CPU
modules; with the plugin, every BatchNorm layer becomes ``batchnorm.SyncBatchNorm`` for the
fit (each process normalises with the statistics of the global batch) and gets its own class
back afterwards. Rank 0 prints the layer classes seen during training and after, then loads the
checkpoint Lightning wrote into the same network built from plain torch.nn layers, to show that
it needs nothing from this package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import batchnorm
from batchnorm.lightning import SyncBatchNormPlugin


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip


def make_data(n: int = 2048) -> TensorDataset:
    """Noise images; class 1 has a brighter centre."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[:, :, 2:6, 2:6] += y.view(-1, 1, 1, 1) * 1.5
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.net = batchnorm.convert(make_net())  # torch.nn BatchNorm -> batchnorm's
        self.batch_size = batch_size
        self.classes_in_training: set[str] = set()

    def bn_classes(self) -> set[str]:
        return {type(m).__qualname__ for m in self.net if "BatchNorm" in type(m).__name__}

    def training_step(self, batch, batch_idx):
        self.classes_in_training |= self.bn_classes()
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # Under DDP, Lightning adds a DistributedSampler: each process reads its own shard.
        return DataLoader(make_data(), batch_size=self.batch_size, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("lightning_sync_run"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the processes share the machine's cores
    pl.seed_everything(0, verbose=False)

    model = Classifier(args.batch_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        sync_batchnorm=True,
        plugins=[SyncBatchNormPlugin()],
        max_steps=args.max_steps,
        default_root_dir=str(args.out),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)

    if trainer.global_rank == 0:
        print(f"loss at step {trainer.global_step}: {float(trainer.callback_metrics['loss']):.4f}")
        print(f"BatchNorm classes during training: {sorted(model.classes_in_training)}")
        print(f"BatchNorm classes after fit: {sorted(model.bn_classes())}")
        checkpoint = trainer.checkpoint_callback.best_model_path
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        plain = make_net()  # torch.nn layers only
        plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
        print(f"checkpoint {checkpoint} loaded into torch.nn layers")
        print(f"running_mean of the first BatchNorm: {plain[1].running_mean.tolist()}")


if __name__ == "__main__":
    main()
