"""train_d3p.sh's cluster arithmetic (issue 9, item 10), through its DRY_RUN=1 mode: no training runs.

A `torchrun`/`python` shim first on PATH fails loudly, so a script that ignored DRY_RUN could not start a job.
"""
import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO


def _train_script(tmp_path, **env_vars) -> subprocess.CompletedProcess:
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    for name in ("torchrun", "python"):
        (shim / name).write_text("#!/bin/sh\necho \"REAL RUN: $0 $*\" >&2\nexit 97\n")
        (shim / name).chmod(0o755)
    keep = {k: os.environ[k] for k in ("HOME", "LANG") if k in os.environ}
    env = {**keep, "PATH": f"{shim}:/usr/bin:/bin", "DRY_RUN": "1", **env_vars}
    return subprocess.run(["bash", os.path.join(REPO, "train_d3p.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


def _commands(stdout: str) -> dict[str, list[str]]:
    """entry script -> its argv, from the printed torchrun command lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("torchrun "):
            argv = shlex.split(line)
            script = next(a for a in argv if a.endswith(".py"))
            out[script] = argv
    return out


def _flag(argv: list[str], name: str) -> str:
    """The value of `name` in argv, as `name value` or `name=value`."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    raise AssertionError(f"{name} not in {argv}")


@pytest.mark.parametrize("nproc, nnodes, pre, ft", [
    # GPUs: (per-GPU batch, accum) for pre-training at 4096 and fine-tuning at 1024
    (8, 1, (128, 4), (128, 1)),   # the published run
    (1, 1, (128, 32), (128, 8)),
    (4, 1, (128, 8), (128, 2)),   # MAE accumulates below 8 GPUs for fine-tuning
    (8, 2, (128, 2), (64, 1)),
    (8, 8, (64, 1), (16, 1)),     # past 32 GPUs the per-GPU batch shrinks instead of the effective batch doubling
    (8, 16, (32, 1), (8, 1)),
])
def test_effective_batch_is_kept_for_any_gpu_count(tmp_path, nproc, nnodes, pre, ft):
    res = _train_script(tmp_path, DATA_PATH="/data/imagenet", NPROC=str(nproc), NNODES=str(nnodes),
                        NODE_RANK="0", MASTER_ADDR="node0")
    assert res.returncode == 0 and "REAL RUN" not in res.stderr, res.stderr
    gpus = nproc * nnodes
    cmds = _commands(res.stdout)
    for script, (batch, accum), effective in (("main_pretrain_d3p.py", pre, 4096), ("main_finetune.py", ft, 1024)):
        argv = cmds[script]
        assert (int(_flag(argv, "--batch_size")), int(_flag(argv, "--accum_iter"))) == (batch, accum)
        assert batch * accum * gpus == effective
        assert _flag(argv, "--nnodes") == str(nnodes) and _flag(argv, "--nproc_per_node") == str(nproc)
        assert _flag(argv, "--rdzv_endpoint") == "node0:29500"
    assert f"pre-training: {pre[0]} per GPU x accum {pre[1]} x {gpus} GPUs = effective batch 4096" in res.stdout
    assert f"fine-tuning: {ft[0]} per GPU x accum {ft[1]} x {gpus} GPUs = effective batch 1024" in res.stdout
    if pre[0] < 128 and pre[1] == 1:
        assert "per-GPU batch lowered from 128" in res.stdout


def test_gpu_count_not_dividing_4096_gets_the_nearest_and_says_so(tmp_path):
    res = _train_script(tmp_path, DATA_PATH="/d", NPROC="8", NNODES="3", MASTER_ADDR="node0")
    assert res.returncode == 0, res.stderr
    argv = _commands(res.stdout)["main_pretrain_d3p.py"]
    batch, accum = int(_flag(argv, "--batch_size")), int(_flag(argv, "--accum_iter"))
    assert (batch, accum) == (85, 2) and batch * accum * 24 == 4080
    assert re.search(r"effective batch 4080 \(nearest to 4096: 24 GPUs do not divide it", res.stdout)


def test_multi_node_without_master_addr_is_refused(tmp_path):
    res = _train_script(tmp_path, DATA_PATH="/d", NPROC="8", NNODES="2", NODE_RANK="1")
    assert res.returncode == 2 and "REAL RUN" not in res.stderr
    assert "NNODES=2 needs MASTER_ADDR" in res.stderr and "Fix:" in res.stderr
    assert "torchrun" not in res.stdout
    one_node = _train_script(tmp_path, DATA_PATH="/d", NPROC="8", NNODES="1")  # one node: loopback is right
    assert one_node.returncode == 0 and "127.0.0.1:29500" in one_node.stdout


def test_cpu_demo_commands(tmp_path):
    res = _train_script(tmp_path)
    assert res.returncode == 0 and "REAL RUN" not in res.stderr, res.stderr
    lines = [shlex.split(line) for line in res.stdout.splitlines() if line.startswith("python ")]
    assert [argv[1] for argv in lines] == ["main_pretrain_d3p.py", "main_finetune.py"]
    assert _flag(lines[1], "--finetune").endswith("pretrain/checkpoint-29.pth")


def test_torchrun_gives_the_ranks_time_to_save_and_forwards_slurm_warnings(tmp_path):
    """docs/preemption.md: the agent forwards SLURM's USR1/USR2 warning to the ranks (by default it would die of
    it) and waits SHUTDOWN_TIMEOUT (120 s) for their mid-epoch checkpoint before SIGKILL."""
    res = _train_script(tmp_path, DATA_PATH="/data/imagenet", NPROC="8")
    assert res.returncode == 0, res.stderr
    argv = _commands(res.stdout)["main_pretrain_d3p.py"]
    assert _flag(argv, "--shutdown_timeout") == "120"
    assert set(_flag(argv, "--signals_to_handle").split(",")) >= {"SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"}
