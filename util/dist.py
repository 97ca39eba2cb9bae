"""Distributed setup in one place: torchrun / SLURM environment, NCCL on CUDA, gloo on CPU."""
from __future__ import annotations

import builtins
import datetime
import os
from typing import Mapping

import torch
import torch.distributed as dist

# the training scripts' collectives below are built on the d3p package's wrappers (device checks, strict mode);
# code that calls a wrapper itself imports it from d3p.collectives
from d3p.collectives import all_reduce, collective_device, get_rank, get_world_size, is_dist, to_collective


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
        from util.stop import release_side_group  # (util.stop builds on this module)

        release_side_group()  # it holds the default group, and so the store's listening socket, alive
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


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) on every rank; the others' argument is ignored."""
    if not is_dist():
        return obj
    box = [obj if get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def agree_at_sync_point(stop: bool, bad_step: int | None, num_steps: int, bad_value: float = float("nan")
                        ) -> tuple[bool, int | None, int | None, float | None]:
    """One int64 all-reduce (MAX) at a host-sync point: (any rank asked to stop, the earliest step
    at which any rank saw a non-finite loss or None, the lowest rank that saw it or None, that rank's
    loss value there: nan, inf or -inf, or None).

    Why one collective for both: a rank that raised on its own NaN would leave the others waiting in
    their next collective; with this, every rank learns of the NaN at the same point and stops, and all
    of them can name the same step, rank and value.
    `bad_step` lies in [0, num_steps); it is encoded so that MAX picks the earliest step, then the
    lowest rank, and carries that rank's kind of value in the lowest digit:
    ((num_steps - step) * world + (world - 1 - rank)) * 3 + kind, 0 meaning none.
    """
    world, rank = get_world_size(), get_rank()
    kinds = (float("nan"), float("inf"), float("-inf"))
    kind = 0 if bad_value != bad_value else (1 if bad_value > 0 else 2)
    key = 0 if bad_step is None else ((num_steps - int(bad_step)) * world + (world - 1 - rank)) * 3 + kind
    if is_dist():
        t = all_reduce(to_collective(torch.tensor([1 if stop else 0, key], dtype=torch.int64)), op="max")
        stop_any, key = t.tolist()
        stop = bool(stop_any)
    if key == 0:
        return stop, None, None, None
    key, kind = divmod(key, 3)
    q, r = divmod(key, world)
    return stop, num_steps - q, world - 1 - r, kinds[kind]


def all_reduce_max_async_cpu(flag: torch.Tensor, group) -> "dist.Work":
    """Launch a MAX all-reduce of a CPU int tensor on `group`, a gloo process group (util.stop's side group), and
    return its work without waiting. CPU by design: gloo runs it on its own threads, so launching it and reading
    the result never touch (or sync) a GPU; the device check of the NCCL collectives does not apply."""
    if flag.device.type != "cpu":
        raise ValueError(f"all_reduce_max_async_cpu takes a CPU tensor (a gloo group), got one on {flag.device}")
    return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
