"""A Lightning 2.x classifier with dynamic data pruning: d3p.PruningCallback, two lines of training_step.

    python examples/lightning_classifier.py --prune_method d3p                     (embedded digits, CPU)
    torchrun --nproc_per_node 2 examples/lightning_classifier.py --devices 2     (DDP, gloo on CPU)

The lines marked `# d3p` are what pruning changes in an ordinary LightningModule run. The callback runs the
epochs' plans, the forward-only pass and the decisions, and keeps the pruning state in Lightning's checkpoint:
rerun with --resume to continue from OUTPUT_DIR/last.ckpt (exact). Prints the ledger's prune ratio and compute
saved, and writes OUTPUT_DIR/pruning-rank{R}.pt (the pruning state) and OUTPUT_DIR/weights.pt.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # this repository's shim for CPU-only torch, before timm/torchvision; drop it in your project

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import d3p  # noqa: E402
from examples.digits import digit_images  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, pruner: d3p.DataPruner, train_set, input_size: int, batch_size: int, lr: float):
        super().__init__()
        self.pruner, self.train_set, self.batch_size, self.lr = pruner, train_set, batch_size, lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * input_size * input_size, 128), nn.ReLU(),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch  # d3p: items carry their dataset index
        return self.pruner.loss(self(x), y, index)  # d3p: the loss per sample, weighted and recorded

    def train_dataloader(self):  # d3p: indexed items, the pruner's sampler
        return DataLoader(d3p.IndexedDataset(self.train_set), batch_size=self.batch_size, sampler=self.pruner.sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> d3p.DataPruner:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", default=8, type=int)
    parser.add_argument("--stop_after", default=0, type=int, help="end fit after this many epochs (resume tests)")
    parser.add_argument("--batch_size", default=32, type=int, help="per process")
    parser.add_argument("--lr", default=0.05, type=float)
    parser.add_argument("--input_size", default=8, type=int)
    parser.add_argument("--subset", default=0, type=int, help="train on the first N digits only")
    parser.add_argument("--devices", default=1, type=int, help="processes (under torchrun: --nproc_per_node)")
    parser.add_argument("--use_distributed_sampler", action="store_true", help="Lightning's default (refused)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.ckpt")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--output_dir", default="./output_lightning")
    d3p.add_pruning_args(parser, methods=d3p.method_names("dynamic"), loss_kind="classification")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train_set, val_set, _ = digit_images(args.input_size, args.subset)
    pruner = d3p.DataPruner.from_args(args, len(train_set), min_kept=args.batch_size * args.devices,  # d3p
                                      loss_fn=nn.CrossEntropyLoss(reduction="none"))
    model = Classifier(pruner, train_set, args.input_size, args.batch_size, args.lr)
    last = L.callbacks.ModelCheckpoint(args.output_dir, save_last=True, save_top_k=0)  # OUTPUT_DIR/last.ckpt
    trainer = L.Trainer(
        max_epochs=args.stop_after or args.epochs, accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[d3p.PruningCallback(pruner), last],  # d3p: the callback
        use_distributed_sampler=args.use_distributed_sampler,  # d3p: keep the pruner's sampler under DDP
    )
    trainer.fit(model, ckpt_path=os.path.join(args.output_dir, "last.ckpt") if args.resume else None)

    rank = trainer.global_rank
    torch.save(pruner.state_dict(), os.path.join(args.output_dir, f"pruning-rank{rank}.pt"))
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(args.output_dir, "weights.pt"))
        with torch.no_grad():
            x, y = val_set.tensors
            top1 = 100.0 * float((model(x).argmax(1) == y).float().mean())
        summary = pruner.summary()
        print(json.dumps({"summary": summary, "top1": top1}), flush=True)
        print(f"prune ratio {summary['prune_ratio']:.3f}, compute saved {summary['compute_saved']:.3f}", flush=True)
    return pruner


if __name__ == "__main__":
    main()
