"""Shared test helpers. (A test module that imports torchvision or timm itself calls
util.torchvision_compat.ensure_torchvision_importable() first, as every module of the repository does.)"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import torch

from d3p.collectives import STRICT_COLLECTIVES_ENV

# One thread per process: in-process runs then match the subprocess runs (OMP_NUM_THREADS=1) bit
# for bit, and 2-process torchrun tests do not oversubscribe a 2-core machine.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(args: list[str], timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a python entry script of the repo in a subprocess (CPU, one thread per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    env.update(env_extra or {})
    # own process group: on a timeout the launcher AND its workers are killed, none lingers
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(args[:3])} timed out after {timeout} s (hang?)\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_torchrun(nproc: int, args: list[str], timeout: int = 300, extra: list[str] | None = None,
                 env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone`-style launch on loopback with a free port (gloo on CPU).

    Strict collectives (util/dist.py): every collective refuses a tensor that NCCL would refuse, so these
    CPU runs catch "a CPU tensor passed to an NCCL collective" too.
    """
    cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *(extra or []), *args]
    return run_script(cmd, timeout=timeout, env_extra={STRICT_COLLECTIVES_ENV: "1", **(env_extra or {})})


def read_log(run_dir: str) -> list[dict]:
    """The JSON lines of RUN_DIR/log.txt."""
    with open(os.path.join(run_dir, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_ckpt(run_dir: str, epoch: int) -> dict:
    return torch.load(os.path.join(run_dir, f"checkpoint-{epoch}.pth"), map_location="cpu", weights_only=True)


TIMES = ("epoch_seconds", "wall_seconds", "data_seconds", "total_data_seconds", "seconds_per_trained_sample",
         "run_seconds_per_trained_sample", "d3p_seconds", "d2_seconds", "dynunc_seconds")


def assert_state_equal(a, b, path="state"):
    """Exact equality of nested plain data (NaN == NaN)."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in TIMES:
                assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, path
