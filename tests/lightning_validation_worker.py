"""A Lightning run with D3P, a validation loader, ModelCheckpoint(monitor="val_loss") and EarlyStopping, on 1 rank
(in process) or 2 DDP ranks (`torchrun ... tests/lightning_validation_worker.py OUT_DIR`); writes, per rank,
what Lightning did each epoch (tests/library/test_lightning.py)."""
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before lightning/transformers

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import d3p  # noqa: E402
import d3p.lightning  # noqa: E402

N, BATCH, EPOCHS = 160, 16, 5


class Classifier(L.LightningModule):
    def __init__(self, pruner, train_set, val_set):
        super().__init__()
        self.pruner, self.train_set, self.val_set = pruner, train_set, val_set
        self.net = nn.Linear(8, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        return self.pruner.loss(self(x), y, index)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def train_dataloader(self):
        return DataLoader(d3p.IndexedDataset(self.train_set), batch_size=BATCH, sampler=self.pruner.sampler)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=BATCH)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Notes(L.Callback):
    """What Lightning did: validations and the batch counts the fit loop (and so the progress bar) used."""

    def __init__(self):
        self.validated, self.batches, self.last_batch_idx = [], [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated.append(trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module):
        self.batches.append(trainer.num_training_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:
            self.last_batch_idx.append(batch_idx)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 48, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])


def run(out_dir: str, devices: int) -> dict:
    torch.manual_seed(0)
    train_set, val_set = data()
    pruner = d3p.DataPruner(N, "d3p", epochs=EPOCHS, seed=1, min_kept=BATCH * devices,
                            loss_fn=nn.CrossEntropyLoss(reduction="none"), d3p_start=1, d3p_period=1, d3p_window=1,
                            d3p_bins=16, d3p_max_weight=0.0, d3p_min_kept=0.0)
    notes = Notes()
    checkpoints = L.callbacks.ModelCheckpoint(out_dir, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    stop = L.callbacks.EarlyStopping(monitor="val_loss", patience=100)
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        callbacks=[d3p.PruningCallback(pruner), notes, checkpoints, stop])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(pruner, train_set, val_set))
    return {
        "validated": notes.validated, "batches": notes.batches, "last_batch_idx": notes.last_batch_idx,
        "kept": [e["kept"] for e in pruner.ledger.epochs],
        "local_kept": [-(-k // devices) for k in (e["kept"] for e in pruner.ledger.epochs)],
        "checkpoints": sorted(f for f in os.listdir(out_dir) if f.endswith(".ckpt")),
        "scores": [float(v) for _, v in sorted(checkpoints.best_k_models.items())],  # val_loss of each checkpoint
        "early_stopping_wait": int(stop.wait_count), "early_stopping_best": float(stop.best_score),
        "sync_dist_warnings": [str(w.message) for w in caught if "sync_dist" in str(w.message)],
        "metrics": sorted(k for k in trainer.callback_metrics if k.startswith("d3p/")),
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("d3p/")},
        "last_log": {k: float(pruner.last_log[k]) for k in d3p.lightning.METRICS},
    }


if __name__ == "__main__":
    out = sys.argv[1]
    result = run(out, 2)
    rank = torch.distributed.get_rank()
    with open(os.path.join(out, f"validation-rank{rank}.json"), "w") as f:
        json.dump(result, f)
