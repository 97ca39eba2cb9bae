"""DataLoader plumbing shared by the entry scripts: batch collation and the default worker count."""
from __future__ import annotations

import os

import torch
from torch.utils.data import default_collate


def collate_indexed(batch):
    """Default collation, kept explicit so the index column stays an int64 tensor (images keep their
    dtype: uint8 from util.image_transforms, float32 from timm's fine-tuning transform).

    Images in channels-last memory (the uint8 JPEG transforms) are stacked as [B, H, W, C] and returned
    as the [B, C, H, W] view of it: a plain copy, where stacking the [C, H, W] views would transpose every
    image. The pinned copy and the host-to-device copy keep that layout (pin_memory keeps strides);
    DeviceNormalize returns a contiguous float batch. Stacking goes through torch's default_collate,
    which in a DataLoader worker writes the batch straight into shared memory (no second copy of it on
    the way to the main process)."""
    first = batch[0][0]
    if first.dim() == 3 and first.stride(0) == 1 and first.shape[0] > 1:  # channels-last [C, H, W]
        imgs = default_collate([b[0].permute(1, 2, 0) for b in batch]).permute(0, 3, 1, 2)
    else:
        imgs = default_collate([b[0] for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    index = torch.as_tensor([b[2] for b in batch], dtype=torch.long)
    return imgs, targets, index


MAX_DEFAULT_WORKERS = 16  # each worker holds a copy of the file list; more rarely pays off per GPU


def _leading_int(value: str) -> int:
    """SLURM writes per-node task counts like '4' or '4(x2)'."""
    digits = ""
    for ch in value.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 1


def default_num_workers(environ: dict | None = None) -> int:
    """`--num_workers` default: the CPUs this process may run on, shared by the processes of this node.

    torchrun starts every local rank with the launcher's CPU set: divide it by LOCAL_WORLD_SIZE. A
    SLURM task without torchrun has its own budget SLURM_CPUS_PER_TASK, or else shares the node's CPU
    set with SLURM_NTASKS_PER_NODE tasks. At least 1, at most MAX_DEFAULT_WORKERS.
    """
    env = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if env.get("LOCAL_WORLD_SIZE"):
        per_process = cpus // max(_leading_int(env["LOCAL_WORLD_SIZE"]), 1)
    elif env.get("SLURM_CPUS_PER_TASK"):
        per_process = min(cpus, _leading_int(env["SLURM_CPUS_PER_TASK"]))
    elif env.get("SLURM_NTASKS_PER_NODE"):
        per_process = cpus // max(_leading_int(env["SLURM_NTASKS_PER_NODE"]), 1)
    else:
        per_process = cpus
    return max(1, min(MAX_DEFAULT_WORKERS, per_process))
