"""SLURM through submitit, as MAE's submitit_pretrain.py / submitit_finetune.py launch: one task per GPU, the
entry script's own flags passed through, requeued with --auto_resume on preemption or timeout.

submitit is imported only by `submit` and inside the job (`Trainer`), so `--help` and the tests run without it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Any, Sequence

from d3p.registry import import_prune_plugins
from util import run_folder
from util.dist import task_gpu

SUBMITIT_MISSING = (
    "error: {script} needs submitit, which is not installed. Fix: pip install submitit (or launch without it: "
    "train_d3p.sh on each node, or srun with MASTER_ADDR set; see README 'On a cluster')"
)


def launcher_parser() -> argparse.ArgumentParser:
    """MAE's submitit flags (no -h: the combined parser inherits the entry script's)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("SLURM (submitit)")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs (= tasks) per node")
    g.add_argument("--nodes", default=2, type=int, help="nodes to request")
    g.add_argument("--timeout", default=4320, type=int, help="job duration in minutes (requeued when it runs out)")
    g.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    g.add_argument("--job_dir", default="", help="shared folder for submitit's logs and, unless --output_dir is "
                                                 "given, the run's outputs; %%j = job id (default: ./output_submitit/%%j)")
    g.add_argument("--use_volta32", action="store_true", help="request V100-32GB nodes (constraint volta32gb)")
    g.add_argument("--comment", default="", help="SLURM comment, e.g. for priority requests")
    g.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per GPU (DataLoader workers + 1)")
    g.add_argument("--mem_per_gpu_gb", default=40, type=int, help="host memory per GPU in GB")
    return p


def split_argv(entry_parser: argparse.ArgumentParser, description: str,
               argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, the entry script's argv). The entry script's flags are parsed here as well, so a typo
    fails at submission instead of in the queue, and --help lists both sets."""
    full = argparse.ArgumentParser(description=description, parents=[entry_parser, launcher_parser()], add_help=False)
    full.parse_args(list(argv))
    return launcher_parser().parse_known_args(list(argv))


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def requeue_argv(argv: Sequence[str], output_has_checkpoint: bool) -> list[str]:
    """The entry script's argv for the requeued job: continue from the newest checkpoint of --output_dir
    (--auto_resume, replacing a --resume the first attempt started from). Before any checkpoint exists the
    job restarts as submitted."""
    argv = list(argv)
    if not output_has_checkpoint and _has_flag(argv, "--resume"):
        return argv
    argv = _without_flag(argv, "--resume")
    return argv if "--auto_resume" in argv else [*argv, "--auto_resume"]


def master_port(job_id: str) -> int:
    """A port derived from the job id: the same on every task, different for jobs sharing a node."""
    digits = re.sub(r"\D", "", job_id)
    return 20000 + int(digits or 0) % 20000


def distributed_env(job_env: Any, visible_gpus: int, environ: dict | None = None) -> dict[str, str]:
    """torchrun's variables for this task, from submitit's JobEnvironment (hostnames, job_id, global_rank,
    local_rank, num_tasks). A MASTER_PORT already exported is kept."""
    environ = os.environ if environ is None else environ
    return {
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(master_port(str(job_env.job_id))),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(task_gpu(job_env.local_rank, visible_gpus)),
    }


class Trainer:
    """What submitit runs on every task: set torchrun's variables, then the entry script's `cli(argv)`.

    `checkpoint()` is submitit's hook on preemption/timeout (called on global rank 0): it returns the same
    job with --auto_resume, which submitit requeues.
    """

    def __init__(self, entry_module: str, argv: Sequence[str]):
        self.entry_module = entry_module
        self.argv = list(argv)

    def _argv_of(self, job_id: str) -> list[str]:
        return [a.replace("%j", job_id) for a in self.argv]

    def _output_dir(self, job_id: str) -> str:
        module = importlib.import_module(self.entry_module)
        import_prune_plugins(self._argv_of(job_id))
        return module.get_args_parser().parse_args(self._argv_of(job_id)).output_dir

    def __call__(self) -> None:
        import submitit
        import torch

        job_env = submitit.JobEnvironment()
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        os.environ.update(distributed_env(job_env, visible))
        print(f"submitit task {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostnames[0]}: "
              f"{self.entry_module} {' '.join(self._argv_of(str(job_env.job_id)))}", flush=True)
        code = importlib.import_module(self.entry_module).cli(self._argv_of(str(job_env.job_id)))
        if code:
            raise SystemExit(code)

    def checkpoint(self) -> Any:
        import submitit

        job_id = str(submitit.JobEnvironment().job_id)
        has_ckpt = run_folder.has_checkpoint(self._output_dir(job_id))
        requeued = Trainer(self.entry_module, requeue_argv(self.argv, has_ckpt))
        print(f"requeueing with: {' '.join(requeued.argv)}", flush=True)
        return submitit.helpers.DelayedSubmission(requeued)


def submit(entry_module: str, entry_parser: argparse.ArgumentParser, description: str,
           argv: Sequence[str] | None, job_name: str) -> int:
    """Parse, then submit one job of `nodes x ngpus` tasks running `entry_module.cli`; prints the job id."""
    launch, entry_argv = split_argv(entry_parser, description, sys.argv[1:] if argv is None else argv)
    script = os.path.basename(sys.argv[0]) if argv is None else f"submitit for {entry_module}"
    try:
        import submitit
    except ImportError:
        print(SUBMITIT_MISSING.format(script=script), file=sys.stderr)
        return 2
    job_dir = os.path.abspath(launch.job_dir or os.path.join("output_submitit", "%j"))
    if not _has_flag(entry_argv, "--output_dir"):  # MAE: the outputs go to the job folder
        entry_argv = [*entry_argv, "--output_dir", job_dir]
    executor = submitit.AutoExecutor(folder=job_dir, slurm_max_num_timeout=30)
    extra = {}
    if launch.partition:
        extra["slurm_partition"] = launch.partition
    if launch.use_volta32:
        extra["slurm_constraint"] = "volta32gb"
    if launch.comment:
        extra["slurm_comment"] = launch.comment
    executor.update_parameters(
        name=job_name, nodes=launch.nodes, gpus_per_node=launch.ngpus, tasks_per_node=launch.ngpus,
        cpus_per_task=launch.cpus_per_task, mem_gb=launch.mem_per_gpu_gb * launch.ngpus,
        timeout_min=launch.timeout, slurm_signal_delay_s=120, **extra,
    )
    job = executor.submit(Trainer(entry_module, entry_argv))
    print(f"submitted job {job.job_id}: {launch.nodes} node(s) x {launch.ngpus} GPUs, logs in "
          f"{job_dir.replace('%j', str(job.job_id))}")
    return 0
