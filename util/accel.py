"""GPU throughput choices, each a small function so a CPU test can check the decision it makes."""
from __future__ import annotations

import torch


def adamw_kwargs(device: str | torch.device) -> dict:
    """Extra torch.optim.AdamW arguments: the fused CUDA kernel (one launch for all parameters)
    on CUDA; nothing on CPU, where the default (foreach) implementation runs."""
    return {"fused": True} if torch.device(device).type == "cuda" else {}


def configure_cuda_math(device: str | torch.device) -> dict:
    """On CUDA, allow TF32 for fp32 matmuls and convolutions (Ampere+: ~8x the fp32 throughput; the
    autocast bf16/fp16 regions are unaffected). Returns the settings it applied ({} on CPU)."""
    if torch.device(device).type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"matmul.allow_tf32": True, "cudnn.allow_tf32": True}


def ddp_kwargs(device: str | torch.device) -> dict:
    """DistributedDataParallel arguments: gradients live in the all-reduce buckets (no copy in or
    out of them, one gradient-sized buffer less); device_ids only on CUDA."""
    device = torch.device(device)
    return {"device_ids": [device.index] if device.type == "cuda" else None, "gradient_as_bucket_view": True}


def maybe_compile(model: torch.nn.Module, enabled: bool, backend: str = "inductor") -> torch.nn.Module:
    """--compile: compile the module in place (nn.Module.compile) before DDP wraps it, so its
    state_dict keys stay MAE's (no `_orig_mod.` prefix) and checkpoints are unchanged."""
    if enabled:
        model.compile(backend=backend)
    return model
