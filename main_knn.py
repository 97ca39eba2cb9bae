"""Weighted k-NN evaluation of an MAE pre-training checkpoint (DINO's protocol; no training, deterministic).

    python main_knn.py --checkpoint OUT/pretrain/checkpoint-29.pth --output_dir OUT/knn      (embedded digits)
    torchrun --nproc_per_node 8 main_knn.py --checkpoint ... --data_path /data/imagenet --output_dir ...

Features: the MAE encoder's `embed()`: every patch visible (no masking), the encoder's final LayerNorm, the patch
tokens mean-pooled (the cls token is left out: MAE's loss never reads it, and mean pooling is what MAE's own
fine-tuning recipe and D2 Pruning's embeddings use), then L2-normalised. Bank = the training split through the
evaluation transform (resize, centre crop: no randomness); queries = the validation split.
Classifier (Wu et al. 2018, as in DINO's eval_knn.py): cosine similarity, the k nearest bank samples (k = 20),
each voting for its class with weight exp(similarity / T) (T = 0.07); classes ranked by their summed votes.
Ties are broken by index: among equal similarities the lower bank index is the nearer neighbour, among equal
votes the lower class index ranks first, so predictions are a pure function of the features.
Under torchrun each rank embeds its share of both splits and the rows are gathered on every rank (see
engine_pretrain.compute_embeddings); every rank then classifies all queries, rank 0 writes the outputs.

Writes OUTPUT_DIR/summary.json (mode 'knn', top1, top5, k, temperature, ...) and OUTPUT_DIR/predictions.npy
(int64 [M, min(5, C)]: the ranked classes of each validation sample, in dataset order).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import models_mae
from d3p.collectives import get_rank, get_world_size
from d3p.sampler import PrunedDistributedSampler
from engine_pretrain import compute_embeddings
from util import checkpoint as ckpt_util
from util import flags, run, run_folder
from util.amp import autocast_dtype
from util.data_errors import DatasetError
from util.datasets import IndexedDataset, build_dataset, dataset_stats, num_classes_of, resolve_data_set
from util.image_transforms import eval_transform
from util.loader import collate_indexed, default_num_workers, make_eval_loader
from util.dist import barrier, init_distributed_mode, is_main_process


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Weighted k-NN evaluation of an MAE pre-training checkpoint", add_help=True)

    g = parser.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="pre-training checkpoint (main_pretrain_d3p.py's checkpoint-E.pth)")
    g.add_argument("--model", default=None, choices=sorted(models_mae.MODELS),
                   help="default: the checkpoint's own --model")
    g.add_argument("--input_size", default=None, type=int, help="default: the checkpoint's own --input_size")

    g = parser.add_argument_group("k-NN")
    g.add_argument("--k", default=20, type=int, help="neighbours that vote (DINO: 20)")
    g.add_argument("--temperature", default=0.07, type=float, help="vote weight exp(similarity / T) (DINO: 0.07)")
    g.add_argument("--query_chunk", default=256, type=int, help="validation samples classified at once (memory)")

    g = parser.add_argument_group("data")
    flags.add_data_source_args(g)
    flags.add_batch_size_arg(g, default=128, help="images per forward pass per process")
    flags.add_loader_args(g, mae_pin_mem_alias=False)

    g = parser.add_argument_group("run")
    flags.add_output_dir_arg(g, default="./output_knn", help="summary.json and predictions.npy")
    flags.add_precision_arg(g, help="autocast dtype of the feature pass: auto = bf16 on CUDA when supported, fp32 on CPU")
    flags.add_device_args(g)
    return parser


# ------------------------------------------------------------------------------------------------ classifier
def knn_rank_classes(similarity: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
                     temperature: float) -> torch.Tensor:
    """Classes ranked by weighted k-NN votes.

    similarity [M, N] (query x bank), bank_labels int64 [N] in [0, C) -> int64 [M, C], best class first.
    The k neighbours are the k largest similarities, equal values ordered by bank index (stable sort);
    neighbour j adds exp(similarity / T) to its class, summed in float64 in neighbour order; classes with
    equal votes are ordered by class index (stable sort).
    """
    k = min(k, similarity.shape[1])
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]  # [M, k]
    weights = torch.exp(torch.gather(similarity, 1, order).double() / temperature)  # [M, k]
    labels = bank_labels[order]  # [M, k]
    votes = torch.zeros(similarity.shape[0], num_classes, dtype=torch.float64, device=similarity.device)
    for j in range(k):  # one neighbour rank at a time: a fixed summation order
        votes.scatter_add_(1, labels[:, j : j + 1], weights[:, j : j + 1])
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Weighted k-NN: bank [N, D], bank_labels int64 [N], queries [M, D] (any scale: both are L2-normalised
    here, so similarity = cosine) -> int64 [M, min(5, C)], each row the query's classes ranked best first.

    Computed in the features' dtype on their device, `chunk` queries at a time ([chunk, N] similarities).
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} rows but {bank_labels.shape[0]} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    bank_labels = bank_labels.to(bank.device)
    top = min(5, num_classes)
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.T
        out.append(knn_rank_classes(sim, bank_labels, num_classes, k, temperature)[:, :top].cpu())
    return torch.cat(out) if out else torch.zeros(0, top, dtype=torch.long)


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """ranked int64 [M, >=1] (best first), labels int64 [M] -> (top-1 %, top-5 %)."""
    hit = ranked == labels[:, None]
    return 100.0 * hit[:, :1].any(1).double().mean().item(), 100.0 * hit[:, :5].any(1).double().mean().item()


# ------------------------------------------------------------------------------------------------- features
def load_encoder(args) -> torch.nn.Module:
    """The MAE model of --checkpoint (model name and input size from its saved args unless given)."""
    try:
        ckpt = ckpt_util.load_checkpoint(args.checkpoint)
    except FileNotFoundError as exc:
        raise DatasetError(f"--checkpoint {args.checkpoint} does not exist. Fix: pass OUTPUT_DIR/checkpoint-E.pth "
                           "of a pre-training run") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DatasetError(f"--checkpoint {args.checkpoint} has no 'model' state_dict. Fix: pass a checkpoint "
                           "written by main_pretrain_d3p.py")
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    args.model = args.model or saved.get("model") or "mae_vit_tiny_patch4"
    args.input_size = args.input_size or saved.get("input_size") or 32
    model = models_mae.MODELS[args.model](img_size=args.input_size)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise DatasetError(f"--checkpoint {args.checkpoint} does not fit --model {args.model} at --input_size "
                           f"{args.input_size}: {str(exc)[:300]}. Fix: leave --model/--input_size out (the "
                           "checkpoint's own are used) or pass the pre-training ones") from exc
    args.checkpoint_epoch = ckpt.get("epoch")
    return model


def split_features(model, split: str, args, device, amp_dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features float32 [n, D] on every rank, labels int64 [n], classes) of the eval-transformed split."""
    base = build_dataset(split, args.data_set, args.data_path, eval_transform(args.data_set, args.input_size))
    n = len(base)
    if n == 0:
        raise DatasetError(f"the {split} split under {args.data_path} is empty. Fix: check --data_path")
    labels = getattr(base, "targets", None)
    if labels is None:
        raise DatasetError(f"the {split} split has no 'targets' (labels). Fix: use a labelled dataset")
    sampler = PrunedDistributedSampler(n, get_world_size(), get_rank(), shuffle=False)
    loader = make_eval_loader(IndexedDataset(base), sampler, args, args.batch_size, collate_fn=collate_indexed)
    feats, _ = compute_embeddings(model, loader, device, n, amp_dtype, input_stats=dataset_stats(args.data_set))
    return torch.from_numpy(feats), torch.as_tensor(np.asarray(labels), dtype=torch.long), num_classes_of(base)


def main(args: argparse.Namespace) -> dict:
    t0 = time.time()
    init_distributed_mode(args)
    args.data_set = resolve_data_set(args.data_set, args.data_path)
    device = torch.device(args.device)
    amp_dtype = autocast_dtype(args.precision, args.device)
    model = load_encoder(args).to(device)
    print(f"k-NN: {args.model} at {args.input_size} px from {args.checkpoint}; {args.data_set}, k={args.k}, "
          f"T={args.temperature}, {get_world_size()} process(es)")
    bank, bank_labels, num_classes = split_features(model, "train", args, device, amp_dtype)
    queries, query_labels, _ = split_features(model, "val", args, device, amp_dtype)
    t_feat = time.time() - t0
    ranked = knn_classify(bank.to(device), bank_labels, queries.to(device), num_classes, args.k, args.temperature,
                          args.query_chunk)
    top1, top5 = topk_accuracy(ranked, query_labels)
    summary = {
        "mode": "knn", "top1": top1, "top5": top5, "k": args.k, "temperature": args.temperature,
        "checkpoint": os.path.abspath(args.checkpoint), "checkpoint_epoch": args.checkpoint_epoch,
        "model": args.model, "input_size": args.input_size, "data_set": args.data_set,
        "features": "encoder embed(): unmasked, final LayerNorm, mean over patch tokens, L2-normalised",
        "num_train": int(bank.shape[0]), "num_val": int(queries.shape[0]), "num_classes": num_classes,
        "world_size": get_world_size(), "feature_seconds": t_feat, "wall_seconds": time.time() - t0,
    }
    print(f"k-NN top-1 {top1:.2f}%, top-5 {top5:.2f}% ({summary['num_val']} images, bank {summary['num_train']})")
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        np.save(os.path.join(args.output_dir, run_folder.PREDICTIONS_FILE), ranked.numpy())
        with open(os.path.join(args.output_dir, run_folder.SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    barrier()
    return summary


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad flags: a ConfigError naming each flag (exit code 2 through run.run_main, as every entry script)."""
    problems = [f"--{name} must be >= 1, got {getattr(args, name)}"
                for name in ("k", "batch_size", "query_chunk") if getattr(args, name) < 1]
    if args.temperature <= 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if args.num_workers is not None and args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {args.num_workers}")
    flags.raise_problems(problems)


def configure_and_run(args: argparse.Namespace) -> dict:
    validate_args(args)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    return main(args)


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run.run_main(configure_and_run, args)  # bad flags or input: the message and exit code 2


if __name__ == "__main__":
    sys.exit(cli())
