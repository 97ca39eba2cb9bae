"""What the two Hugging Face Trainer examples share: flags, the pruner, the PruningTrainer run, the report."""
from __future__ import annotations

import argparse
import json
import os

import torch

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # this repository's shim for CPU-only torch, before transformers; drop it in your project
from transformers import TrainerCallback, TrainingArguments

import d3p


def parser(description: str, output_dir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", default=6, type=int)
    p.add_argument("--stop_after_steps", default=0, type=int, help="end training at this step (resume tests)")
    p.add_argument("--save_steps", default=0, type=int, help="also save every N steps (default: each epoch)")
    p.add_argument("--batch_size", default=32, type=int, help="per process")
    p.add_argument("--lr", default=3e-3, type=float)
    p.add_argument("--subset", default=0, type=int, help="train on the first N samples only")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--output_dir", default=output_dir)
    d3p.add_pruning_args(p, methods=d3p.method_names("dynamic"), loss_kind="classification")
    return p


class StopAt(TrainerCallback):
    """Save and stop at a given step (a preemption, for the resume tests); the LR schedule stays the full run's."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def train(args, model: torch.nn.Module, train_set, loss_fn, trainer_class=None) -> d3p.DataPruner:
    """Train `model` on `train_set` (dict items with "labels") with a PruningTrainer; print the ledger."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    pruner = d3p.DataPruner.from_args(args, len(train_set), min_kept=args.batch_size * world,  # d3p
                                      loss_fn=loss_fn)
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, seed=args.seed, data_seed=args.seed, report_to=[], disable_tqdm=True,
        logging_strategy="no", use_cpu=not torch.cuda.is_available(),
        save_strategy="steps" if args.save_steps else "epoch", save_steps=args.save_steps or 500,
    )
    trainer_class = trainer_class or d3p.PruningTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_set, pruner=pruner)  # d3p
    if args.stop_after_steps:
        trainer.add_callback(StopAt(args.stop_after_steps))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    rank = training_args.process_index
    torch.save(pruner.state_dict(), os.path.join(args.output_dir, f"pruning-rank{rank}.pt"))
    if rank == 0:
        torch.save(trainer.model.state_dict(), os.path.join(args.output_dir, "weights.pt"))
        summary = pruner.summary()
        print(json.dumps({"summary": summary}), flush=True)
        print(f"prune ratio {summary['prune_ratio']:.3f}, compute saved {summary['compute_saved']:.3f}", flush=True)
    return pruner
