"""The choices the cluster paths make, tested without a GPU or a cluster (issue 9):
precision (native bf16 only), SLURM device index, process-group kwargs and teardown, strict collectives,
MAE checkpoints with an argparse.Namespace, train_d3p.sh's batch arithmetic, the submitit launchers."""
import argparse
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import main_finetune
import main_pretrain_d3p
from conftest import REPO, free_port
from d3p import collectives
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
                 "MASTER_PORT": str(free_port()), collectives.STRICT_COLLECTIVES_ENV: "1"}.items():
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
    monkeypatch.setenv(collectives.STRICT_COLLECTIVES_ENV, "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_strict_mode_refuses_a_tensor_nccl_would_refuse(gloo_group):
    # the embeddings pass before commit c383b67: `dim = torch.tensor([...])` (CPU) all-reduced under NCCL
    dim = torch.tensor([192], dtype=torch.int64)
    with pytest.raises(collectives.CollectiveDeviceError, match="to_collective"):
        collectives.all_reduce(dim, op="max")
    # ... and its `.to(dev)` with dev computed by hand, then `.cpu()` before the reduction
    placed = collectives.to_collective(torch.from_numpy(np.ones(3, dtype=np.float32)))
    with pytest.raises(collectives.CollectiveDeviceError):
        collectives.all_reduce(placed.cpu())
    with pytest.raises(collectives.CollectiveDeviceError):
        collectives.all_gather(torch.zeros(2).to("cpu"))
    # placed with to_collective: accepted, and the tag survives device-preserving ops
    assert collectives.all_reduce(placed * 2).tolist() == [2.0, 2.0, 2.0]
    assert collectives.all_reduce(placed.to(torch.float64), op="max").dtype == torch.float64
    (only,) = collectives.all_gather(collectives.to_collective(torch.tensor([7, 8])))
    assert only.tolist() == [7, 8]
    assert dist_util.all_reduce_sum(2.5) == 2.5 and dist_util.any_rank(True) is True
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]


def test_without_strict_mode_cpu_tensors_pass_on_gloo(gloo_group, monkeypatch):
    monkeypatch.setenv(collectives.STRICT_COLLECTIVES_ENV, "0")
    assert collectives.all_reduce(torch.tensor([3])).tolist() == [3]  # what a CPU run can see without it


def test_every_collective_goes_through_the_wrappers():
    """Strict mode only checks what passes through the wrappers (d3p/collectives.py, and util/dist.py's helpers
    built on them): no direct torch.distributed collective anywhere else in the project's code."""
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_object|broadcast|broadcast_object_list|reduce|"
                         r"reduce_scatter|gather|gather_object|scatter|all_to_all|send|recv)\w*\(")
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "output", "output_demo")]
        for name in files:
            path = os.path.join(root, name)
            wrappers = (os.path.join("util", "dist.py"), os.path.join("d3p", "collectives.py"))
            if name.endswith(".py") and os.path.relpath(path, REPO) not in wrappers:
                with open(path, encoding="utf-8") as f:
                    offenders += [f"{os.path.relpath(path, REPO)}:{i}" for i, line in enumerate(f, 1)
                                  if pattern.search(line)]
    assert not offenders, f"collectives outside the wrappers bypass the device check: {offenders}"


# ------------------------------------------------------------------------------- item 15: submitit
class _FakeJobEnvironment:
    """submitit.JobEnvironment's fields that the launcher reads."""

    def __init__(self, job_id="4242", global_rank=0, local_rank=0, num_tasks=1, hostnames=("127.0.0.1",)):
        self.job_id, self.global_rank, self.local_rank, self.num_tasks = job_id, global_rank, local_rank, num_tasks
        self.hostnames = list(hostnames)


def test_submitit_scripts_parse_without_submitit_and_name_the_fix(monkeypatch, capsys):
    import submitit_finetune
    import submitit_pretrain

    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed (import raises ImportError)
    with pytest.raises(SystemExit) as e:
        submitit_pretrain.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert all(f in out for f in ("--ngpus", "--nodes", "--timeout", "--partition", "--job_dir", "--use_volta32",
                                  "--comment", "--prune_method", "--auto_resume"))
    with pytest.raises(SystemExit) as e:  # a typo in the entry script's flags fails at submission
        submitit_finetune.main(["--nodes", "1", "--blrr", "1e-3"])
    assert e.value.code == 2 and "--blrr" in capsys.readouterr().err
    assert submitit_finetune.main(["--nodes", "1", "--data_path", "/data/imagenet"]) == 2
    assert "pip install submitit" in capsys.readouterr().err


def test_submitit_task_environment_and_requeue_args():
    from util.submitit_job import distributed_env, master_port, requeue_argv

    job = _FakeJobEnvironment(job_id="913_4", global_rank=13, local_rank=5, num_tasks=16, hostnames=("gpu07", "gpu08"))
    env = distributed_env(job, visible_gpus=8, environ={})
    assert env == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("913_4")), "RANK": "13",
                   "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert distributed_env(job, visible_gpus=1, environ={})["LOCAL_RANK"] == "0"  # one GPU bound per task
    assert distributed_env(job, visible_gpus=8, environ={"MASTER_PORT": "31000"})["MASTER_PORT"] == "31000"
    assert 20000 <= master_port("913_4") < 40000 and master_port("913_4") != master_port("914_4")

    argv = ["--epochs", "800", "--resume", "/old/checkpoint-9.pth", "--output_dir", "/o/%j"]
    assert requeue_argv(argv, output_has_checkpoint=True) == ["--epochs", "800", "--output_dir", "/o/%j",
                                                              "--auto_resume"]
    assert requeue_argv(argv, output_has_checkpoint=False) == argv  # nothing of its own yet: restart as submitted
    assert requeue_argv(["--epochs", "800"], False) == ["--epochs", "800", "--auto_resume"]
    assert requeue_argv(["--auto_resume"], True) == ["--auto_resume"]


def test_submitit_trainer_runs_the_entry_script_and_requeues_with_auto_resume(tmp_path, monkeypatch, capsys):
    import types

    from util.submitit_job import Trainer

    job = _FakeJobEnvironment(job_id="777")
    fake = types.ModuleType("submitit")
    fake.JobEnvironment = lambda: job
    fake.helpers = types.SimpleNamespace(DelayedSubmission=lambda fn: ("requeue", fn))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    # the variables the task sets, first set here so that monkeypatch restores them afterwards
    for k, v in {"MASTER_ADDR": "x", "MASTER_PORT": str(free_port()), "RANK": "x", "WORLD_SIZE": "x",
                 "LOCAL_RANK": "x", collectives.STRICT_COLLECTIVES_ENV: "1"}.items():
        monkeypatch.setenv(k, v)
    trainer = Trainer("main_pretrain_d3p", [*BASE, "--prune_method", "none", "--epochs", "1",
                                            "--output_dir", str(tmp_path / "job_%j")])
    trainer()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["LOCAL_RANK"] == "0"
    assert os.path.isfile(tmp_path / "job_777" / "checkpoint-0.pth")  # %j is the job id
    assert not dist.is_initialized()
    kind, requeued = trainer.checkpoint()  # preemption: submitit requeues what checkpoint() returns
    assert kind == "requeue" and requeued.entry_module == "main_pretrain_d3p"
    assert requeued.argv == [*trainer.argv, "--auto_resume"]
    capsys.readouterr()
    requeued()
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-0.pth" in out, out[-3000:]
