"""Supervised training of a timm model with dynamic data pruning, every hook of d3p's public API written out.

    python examples/train_classifier_explicit.py --prune_method d3p              (embedded digits, CPU)
    torchrun --nproc_per_node 8 examples/train_classifier_explicit.py --data_path /data/imagenet --model resnet50 \
        --input_size 224 --epochs 90 --prune_method infobatch                    (ImageFolder: train/ and val/)

Every d3p flag (--prune_method, --d3p_start, --prune_ratio, ...) is available; the run resumes from
OUTPUT_DIR/checkpoint.pth when it exists. One JSON line per epoch: the pruner's log plus top-1.
examples/train_classifier.py is the same run in the short form (pruner.epoch / pruner.loss).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # this repository's shim for CPU-only torch, before timm/torchvision; drop it in your project

import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import d3p  # noqa: E402
from examples.digits import digit_images, image_folders, timm_kwargs  # noqa: E402


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
    d3p.import_prune_plugins()  # --prune_plugin FILE_OR_MODULE: a method of your own, before the flags are built
    dynamic = d3p.method_names("dynamic")  # this loop has no embedding pass for the static selectors
    d3p.add_pruning_args(parser, methods=dynamic, loss_kind="classification")  # cross-entropy: D3P's rails on
    args = parser.parse_args()
    problems = d3p.validate_pruning_args(args, dynamic)
    if problems:
        parser.error("; ".join(problems))

    distributed = "RANK" in os.environ  # launched by torchrun
    device = torch.device("cpu")
    if torch.cuda.is_available():  # one GPU per process: the collectives of this rank then run on its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train_set, val_set, classes = digit_images(args.input_size, args.subset) if args.data_path is None \
        else image_folders(args.data_path, args.input_size)
    train_set = d3p.IndexedDataset(train_set)  # items (image, label, dataset index)

    model = timm.create_model(args.model, num_classes=classes, **timm_kwargs(args.model, args.input_size)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    # one per-sample loss for both passes: recorded training and forward-only losses then cannot differ
    pruner = d3p.DataPruner.from_args(args, len(train_set), min_kept=args.batch_size * world,
                                      loss_fn=nn.CrossEntropyLoss(label_smoothing=args.smoothing, reduction="none"))
    ckpt_path, start = os.path.join(args.output_dir, "checkpoint.pth"), 0
    if os.path.isfile(ckpt_path):  # resume: model, optimizer and the pruning state (plain data)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        pruner.load_state_dict(ckpt["pruning"])
        start = ckpt["epoch"] + 1
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    # balanced batches (sizes differ by at most one, no runt), as pruner.epoch builds them
    loader = DataLoader(train_set, batch_sampler=d3p.BalancedBatchSampler(pruner.sampler, args.batch_size))
    forward_loader = DataLoader(train_set, batch_sampler=d3p.BalancedBatchSampler(pruner.forward_sampler,
                                                                                  args.batch_size))

    for epoch in range(start, args.epochs):
        pruner.begin_epoch(epoch)  # the method's plan: the sampler now yields this epoch's kept samples
        net.train()
        for x, y, index in loader:
            per_sample = pruner.per_sample_loss(net(x.to(device)), y.to(device))  # float [B]
            loss = pruner.batch_loss(per_sample, index)  # the method's weights; records the losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if pruner.forward_only_indices.size:  # D3P's recording epochs: losses of the pruned samples too
            with torch.no_grad():  # the same mode (train) and the same loss as the training pass
                for x, y, index in forward_loader:
                    pruner.record(index, pruner.per_sample_loss(net(x.to(device)), y.to(device)))
        log = pruner.end_epoch(epoch)  # losses reduced across ranks once, the decision, the cost ledger
        log.update(epoch=epoch, top1=evaluate(model, val_set, device))
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "pruning": pruner.state_dict()}, ckpt_path)
            print(json.dumps(log), flush=True)
    if rank == 0:
        summary = pruner.summary()
        print(json.dumps({"summary": summary}), flush=True)
        print(f"prune ratio {summary['prune_ratio']:.3f}, compute saved {summary['compute_saved']:.3f}", flush=True)
    if distributed:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, val_set, device) -> float:
    model.eval()
    correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in DataLoader(val_set, 256))
    return 100.0 * correct / len(val_set)


if __name__ == "__main__":
    main()
