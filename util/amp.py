"""Mixed precision: choose the autocast dtype, and a GradScaler wrapper that also returns the grad norm."""
from __future__ import annotations

import math
from typing import Callable

import torch


def native_bf16() -> bool:
    """True when the current CUDA device computes bf16 in hardware (compute capability >= 8.0, or ROCm).

    torch's `is_bf16_supported()` also answers True where bf16 is only emulated (V100, T4: several times
    slower, and no bf16 convolution kernels below sm80), so emulation is excluded explicitly.
    """
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(
    precision: str, device: str, bf16_supported: Callable[[], bool] = native_bf16
) -> torch.dtype | None:
    """`--precision`: auto -> bf16 on CUDA with native bf16 (A100, H100, ...), fp16 + GradScaler on older
    GPUs (V100, T4), fp32 on CPU; None = no autocast. `bf16_supported` is the hardware query (a parameter so
    the choice can be tested without a GPU)."""
    on_cuda = device.startswith("cuda")
    if precision == "auto":
        if not on_cuda:
            return None
        return torch.bfloat16 if bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if not on_cuda:
            raise ValueError("--precision fp16 needs CUDA. Fix: use --precision bf16 or fp32 on CPU")
        return torch.float16
    raise ValueError(f"unknown --precision {precision}: choose auto, bf16, fp16 or fp32")


class ScaledOptimizerStep:
    """backward (scaled when fp16), then on update steps: unscale, clip, step, update.

    Returns the gradient norm as a tensor on update steps (no host sync), else None.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, dtype: torch.dtype | None, device: str):
        self.enabled = dtype == torch.float16
        self._scaler = torch.amp.GradScaler(device.split(":")[0], enabled=self.enabled)

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, update_grad: bool = True):
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._scaler.load_state_dict(state)
