"""The choices the cluster paths make, tested without a GPU or a cluster (issue 9):
precision (native bf16 only), SLURM device index, process-group kwargs and teardown, strict collectives,
MAE checkpoints with an argparse.Namespace, train_d3p.sh's batch arithmetic, the submitit launchers."""
import argparse
import os
import re
import subprocess
import sys

import util  # noqa: F401  (before timm/torchvision)

import numpy as np
import pytest
import torch
import torch.distributed as dist

import main_finetune
import main_pretrain_d3p
from conftest import REPO, free_port
from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.amp import autocast_dtype


# ------------------------------------------------------------------------------ item 6: precision
def test_precision_auto_picks_native_bf16_else_fp16():
    assert autocast_dtype("auto", "cuda:0", bf16_supported=lambda: True) is torch.bfloat16  # A100, H100
    assert autocast_dtype("auto", "cuda:0", bf16_supported=lambda: False) is torch.float16  # V100, T4
    assert autocast_dtype("auto", "cpu", bf16_supported=lambda: True) is None
    assert autocast_dtype("bf16", "cuda:0", bf16_supported=lambda: False) is torch.bfloat16  # asked for: kept


def test_precision_auto_ignores_emulated_bf16(monkeypatch):
    # torch.cuda.is_bf16_supported() answers True on a V100 (bf16 emulated); only the native answer may count
    def v100(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", v100)
    assert autocast_dtype("auto", "cuda") is torch.float16


# -------------------------------------------------------------------- item 7: SLURM device index
def test_slurm_task_gpu_is_local_id_modulo_visible_devices():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    assert dist_util.launch_ranks(env, visible_gpus=8) == (13, 16, 5)  # every task sees the node's 8 GPUs
    assert dist_util.launch_ranks(env, visible_gpus=1) == (13, 16, 0)  # one GPU bound per task
    assert dist_util.launch_ranks(env, visible_gpus=0) == (13, 16, 5)  # CPU
    assert dist_util.launch_ranks({**env, "SLURM_NTASKS": "1"}, visible_gpus=8) is None  # a single task
    torchrun = {**env, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}  # torchrun's variables win
    assert dist_util.launch_ranks(torchrun, visible_gpus=8) == (3, 4, 3)
    assert dist_util.launch_ranks({}, visible_gpus=8) is None


# ------------------------------------------------------------- item 9: process group kwargs, teardown
def test_process_group_binds_the_gpu_on_cuda_only():
    assert dist_util.device_kwargs(use_cuda=True, gpu=3) == {"device_id": torch.device("cuda", 3)}
    assert dist_util.device_kwargs(use_cuda=False, gpu=3) == {}


@pytest.fixture
def one_rank_launch(monkeypatch):
    """torchrun's variables for one process: the entry scripts join a 1-rank gloo group in this process."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()), dist_util.STRICT_COLLECTIVES_ENV: "1"}.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():  # a failed assertion must not leak the group into later tests
        dist.destroy_process_group()


BASE = ["--num_workers", "0", "--input_size", "16", "--batch_size", "32", "--train_subset", "64",
        "--warmup_epochs", "1", "--blr", "1e-3", "--print_freq", "3"]


def test_pretrain_leaves_the_group_and_its_collectives_pass_strict_mode(tmp_path, one_rank_launch):
    # D2 runs the embeddings pass (whose all_reduce once took a CPU tensor), the loss reduction, the plan
    # fingerprint, the RNG and replica gathers: all under strict collectives
    out = str(tmp_path / "d2")
    assert main_pretrain_d3p.cli([*BASE, "--prune_method", "d2", "--static_warmup_epochs", "1", "--epochs", "2",
                                  "--output_dir", out]) == 0
    assert not dist.is_initialized(), "destroy_process_group() was not called at exit"
    assert os.path.isfile(os.path.join(out, "checkpoint-1.pth"))


def test_finetune_leaves_the_group_on_an_error_exit(tmp_path, one_rank_launch, capsys):
    with pytest.raises(SystemExit) as e:  # --eval, nothing to resume: refused after the group was joined
        main_finetune.cli(["--model", "vit_tiny_patch4", "--input_size", "16", "--num_workers", "0", "--eval",
                           "--auto_resume", "--output_dir", str(tmp_path / "ft")])
    assert e.value.code == 2 and "--eval: no checkpoint" in capsys.readouterr().err
    assert not dist.is_initialized(), "destroy_process_group() was not called at exit"


# ----------------------------------------------------------------------- item 16: strict collectives
@pytest.fixture
def gloo_group(monkeypatch):
    """A 1-rank gloo group in this process, strict collectives on."""
    monkeypatch.setenv(dist_util.STRICT_COLLECTIVES_ENV, "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_strict_mode_refuses_a_tensor_nccl_would_refuse(gloo_group):
    # the embeddings pass before commit c383b67: `dim = torch.tensor([...])` (CPU) all-reduced under NCCL
    dim = torch.tensor([192], dtype=torch.int64)
    with pytest.raises(dist_util.CollectiveDeviceError, match="to_collective"):
        dist_util.all_reduce(dim, op="max")
    # ... and its `.to(dev)` with dev computed by hand, then `.cpu()` before the reduction
    placed = dist_util.to_collective(torch.from_numpy(np.ones(3, dtype=np.float32)))
    with pytest.raises(dist_util.CollectiveDeviceError):
        dist_util.all_reduce(placed.cpu())
    with pytest.raises(dist_util.CollectiveDeviceError):
        dist_util.all_gather(torch.zeros(2).to("cpu"))
    # placed with to_collective: accepted, and the tag survives device-preserving ops
    assert dist_util.all_reduce(placed * 2).tolist() == [2.0, 2.0, 2.0]
    assert dist_util.all_reduce(placed.to(torch.float64), op="max").dtype == torch.float64
    (only,) = dist_util.all_gather(dist_util.to_collective(torch.tensor([7, 8])))
    assert only.tolist() == [7, 8]
    assert dist_util.all_reduce_sum(2.5) == 2.5 and dist_util.any_rank(True) is True
    assert dist_util.all_gather_object({"a": 1}) == [{"a": 1}]


def test_without_strict_mode_cpu_tensors_pass_on_gloo(gloo_group, monkeypatch):
    monkeypatch.setenv(dist_util.STRICT_COLLECTIVES_ENV, "0")
    assert dist_util.all_reduce(torch.tensor([3])).tolist() == [3]  # what a CPU run can see without it


def test_every_collective_goes_through_util_dist():
    """Strict mode only checks what passes through util/dist.py's wrappers: no direct torch.distributed
    collective anywhere else in the project's code."""
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_object|broadcast|broadcast_object_list|reduce|"
                         r"reduce_scatter|gather|gather_object|scatter|all_to_all|send|recv)\w*\(")
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "output", "output_demo")]
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and os.path.relpath(path, REPO) != os.path.join("util", "dist.py"):
                with open(path, encoding="utf-8") as f:
                    offenders += [f"{os.path.relpath(path, REPO)}:{i}" for i, line in enumerate(f, 1)
                                  if pattern.search(line)]
    assert not offenders, f"collectives outside util/dist.py bypass the device check: {offenders}"
