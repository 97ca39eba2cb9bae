"""Fine-tune (or, with --linprobe, linearly probe) a ViT from an MAE pre-training checkpoint.

MAE's main_finetune.py and main_linprobe.py in one script (facebookresearch/mae recipes and flag names):

  fine-tune   python main_finetune.py --finetune OUT/checkpoint-799.pth --model vit_base_patch16 \
                  --data_path /imagenet --batch_size 32 --accum_iter 4 --epochs 100 --blr 5e-4 \
                  --layer_decay 0.65 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval
  linprobe    python main_finetune.py --linprobe --finetune OUT/checkpoint-799.pth ...   (or main_linprobe.py)
  CPU demo    python main_finetune.py --finetune OUT/checkpoint-N.pth --model vit_tiny_patch4   (embedded digits)
  pruning     python main_finetune.py --prune_method d3p ...   (the dynamic methods: d3p, none, infobatch, seta, random, and those of a --prune_plugin; without
              --finetune this is supervised training from scratch with pruning)

Epochs count from 0 (as in MAE); checkpoint-E.pth holds epoch E. Per-epoch JSON lines go to OUTPUT_DIR/log.txt
and OUTPUT_DIR/summary.json is written at the end; both carry the pruning fields and cost ledger of pre-training
(d3p.DataPruner: the same code), and the checkpoint its state (exact resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import random
import sys
import time

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from torch.utils.data import Sampler

import d3p
import models_vit
from d3p.checkpoints import CheckpointFormatError, load_plain
from d3p.collectives import get_rank, get_world_size
from engine_finetune import SupervisedLoss, evaluate
from util import checkpoint as ckpt_util
from util import flags, lifecycle, run_log
from util import resume as resume_util
from util import datasets as data_util
from util import image_transforms
from util.item_seeding import STREAM_FORWARD_ONLY, STREAM_TRAIN
from util.label_noise import apply_label_noise
from util.loader import default_num_workers
from util import lr_decay
from util.accel import adamw_kwargs, configure_cuda_math, ddp_kwargs, maybe_compile
from util.amp import ScaledOptimizerStep, autocast_dtype
from util.augment import SeededMixup
from util import run
from util.dist import init_distributed_mode
from util.lars import LARS
from util.pos_embed import interpolate_pos_embed
from util import run_folder
from util.run_folder import pruning_inputs
from util.loader import make_eval_loader, make_loader
from util.stop import StopSignals


ConfigError = run.ConfigError  # bad flags or inputs (exit code 2); the message names it and the fix


# Flags whose default depends on the recipe: None in the parser, filled in by resolve_defaults().
FINETUNE_DEFAULTS = dict(
    epochs=50, blr=1e-3, weight_decay=0.05, layer_decay=0.75, min_lr=1e-6, warmup_epochs=5,
    drop_path=0.1, smoothing=0.1, reprob=0.25, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1",
    global_pool=True,
)
LINPROBE_DEFAULTS = dict(
    epochs=90, blr=0.1, weight_decay=0.0, layer_decay=None, min_lr=0.0, warmup_epochs=10,
    drop_path=0.0, smoothing=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, aa=None,
    global_pool=False,  # MAE's linear probe reads the cls token
)
# Flags that are part of the fine-tuning recipe only; --linprobe refuses them when set to an active value.
_FT_ONLY = ("layer_decay", "drop_path", "smoothing", "reprob", "mixup", "cutmix", "aa", "cutmix_minmax", "color_jitter")
# Native input size of each model (img_size its constructor defaults to); others use 224.
NATIVE_INPUT_SIZE = {"vit_tiny_patch4": 32}
# dynamic methods only (the registry's kind "dynamic"): the static selectors pick a coreset during pre-training


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MAE fine-tuning / linear probing (defaults: MAE's recipes)")
    FT_LP = " (default: {} fine-tune, {} --linprobe)"

    g = p.add_argument_group("recipe")
    g.add_argument("--linprobe", action="store_true",
                   help="MAE's linear probing: frozen encoder, BatchNorm(affine=False)+linear head, LARS, "
                        "RandomResizedCrop+flip only")

    flags.add_training_args(p, epochs=None, epochs_help="training epochs" + FT_LP.format(50, 90))

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16", choices=sorted(models_vit.MODELS), metavar="MODEL",
                   help=f"model to train, one of {', '.join(sorted(models_vit.MODELS))}")
    g.add_argument("--input_size", default=None, type=int,
                   help="image size (default: the model's native size: 224, 32 for vit_tiny_patch4)")
    g.add_argument("--drop_path", type=float, default=None, metavar="PCT",
                   help="drop path (stochastic depth) rate" + FT_LP.format(0.1, 0))
    g.add_argument("--global_pool", action="store_true", default=None,
                   help="average-pool the patch tokens then fc_norm (default for fine-tuning)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="use the class token instead of global pooling (default for --linprobe)")

    g = flags.add_optimizer_args(
        p, "optimizer (AdamW + layer decay; LARS for --linprobe)", weight_decay=None, blr=None, min_lr=None,
        warmup_epochs=None, warmup_type=float,
        default_notes=dict(weight_decay=FT_LP.format(0.05, 0), blr=FT_LP.format(1e-3, 0.1),
                           min_lr=FT_LP.format(1e-6, 0), warmup_epochs=FT_LP.format(5, 10)))
    g.add_argument("--layer_decay", type=float, default=None, help="layer-wise lr decay (ELECTRA/BEiT), fine-tune "
                   "only (default: 0.75)")

    g = p.add_argument_group("augmentation (fine-tune only)")
    g.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                   help="color jitter factor (enabled only when not using Auto/RandAug)")
    g.add_argument("--aa", type=str, default=None, metavar="NAME",
                   help='AutoAugment policy, "none" to disable (default: rand-m9-mstd0.5-inc1)')
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing (default: 0.1)")
    g.add_argument("--reprob", type=float, default=None, metavar="PCT", help="random erase prob (default: 0.25)")
    g.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    g.add_argument("--recount", type=int, default=1, help="random erase count")
    g.add_argument("--resplit", action="store_true", default=False,
                   help="do not random erase the first (clean) augmentation split (accepted for MAE compatibility; "
                        "no effect without augmentation splits)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha, mixup enabled if > 0 (default: 0.8)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha, cutmix enabled if > 0 (default: 1.0)")
    g.add_argument("--cutmix_minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    g.add_argument("--mixup_prob", type=float, default=1.0,
                   help="probability of performing mixup or cutmix when either/both is enabled")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5,
                   help="probability of switching to cutmix when both mixup and cutmix enabled")
    g.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                   help="how to apply mixup/cutmix params: per batch, pair, or elem")

    g = p.add_argument_group("initialisation")
    g.add_argument("--finetune", default=None, metavar="PATH",
                   help="pre-training checkpoint (a dict with 'model', MAE's format) to initialise the encoder from")

    g = flags.add_data_args(p, "dataset", jpeg_help=" (the linear probe's training crops; fine-tuning's RandAugment "
                                                 "and evaluation always decode with PIL's default)")
    g.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: from the dataset)")
    g.add_argument("--label_noise", default=0.0, type=float, metavar="RATE",
                   help="replace this share of the training labels by another class, seeded by --seed "
                        "(util/label_noise.py; docs/supervised.md); the test labels stay clean")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--dist_eval", action="store_true", default=False,
                   help="shard evaluation across ranks (exact: counts are summed, no sample is duplicated)")
    g.add_argument("--dist_on_itp", action="store_true", help=argparse.SUPPRESS)
    # output, checkpoints (MAE's --save_ckpt_freq is an alias of --save_every), resume, loader, devices
    flags.add_run_args(p, save_every=1, keep_last=1)

    # classification defaults: D3P's safety rails on (docs/supervised.md)
    d3p.add_pruning_args(p, methods=d3p.method_names("dynamic"), default="none", loss_kind="classification")
    return p


# --------------------------------------------------------------------------------------------- flags
def resolve_defaults(args) -> None:
    """Fill the recipe-dependent defaults, and refuse fine-tune-only flags under --linprobe."""
    if args.linprobe:
        active = []
        for name in _FT_ONLY:
            v = getattr(args, name)
            if v is None or (name in ("drop_path", "smoothing", "reprob", "mixup", "cutmix") and v == 0):
                continue
            if name == "aa" and str(v).lower() in ("none", ""):
                continue
            active.append(f"--{name} {v}")
        if active:
            raise ConfigError(
                f"{', '.join(active)} belong to the fine-tuning recipe; MAE's linear probe uses none of them "
                "(RandomResizedCrop + flip, no mixup/cutmix/RandAugment/erasing, no label smoothing, no drop path, "
                "no layer decay). Fix: drop these flags, or drop --linprobe"
            )
    defaults = LINPROBE_DEFAULTS if args.linprobe else FINETUNE_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.aa is not None and str(args.aa).lower() in ("none", ""):
        args.aa = None
    args.data_set = data_util.resolve_data_set(args.data_set, args.data_path)
    if args.input_size is None:
        args.input_size = NATIVE_INPUT_SIZE.get(args.model, 224)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    if args.log_dir is None:
        args.log_dir = args.output_dir


def validate_args(args) -> None:
    """Bad flags -> ConfigError naming the flag and the fix (before any data or model is built)."""
    checks = [
        (args.input_size >= 1, f"--input_size {args.input_size} must be positive"),
        (args.layer_decay is None or 0 < args.layer_decay <= 1, f"--layer_decay {args.layer_decay} must be in (0, 1]"),
        (0 <= args.drop_path < 1, f"--drop_path {args.drop_path} must be in [0, 1)"),
        (0 <= args.smoothing < 1, f"--smoothing {args.smoothing} must be in [0, 1)"),
        (0 <= args.reprob <= 1, f"--reprob {args.reprob} must be in [0, 1]"),
        (args.mixup >= 0 and args.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
        (0 <= args.mixup_prob <= 1 and 0 <= args.mixup_switch_prob <= 1,
         "--mixup_prob and --mixup_switch_prob must be in [0, 1]"),
        (args.nb_classes is None or args.nb_classes >= 1, f"--nb_classes {args.nb_classes} must be >= 1"),
        (0 <= args.label_noise < 1, f"--label_noise {args.label_noise} must lie in [0, 1)"),
    ]
    problems = flags.shared_arg_problems(args) + [message for ok, message in checks if not ok]
    problems += d3p.validate_pruning_args(args, d3p.method_names("dynamic"))
    if args.linprobe and args.prune_method != "none":
        # the probe measures the pre-trained encoder (Table 1's LP column): pruning it would change the measurement
        problems.append(f"--linprobe evaluates the pre-trained encoder and does not prune (got --prune_method "
                        f"{args.prune_method}). Fix: drop --prune_method, or prune the fine-tuning instead")
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        problems.append(f"--cutmix_minmax {args.cutmix_minmax} must satisfy 0 < MIN < MAX <= 1")
    if mixup_active(args) and args.batch_size % 2:
        problems.append(f"mixup/cutmix needs an even --batch_size (got {args.batch_size}). Fix: use an even "
                        "batch size, or --mixup 0 --cutmix 0")
    if args.finetune and not os.path.isfile(args.finetune):
        problems.append(
            f"--finetune checkpoint {args.finetune} does not exist (or is not a file). Fix: pass the path of a "
            "pre-training checkpoint, e.g. OUTPUT_DIR/checkpoint-N.pth written by main_pretrain.py or MAE's "
            "published mae_pretrain_vit_base.pth (a dict with key 'model')"
        )
    if args.eval and not (args.resume or args.auto_resume):
        problems.append("--eval evaluates a fine-tuned checkpoint. Fix: add --resume PATH (or --auto_resume)")
    flags.raise_problems(problems)


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# ---------------------------------------------------------------------------------------------- data
class EvalShardSampler(Sampler):
    """Val indices for this rank, without padding: with `shard`, rank r gets r, r+W, r+2W, ...; without it
    rank 0 gets everything and the other ranks nothing. Either way the ranks partition the val set once,
    so the summed counts of engine_finetune.evaluate are exact."""

    def __init__(self, n: int, rank: int, world_size: int, shard: bool):
        if shard:
            self.indices = list(range(rank, n, world_size))
        else:
            self.indices = list(range(n)) if rank == 0 else []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def linprobe_transform(is_train: bool, args):
    """MAE's linear-probe augmentation: RandomResizedCrop (0.08-1) + horizontal flip (no flip on digits), uint8."""
    if not is_train:
        return image_transforms.eval_transform(args.data_set, args.input_size)
    return image_transforms.crop_transform(args.data_set, args.input_size, (0.08, 1.0), args.jpeg_upsampling)


def finetune_transform(is_train: bool, args):
    """MAE's fine-tuning augmentation: timm's RandAugment (--aa) + random erasing (--reprob), float32; uint8 centre
    crop for evaluation."""
    if not is_train:
        return image_transforms.eval_transform(args.data_set, args.input_size)
    return image_transforms.finetune_train_transform(
        args.data_set, args.input_size, auto_augment=args.aa, color_jitter=args.color_jitter, reprob=args.reprob,
        remode=args.remode, recount=args.recount)


def build_loaders(args):
    """-> (train set, val set, the run's DataPruner, train loader, val loader, forward-only loader).

    Train items carry their dataset index (util.datasets.IndexedDataset); the pruner's sampler picks them. Every
    sample the sampler yields is trained, in balanced batches (the ledger counts what was trained, and every kept
    sample gets its loss), unless --drop_last asks for MAE's batching; the linear probe keeps MAE's drop_last."""
    if args.linprobe:
        tf = linprobe_transform
    else:
        tf = finetune_transform
    base_train = data_util.build_dataset("train", args.data_set, args.data_path, tf(True, args), args.download)
    if args.label_noise:
        mislabelled = apply_label_noise(base_train, args.label_noise, args.seed)
        print(f"label noise: {int(mislabelled.sum())} of {mislabelled.size} training labels replaced")
        if args.output_dir and get_rank() == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            np.save(os.path.join(args.output_dir, run_folder.MISLABELLED_FILE), mislabelled)
    dataset_train = data_util.IndexedDataset(base_train)
    dataset_val = data_util.build_dataset("val", args.data_set, args.data_path, tf(False, args), args.download)
    world, rank = get_world_size(), get_rank()
    if len(dataset_train) // world < args.batch_size:
        raise ConfigError(
            f"the training set has {len(dataset_train)} images, fewer than one batch of {args.batch_size} per rank "
            f"on {world} rank(s). Fix: lower --batch_size"
        )
    effective = flags.effective_batch_size(args)
    if effective > len(dataset_train):  # at most one optimizer step per epoch, its lr scaled for `effective`
        raise ConfigError(
            f"the effective batch (--batch_size {args.batch_size} x --accum_iter {args.accum_iter} x {world} "
            f"rank(s) = {effective}) is larger than the training set ({len(dataset_train)} images): each epoch "
            f"would make at most one optimizer step, with a learning rate scaled for {effective} samples. Fix: "
            f"lower --batch_size or --accum_iter so that their product times the ranks is at most "
            f"{len(dataset_train)}"
        )
    pruner = d3p.DataPruner.from_args(args, len(dataset_train), min_kept=args.batch_size * world,
                                      **pruning_inputs(args))
    sampler_val = EvalShardSampler(len(dataset_val), rank, world, shard=args.dist_eval)
    # workers seed each item from (seed, epoch, rank, position): exact after a resume (util.item_seeding.SeededItems)
    # balanced batches (util.loader.make_loader); Mixup/CutMix pair a batch's samples: even sizes, so at most one
    # batch an epoch (the last, for an odd count) has a sample that is not mixed (engine_finetune.mix_batch). The
    # linear probe keeps MAE's drop_last: it does not prune, and its BatchNorm head wants full batches
    pairs = 2 if mixup_active(args) else 1
    loader_train = make_loader(dataset_train, pruner.sampler, args, args.batch_size, STREAM_TRAIN,
                               drop_last=args.linprobe or args.drop_last, multiple_of=pairs)
    loader_forward = make_loader(dataset_train, pruner.forward_sampler, args, args.batch_size, STREAM_FORWARD_ONLY,
                                 multiple_of=pairs)
    loader_val = make_eval_loader(dataset_val, sampler_val, args, args.batch_size)
    return dataset_train, dataset_val, pruner, loader_train, loader_val, loader_forward


# ----------------------------------------------------------------------------------------- checkpoint
def _load_foreign_checkpoint(path: str):
    """Load a checkpoint as plain data (weights_only=True); MAE's own checkpoints, whose `args` is an
    argparse.Namespace, load too (d3p.checkpoints.load_plain)."""
    try:
        return load_plain(path)
    except CheckpointFormatError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        raise ConfigError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}. Fix: pass a torch checkpoint of plain "
            "data (a dict with key 'model' holding a state_dict)"
        ) from exc


def load_pretrained(model: nn.Module, path: str, global_pool: bool, head_std: float) -> dict:
    """Initialise `model` (models_vit) from a pre-training checkpoint, MAE's way.

    Drops the decoder and mask token, drops head keys whose shapes differ, interpolates pos_embed to the
    model's grid, loads non-strictly and insists that only the head (+ fc_norm with global pooling) is missing.
    A missing head is re-initialised with a truncated normal of std `head_std`.
    """
    ckpt = _load_foreign_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = dict(ckpt["model"])
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = dict(ckpt)  # a bare state_dict
    else:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(f"--finetune checkpoint {path} has no 'model' state_dict (found {keys}). Fix: pass a "
                          "pre-training checkpoint in MAE's format, a dict with key 'model'")
    print(f"Load pre-trained checkpoint from: {path}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for k in [k for k in state if k.startswith("decoder") or k == "mask_token"]:
        del state[k]
    own = model.state_dict()
    for k in ("head.weight", "head.bias"):
        if k in state and k in own and state[k].shape != own[k].shape:
            print(f"Removing key {k} from pretrained checkpoint (shape {tuple(state[k].shape)} != {tuple(own[k].shape)})")
            del state[k]
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        interpolate_pos_embed(model, state)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ConfigError(
            f"--finetune checkpoint {path} does not match the model: {len(mismatched)} shape mismatch(es), e.g. "
            + "; ".join(mismatched[:4])
            + ". Fix: pass the --model whose encoder matches the pre-training model (mae_vit_tiny_patch4 -> "
            "vit_tiny_patch4, mae_vit_base_patch16 -> vit_base_patch16, ...) and the pre-training --input_size"
        )
    msg = model.load_state_dict(state, strict=False)
    allowed_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    # with global pooling timm's ViT has no final `norm` (fc_norm replaces it): the encoder norm is unused
    allowed_unexpected = {"norm.weight", "norm.bias"} if global_pool else set()
    bad_missing = sorted(set(msg.missing_keys) - allowed_missing)
    bad_unexpected = sorted(set(msg.unexpected_keys) - allowed_unexpected)
    if bad_missing or bad_unexpected:
        raise ConfigError(
            f"--finetune checkpoint {path} does not match --model: missing {bad_missing[:6]}"
            f"{' ...' if len(bad_missing) > 6 else ''}, unexpected {bad_unexpected[:6]}"
            f"{' ...' if len(bad_unexpected) > 6 else ''}. Fix: use the --model matching the pre-training model"
        )
    print(f"Loaded {len(state) - len(msg.unexpected_keys)} tensors; missing (newly initialised): {sorted(msg.missing_keys)}")
    if "head.weight" in msg.missing_keys:
        trunc_normal_(model.head.weight, std=head_std)
        nn.init.zeros_(model.head.bias)
    return {"missing_keys": sorted(msg.missing_keys), "unexpected_keys": sorted(msg.unexpected_keys)}


# ----------------------------------------------------------------------------------------------- main
@dataclasses.dataclass
class Finetuning(lifecycle.TrainingRun):
    """One fine-tuning (or linear-probing) run: the supervised loss with mixup, evaluation, the fine-tuning log line.
    Built by `build_data` (data, pruner, loaders) and `build_training` (model, optimizer, criterion)."""
    dataset_train: torch.utils.data.Dataset = None
    dataset_val: torch.utils.data.Dataset = None
    loader_val: torch.utils.data.DataLoader = None
    mixup_fn: SeededMixup | None = None
    criterion: object = None
    max_accuracy: float = 0.0
    n_parameters: int = 0
    last_test: dict | None = None  # the newest evaluation's results

    def batch_losses(self, epoch: int, forward_only: bool = False) -> SupervisedLoss:
        model = self.model_without_ddp if forward_only else self.model
        return SupervisedLoss(model, self.criterion, self.device, epoch, self.mixup_fn, self.amp_dtype,
                              self.input_stats, forward_only=forward_only)

    def log_line(self, epoch: int, train: dict, pruning_log: dict) -> dict:
        return {"train_loss": train["loss"], "train_lr": train["lr"], "train_grad_norm": train["grad_norm"],
                "epoch": epoch, "n_parameters": self.n_parameters, **pruning_log}

    def evaluate(self, epoch: int | None = None) -> dict | None:
        """Accuracy on the val set as test_* fields (written to TensorBoard too); None when a stop ended it."""
        stats = evaluate(self.loader_val, self.model_without_ddp, self.device, self.amp_dtype, self.input_stats,
                         stop_requested=self.stop)
        if stats is None:
            return None
        print(f"Accuracy of the network on the {len(self.dataset_val)} test images: {stats['acc1']:.1f}%")
        self.max_accuracy = max(self.max_accuracy, stats["acc1"])
        print(f"Max accuracy: {self.max_accuracy:.2f}%")
        if self.log_writer is not None and epoch is not None:
            for key in ("acc1", "acc5", "loss"):
                self.log_writer.add_scalar(f"perf/test_{key}", stats[key], epoch)
        self.last_test = stats
        return {f"test_{k}": v for k, v in stats.items()}

    def checkpoint_extra(self) -> dict:
        return {"max_accuracy": self.max_accuracy}


def build_data(args) -> Finetuning:
    """Data, pruner, loaders and Mixup of a run."""
    device = torch.device(args.device)
    dataset_train, dataset_val, pruner, loader_train, loader_val, loader_forward = build_loaders(args)
    n_data_classes = data_util.num_classes_of(dataset_train)
    if args.nb_classes is None:
        args.nb_classes = n_data_classes
    elif args.nb_classes < n_data_classes:
        raise ConfigError(f"--nb_classes {args.nb_classes} is smaller than the dataset's {n_data_classes} classes. "
                          "Fix: leave --nb_classes out (it defaults to the dataset's)")
    print(f"train: {len(dataset_train)} images, val: {len(dataset_val)} images, {args.nb_classes} classes")
    mixup_fn = None
    if mixup_active(args):
        print("Mixup is activated!")
        mixup_fn = SeededMixup(  # timm's Mixup drawing from (seed, epoch, rank, step): exact after a resume
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.nb_classes, seed=args.seed, rank=get_rank(),
        )
    return Finetuning(args, device, autocast_dtype(args.precision, args.device), data_util.dataset_stats(args.data_set),
                      pruner, loader_train, loader_forward, dataset_train=dataset_train, dataset_val=dataset_val,
                      loader_val=loader_val, mixup_fn=mixup_fn)


def build_model(args) -> nn.Module:
    """The ViT of --model, initialised from --finetune (or at random), with the linear probe's head."""
    model = models_vit.MODELS[args.model](
        num_classes=args.nb_classes, drop_path_rate=args.drop_path,
        global_pool="avg" if args.global_pool else "token", img_size=args.input_size,
    )
    patch = model.patch_embed.patch_size[0]
    if args.input_size % patch:
        raise ConfigError(f"--input_size {args.input_size} is not a multiple of {args.model}'s patch size {patch}")
    if args.finetune and not args.resume:
        load_pretrained(model, args.finetune, args.global_pool, head_std=0.01 if args.linprobe else 2e-5)
    elif not args.finetune and not args.resume:
        mode = "linprobe" if args.linprobe else "finetune"
        print(f"NOTE: no --finetune checkpoint: the encoder starts from random initialisation ({mode} from scratch)")
    if args.linprobe:
        # MAE: a BatchNorm without affine before the linear head (a normalising layer, not a trained one)
        if not args.finetune:
            trunc_normal_(model.head.weight, std=0.01)
        model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
        for p in model.parameters():
            p.requires_grad = False
        for p in model.head.parameters():
            p.requires_grad = True
    return model


def build_training(r: Finetuning, model: nn.Module) -> None:
    """Device, DDP, optimizer (AdamW with layer decay, LARS for the probe), scaler and criterion of `r`."""
    args, device = r.args, r.device
    model.to(device)
    maybe_compile(model, args.compile, args.compile_backend)
    r.model = r.model_without_ddp = model
    r.n_parameters = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Model {args.model}: {r.n_parameters / 1e6:.2f}M parameters, {n_trainable / 1e6:.3f}M trainable")
    eff_batch_size = flags.effective_batch_size(args)
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"base lr: {args.lr * 256 / eff_batch_size:.3e}, actual lr: {args.lr:.3e}, "
          f"accumulate grad iterations: {args.accum_iter}, effective batch size: {eff_batch_size}")
    # evaluation uses model_without_ddp: a DDP forward may broadcast buffers (the linear probe's BatchNorm
    # statistics), a collective that would hang when the ranks' val loaders have different lengths
    if args.distributed:
        r.model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(device))
    if args.linprobe:
        r.optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        param_groups = lr_decay.param_groups_lrd(
            model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(), layer_decay=args.layer_decay,
        )
        r.optimizer = torch.optim.AdamW(param_groups, lr=args.lr, **adamw_kwargs(device))
    print(f"optimizer: {type(r.optimizer).__name__}")
    r.loss_scaler = ScaledOptimizerStep(r.amp_dtype, args.device)
    # per-sample losses (the pruner weighs and records them); their batch mean is timm's SoftTargetCrossEntropy
    # with mixup (smoothing is then part of the mixed targets), LabelSmoothingCrossEntropy, or CrossEntropyLoss
    smoothing = 0.0 if r.mixup_fn is not None else args.smoothing
    r.criterion = functools.partial(d3p.per_sample_cross_entropy, smoothing=smoothing)
    print(f"criterion = per-sample cross-entropy ({'soft targets' if r.mixup_fn is not None else f'smoothing {smoothing}'})"
          f", pruning: {args.prune_method}")


def main(args) -> dict | int:
    t_start = time.time()
    resolve_defaults(args)
    validate_args(args)
    init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print("{}".format(args).replace(", ", ",\n"))
    torch.manual_seed(args.seed + get_rank())
    random.seed(args.seed + get_rank())
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    configure_cuda_math(torch.device(args.device))

    r = build_data(args)
    lifecycle.output_dir_ready(args)
    build_training(r, build_model(args))
    r.stop = StopSignals()
    if args.eval:
        return evaluate_only(r)
    point = resume(r)
    r.log_writer = run_log.summary_writer(args.log_dir)
    start = point.start_epoch if point is not None else args.start_epoch
    mode = "linprobe" if args.linprobe else "finetune"
    print(f"Start training ({mode}) for {args.epochs} epochs from epoch {start}")
    t_train = time.time()
    code = lifecycle.run_epochs(r, point)
    if code is not None:
        return code
    return finish(r, t_start, t_train)


def resume(r: Finetuning) -> resume_util.ResumePoint | None:
    """Resume from --resume or the newest checkpoint (--auto_resume) -> where to continue. A checkpoint with
    weights only (no optimizer or epoch: MAE's fine-tuned weights) is loaded and training starts at
    --start_epoch. MAE's own checkpoints (args as a Namespace, no pruning state) load too."""
    found = _find_checkpoint(r.args)
    if found is None:
        return None
    path, ckpt = found
    resume_util.load_weights(r.model_without_ddp, ckpt, path, fix="use the same --model, --nb_classes, "
                             "--global_pool/--cls_token and --linprobe as the run that wrote it")
    print(f"Resume checkpoint {path}")
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        r.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
        return None
    point = resume_util.restore_run_state(ckpt, path, r, r.args.prune_method)
    r.max_accuracy = float(ckpt.get("max_accuracy", 0.0))
    return point


def _find_checkpoint(args) -> tuple[str, dict] | None:
    """(path, checkpoint) of --resume or, with --auto_resume, of the newest complete checkpoint (which then
    becomes --resume, as the summary reports), loaded as plain data; None without either."""
    if args.auto_resume and not args.resume:
        found = ckpt_util.find_resume_checkpoint(args.output_dir)  # rank 0 chooses for all ranks
        if found is not None:
            args.resume = found[0]
            print(f"--auto_resume: found {args.resume}")
            return found
    if args.eval and not args.resume:
        raise ConfigError(f"--eval: no checkpoint to evaluate in {args.output_dir}. Fix: pass --resume PATH")
    return (args.resume, _load_foreign_checkpoint(args.resume)) if args.resume else None


def evaluate_only(r: Finetuning) -> dict | int:
    """--eval: the weights of --resume (or the newest checkpoint), evaluated once."""
    path, ckpt = _find_checkpoint(r.args)
    resume_util.load_weights(r.model_without_ddp, ckpt, path, fix="use the same --model, --nb_classes, "
                             "--global_pool/--cls_token and --linprobe as the run that wrote it")
    if r.evaluate() is None:
        return run.stopped(r.stop, "evaluation stopped by signal (nothing to save)")
    return r.last_test


def finish(r: Finetuning, t_start: float, t_train: float) -> dict:
    """The final evaluation (when no epoch was left to train) and summary.json -> the summary."""
    args = r.args
    if r.last_test is None and r.evaluate() is None:
        return run.stopped(r.stop, "stopped by signal in the final evaluation (training was complete)")
    test_stats = r.last_test
    train_seconds = time.time() - t_train
    print(f"Training time {datetime.timedelta(seconds=int(train_seconds))}")
    print(f"Accuracy of the network on the {len(r.dataset_val)} test images: {test_stats['acc1']:.1f}% "
          f"(top-5 {test_stats['acc5']:.1f}%, best top-1 {r.max_accuracy:.1f}%)")
    eff_batch_size = flags.effective_batch_size(args)
    summary = {
        "mode": "linprobe" if args.linprobe else "finetune",
        "model": args.model,
        "epochs": args.epochs,
        "best_acc1": r.max_accuracy,
        "final_acc1": test_stats["acc1"],
        "final_acc5": test_stats["acc5"],
        "final_loss": test_stats["loss"],
        "nb_classes": args.nb_classes,
        "num_train": len(r.dataset_train),
        "num_val": len(r.dataset_val),
        "wall_seconds": time.time() - t_start,
        "train_seconds": train_seconds,
        "epoch_seconds": [e["epoch_seconds"] for e in r.pruner.ledger.epochs],  # training, without evaluation
        "finetune": args.finetune,
        "resumed_from": args.resume or None,
        "data_set": args.data_set,
        "input_size": args.input_size,
        "global_pool": args.global_pool,
        "lr": args.lr,
        "blr": args.lr * 256 / eff_batch_size,  # the effective base lr (also when --lr was given)
        "eff_batch_size": eff_batch_size,
        "world_size": get_world_size(),
        "device": str(r.device),
        "precision": args.precision,
        "n_parameters": r.n_parameters,
        "n_trainable": sum(p.numel() for p in r.model_without_ddp.parameters() if p.requires_grad),
        # the pruning method, its options and the cost ledger, as in pre-training's summary.json (epochs: done,
        # wall_seconds: the training epochs)
        **r.pruner.summary(),
    }
    lifecycle.write_summary_and_close(r, summary)
    return summary


def cli(argv=None, linprobe: bool = False) -> None:
    d3p.import_prune_plugins(argv)  # a --prune_plugin's method and options must be flags before parsing
    args = get_args_parser().parse_args(argv)
    if linprobe:
        args.linprobe = True
    code = run.run_main(main, args)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    cli()
