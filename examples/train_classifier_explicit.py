"""Supervised training of a timm model with dynamic data pruning, using only d3p's public API.

    python examples/train_classifier.py --prune_method d3p                       (embedded digits, CPU)
    torchrun --nproc_per_node 8 examples/train_classifier.py --data_path /data/imagenet --model resnet50 \
        --input_size 224 --epochs 90 --prune_method infobatch                    (ImageFolder: train/ and val/)

Every d3p flag (--prune_method, --d3p_start, --prune_ratio, ...) is available; the run resumes from
OUTPUT_DIR/checkpoint.pth when it exists. One JSON line per epoch: the pruner's log plus top-1.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: F401,E402  (this repository's torchvision shim for CPU-only torch; drop it in your project)

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

import d3p  # noqa: E402


class WithIndex(Dataset):
    """Items (image, label, dataset index): the pruner needs each sample's index."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, i


def datasets(args):
    if args.data_path is None:  # scikit-learn's 8x8 digit scans, resized, fixed split
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None].div(8).sub(1).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=args.input_size, mode="bilinear", align_corners=False)
        y = torch.tensor(digits.target)
        order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
        train, val = order[297:], order[:297]
        if args.subset:
            train = train[: args.subset]
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10
    from torchvision import datasets as tvd, transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = tvd.ImageFolder(os.path.join(args.data_path, "train"), T.Compose(
        [T.RandomResizedCrop(args.input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    val = tvd.ImageFolder(os.path.join(args.data_path, "val"), T.Compose(
        [T.Resize(int(args.input_size * 8 / 7)), T.CenterCrop(args.input_size), T.ToTensor(), norm]))
    return train, val, len(train.classes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default=None, help="ImageFolder root with train/ and val/ (default: digits)")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="any timm model name")
    parser.add_argument("--input_size", default=16, type=int)
    parser.add_argument("--epochs", default=10, type=int)
    parser.add_argument("--batch_size", default=64, type=int, help="per process")
    parser.add_argument("--lr", default=1e-3, type=float)
    parser.add_argument("--smoothing", default=0.1, type=float)
    parser.add_argument("--subset", default=0, type=int, help="digits: train on the first N samples only")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--output_dir", default="./output_classifier")
    d3p.add_pruning_args(parser, methods=("none", "d3p", "infobatch", "seta", "random"))
    args = parser.parse_args()
    problems = d3p.validate_pruning_args(args, ("none", "d3p", "infobatch", "seta", "random"))
    if problems:
        parser.error("; ".join(problems))

    distributed = "RANK" in os.environ  # launched by torchrun
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train_set, val_set, classes = datasets(args)
    train_set = WithIndex(train_set)

    extra = dict(img_size=args.input_size, patch_size=4, depth=4) if args.model.startswith("vit_tiny") else {}
    model = timm.create_model(args.model, num_classes=classes, **extra).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    pruner = d3p.DataPruner.from_args(args, len(train_set), min_kept=args.batch_size * world)
    ckpt_path, start = os.path.join(args.output_dir, "checkpoint.pth"), 0
    if os.path.isfile(ckpt_path):  # resume: model, optimizer and the pruning state (plain data)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        pruner.load_state_dict(ckpt["pruning"])
        start = ckpt["epoch"] + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    loader = DataLoader(train_set, args.batch_size, sampler=pruner.sampler)
    forward_loader = DataLoader(train_set, args.batch_size, sampler=pruner.forward_sampler)

    for epoch in range(start, args.epochs):
        pruner.begin_epoch(epoch)  # the method's plan: the sampler now yields this epoch's kept samples
        net.train()
        for x, y, index in loader:
            per_sample = d3p.per_sample_cross_entropy(net(x.to(device)), y.to(device), args.smoothing)
            loss = pruner.batch_loss(per_sample, index)  # the method's weights; records the losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if pruner.forward_only_indices.size:  # D3P's recording epochs: losses of the pruned samples too
            model.eval()
            with torch.no_grad():
                for x, y, index in forward_loader:
                    pruner.record(index, d3p.per_sample_cross_entropy(model(x.to(device)), y.to(device)))
        log = pruner.end_epoch(epoch)  # losses reduced across ranks once, the decision, the cost ledger
        log.update(epoch=epoch, top1=evaluate(model, val_set, device))
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "pruning": pruner.state_dict()}, ckpt_path)
            print(json.dumps(log), flush=True)
    if rank == 0:
        print(json.dumps({"summary": pruner.summary()}), flush=True)
    if distributed:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, val_set, device) -> float:
    model.eval()
    correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in DataLoader(val_set, 256))
    return 100.0 * correct / len(val_set)


if __name__ == "__main__":
    main()
