"""The collectives of the pruning library: thin wrappers over torch.distributed that check where each tensor lives.

Any training code may call them too (this fork's util.dist builds its helpers on them). Strict mode
(D3P_STRICT_COLLECTIVES=1) is the library's way to prove on CPU/gloo that every tensor reaching a wrapper was
placed for NCCL; it knows nothing of any training script, it only tags what `to_collective` placed.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0



def collective_device() -> torch.device:
    """Device on which tensors must live for collectives of the active backend: this rank's current GPU
    under NCCL (refused when the process never chose its GPU, see rank_device_problem)."""
    if is_dist() and dist.get_backend() == "nccl":
        current = torch.cuda.current_device()
        problem = rank_device_problem(os.environ.get("LOCAL_RANK"), torch.cuda.device_count(), current)
        if problem:
            raise CollectiveDeviceError(problem)
        return torch.device("cuda", current)
    return torch.device("cpu")


def rank_device_problem(local_rank: str | None, device_count: int, current: int) -> str | None:
    """The message for a torchrun rank whose current GPU is still cuda:0 although it sees its own GPU
    cuda:LOCAL_RANK: the script never called torch.cuda.set_device, and every rank's collectives would land
    on GPU 0 (NCCL then fails on the duplicate GPU, or all ranks crowd one GPU). None when fine (also when each
    process sees only its own GPU, as SLURM's --gpus-per-task arranges)."""
    if local_rank is None or not local_rank.isdigit():
        return None
    rank = int(local_rank)
    if rank == 0 or rank >= device_count or current != 0:
        return None
    return (f"this process is local rank {rank} of a node with {device_count} visible GPUs, but its current GPU "
            "is cuda:0, so its NCCL collectives would run on rank 0's GPU. Fix: call "
            "torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) at the start of the script, before "
            "init_process_group and before building the model")



# ------------------------------------------------------------------------------------------ collectives
# Every collective of the library goes through the wrappers below (a test greps for direct calls), and
# every tensor they get must be placed with `to_collective`. NCCL accepts only tensors on this rank's GPU;
# gloo on CPU accepts anything, so a CPU-only test could never see the bug "a CPU tensor passed to an NCCL
# collective". Strict mode (D3P_STRICT_COLLECTIVES=1, set by the tests' torchrun runs) makes it visible:
# `to_collective` tags the tensor as "on the collective device", the tag follows the tensor through
# device-preserving ops (zeros_like, arithmetic, dtype casts) and is lost where NCCL's tensor would leave
# the GPU (`.cpu()`, `.to(device)`), and the wrappers refuse untagged tensors.

STRICT_COLLECTIVES_ENV = "D3P_STRICT_COLLECTIVES"


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective is not on the device the backend requires."""


def strict_collectives() -> bool:
    return os.environ.get(STRICT_COLLECTIVES_ENV, "0") == "1"


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The same storage as an ordinary tensor (drops the strict-mode tag; the context is torch's documented
    way to call a Tensor method without re-entering a subclass's __torch_function__)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    return "device" in kwargs or any(
        isinstance(a, (torch.device, str, torch.Tensor)) or (isinstance(a, int) and not isinstance(a, bool)) for a in args
    )


class _OnCollectiveDevice(torch.Tensor):
    """Strict mode's tag "placed on the collective device" (see above); ops on it keep the tag unless they
    move the data (`.cpu()`, `.to(<device or tensor>)`), as NCCL's GPU tensor would leave the GPU there."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _names_a_device(args[1:], kwargs)):
            return _plain(out)
        return out


def to_collective(t: torch.Tensor) -> torch.Tensor:
    """`t` on the device the active backend's collectives need (this rank's GPU under NCCL, else the CPU)."""
    t = t.to(collective_device())
    return t.as_subclass(_OnCollectiveDevice) if strict_collectives() else t


def _check_placed(op: str, tensors: list[torch.Tensor]) -> None:
    want = collective_device()
    for t in tensors:
        if t.device != want:
            raise CollectiveDeviceError(
                f"{op}: a tensor on {t.device}, but the {dist.get_backend()} backend needs {want}. "
                "Fix: place it with d3p.collectives.to_collective(tensor)"
            )
        if strict_collectives() and not isinstance(t, _OnCollectiveDevice):
            raise CollectiveDeviceError(
                f"{op}: a tensor ({tuple(t.shape)}, {t.dtype}) not placed with to_collective "
                f"({STRICT_COLLECTIVES_ENV}=1). Under NCCL it would be a CPU tensor and the collective would "
                "fail on a GPU cluster. Fix: pass to_collective(tensor), and keep it there until the collective"
            )


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` (placed with `to_collective`) over ranks; returns `t`. op: sum, max, min."""
    if not is_dist():
        return t
    _check_placed("all_reduce", [t])
    dist.all_reduce(_plain(t), op=_REDUCE_OPS[op])
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on all ranks, placed with `to_collective`), in rank order."""
    if not is_dist():
        return [t]
    _check_placed("all_gather", [t])
    out = [torch.zeros_like(t) for _ in range(get_world_size())]
    dist.all_gather([_plain(o) for o in out], _plain(t))
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (torch places the bytes on the right device itself)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CollectiveTimeoutError(RuntimeError):
    """A rank waited longer than its timeout for the other ranks to join a collective."""


def all_gather_within(t: torch.Tensor, timeout_s: float, what: str) -> list[torch.Tensor]:
    """`all_gather(t)` that gives up after `timeout_s` seconds with an error naming `what` (the call that
    waited), instead of the backend's silent wait. The process group is unusable afterwards: the error is
    meant to end the run with a clear message."""
    if not is_dist():
        return [t]
    import datetime

    _check_placed("all_gather", [t])
    out = [torch.zeros_like(t) for _ in range(get_world_size())]
    work = dist.all_gather([_plain(o) for o in out], _plain(t), async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo: "Operation timed out!"; NCCL: a watchdog timeout
        raise CollectiveTimeoutError(
            f"rank {get_rank()} waited {timeout_s:g} s in {what} for the other ranks, which never joined. Likely "
            f"cause: {what.split('(')[0]} is called on some ranks only (e.g. under `if rank == 0:`). Fix: call it "
            f"on every rank, in the same order ({e})"
        ) from e
    return out
