"""Distributed setup in one place: torchrun / SLURM environment, NCCL on CUDA, gloo on CPU."""
from __future__ import annotations

import builtins
import datetime
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


_builtin_print = builtins.print


def _silence_non_main_ranks(is_master: bool) -> None:
    """Only rank 0 prints, unless `print(..., force=True)`: keeps multi-node logs readable (MAE's way)."""
    builtin_print = _builtin_print  # wrap the original once, however often this is called

    def print_(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def resolve_device(requested: str | None) -> str:
    """`--device` default: cuda when available, else cpu."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_gpu(local_id: int, visible_gpus: int) -> int:
    """The CUDA device index of a SLURM task with node-local id `local_id` (SLURM_LOCALID, 0..tasks per node - 1).

    With all of a node's GPUs visible to every task the index is the local id; with one GPU bound per task
    (`--gpus-per-task=1`, `--gpu-bind=single:1`) each task sees one device, index 0, and `local_id` does not
    exist. The local id modulo the visible count is right in both layouts (no GPU visible: the local id).
    """
    return local_id % visible_gpus if visible_gpus > 0 else local_id


def launch_ranks(env: Mapping[str, str], visible_gpus: int) -> tuple[int, int, int] | None:
    """(rank, world size, local CUDA device index) from the launcher's variables; None = not launched.

    torchrun: RANK, WORLD_SIZE, LOCAL_RANK. SLURM without torchrun (srun): SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, mapped to a visible device by `task_gpu`.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        return rank, world, task_gpu(int(env.get("SLURM_LOCALID", rank)), visible_gpus)
    return None


def device_kwargs(use_cuda: bool, gpu: int) -> dict:
    """Extra `init_process_group` arguments: on CUDA, bind the group to this rank's GPU (`device_id`), so NCCL
    connects eagerly on the right device and `barrier()` does not guess the device; gloo takes none."""
    return {"device_id": torch.device("cuda", gpu)} if use_cuda else {}


def cleanup() -> None:
    """Leave the process group at exit (every entry script calls it in a `finally`): NCCL frees its
    communicators in order instead of at interpreter teardown, where it can hang or warn."""
    if is_dist():
        dist.destroy_process_group()


def init_distributed_mode(args) -> None:
    """Read rank/world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM, and join the group.

    Sets args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend, args.device.
    One process on its own (no env vars) runs undistributed.
    """
    args.device = resolve_device(getattr(args, "device", None))
    launch = launch_ranks(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if launch is not None:
        args.rank, args.world_size, args.gpu = launch
        if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):  # SLURM without torchrun
            os.environ.setdefault("MASTER_PORT", "29500")
            if "MASTER_ADDR" not in os.environ:
                raise RuntimeError(
                    "SLURM run without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames "
                    "$SLURM_JOB_NODELIST | head -n 1) in the batch script"
                )
    else:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.dist_backend = None
        _silence_non_main_ranks(True)
        return

    args.distributed = True
    _silence_non_main_ranks(args.rank == 0)
    use_cuda = args.device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    args.dist_backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout_min", 30))
    dist.init_process_group(
        backend=args.dist_backend,
        store=_store_of_this_attempt(args, timeout),
        world_size=args.world_size,
        rank=args.rank,
        timeout=timeout,
        **device_kwargs(use_cuda, args.gpu),
    )
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {args.dist_backend})", force=True)
    dist.barrier()


def _store_of_this_attempt(args, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous key-value store, with keys scoped to this elastic attempt.

    Why: after torchrun restarts the workers (--max_restarts), the agent's store can still hold the
    previous attempt's process-group keys; a new rank that reads a dead peer's address then fails
    ("Connection refused") or waits forever in gloo's connectFullMesh. A prefix per attempt
    (TORCHELASTIC_RESTART_COUNT) makes every attempt start from fresh keys.
    """
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        host, port, args.world_size, is_master=not agent_hosts_store and args.rank == 0, timeout=timeout,
    )
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# ------------------------------------------------------------------------------------------ collectives
# Every collective of this project goes through the wrappers below (a test greps for direct calls), and
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
                "Fix: place it with util.dist.to_collective(tensor)"
            )
        if strict_collectives() and not isinstance(t, _OnCollectiveDevice):
            raise CollectiveDeviceError(
                f"{op}: a tensor ({tuple(t.shape)}, {t.dtype}) not placed with util.dist.to_collective "
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


def all_reduce_sum(value: float) -> float:
    """Sum a Python number over ranks (once per epoch, for logging and counting)."""
    if not is_dist():
        return value
    return all_reduce(to_collective(torch.tensor(value, dtype=torch.float64))).item()


def all_reduce_mean(value: float) -> float:
    """Average a Python number over ranks (for logging)."""
    return all_reduce_sum(value) / get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a scalar all-reduce; call only at sync points)."""
    if not is_dist():
        return flag
    return bool(all_reduce(to_collective(torch.tensor([1 if flag else 0], dtype=torch.int32)), op="max").item())


def collective_device() -> torch.device:
    """Device on which tensors must live for collectives of the active backend."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) on every rank; the others' argument is ignored."""
    if not is_dist():
        return obj
    box = [obj if get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def agree_at_sync_point(stop: bool, bad_step: int | None, num_steps: int) -> tuple[bool, int | None, int | None]:
    """One int64 all-reduce (MAX) at a host-sync point: (any rank asked to stop, the earliest step
    at which any rank saw a non-finite loss or None, the lowest rank that saw it or None).

    Why one collective for both: a rank that raised on its own NaN would leave the others waiting in
    their next collective; with this, every rank learns of the NaN at the same point and stops.
    `bad_step` lies in [0, num_steps); it is encoded so that MAX picks the earliest step, then the
    lowest rank: (num_steps - step) * world + (world - 1 - rank), 0 meaning none.
    """
    world, rank = get_world_size(), get_rank()
    key = 0 if bad_step is None else (num_steps - int(bad_step)) * world + (world - 1 - rank)
    if is_dist():
        t = all_reduce(to_collective(torch.tensor([1 if stop else 0, key], dtype=torch.int64)), op="max")
        stop_any, key = t.tolist()
        stop = bool(stop_any)
    if key == 0:
        return stop, None, None
    q, r = divmod(key, world)
    return stop, num_steps - q, world - 1 - r
