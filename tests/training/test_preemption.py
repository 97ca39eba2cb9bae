"""Preemption as schedulers do it (issue 22): a stop signal to every rank's whole process group, DataLoader
workers included; the run saves mid-epoch and resumes exactly, also on another world size."""
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from conftest import assert_state_equal, read_log, run_script, run_torchrun
from util.run import EXIT_STOPPED
from util.stop import StopSignals

BASE = ["--num_workers", "2", "--input_size", "16", "--batch_size", "8", "--train_subset", "126",
        "--warmup_epochs", "1", "--blr", "1e-3", "--print_freq", "1", "--save_every", "1", "--epochs", "4"]
D3P = ["--prune_method", "d3p", "--d3p_start", "2", "--d3p_period", "2", "--d3p_window", "2", "--d3p_bins", "16"]
PRETRAIN = [*BASE, *D3P]
# fine-tuning from scratch on the digits (1500 training images): 6 steps per rank and epoch on 2 ranks. 4 epochs,
# as in pre-training: epochs 2-3 (0-based) are the window of the decision at the end of epoch 3, so epoch 2 trains
# the kept samples of epoch 1's decision and records the pruned ones in a forward-only pass. (With 3 epochs that
# decision would fall after the run: D3PSchedule.is_recording is then false for epoch 2 and it has no such pass.)
FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "128", "--num_workers", "2",
            "--mixup", "0", "--cutmix", "0", "--aa", "none", "--blr", "2e-3", "--warmup_epochs", "1", "--epochs", "4",
            "--print_freq", "2", "--keep_last", "0", *D3P]


def _load(run_dir, name):
    return torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)


def assert_bit_identical(a_dir, b_dir, name):
    """Weights, optimizer state and the whole pruning state (the method's loss window, decisions and weights;
    the trained counts; the ledger without its timings) of two checkpoints, exactly (NaN equal to NaN)."""
    a, b = _load(a_dir, name), _load(b_dir, name)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    assert_state_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert_state_equal(a["pruning"], b["pruning"], "pruning")
    assert a["pruning"]["ledger"]["epochs"], "an empty ledger compares equal"


def assert_same_log(ref_dir, out_dir):
    """Two runs' log.txt, line by line: every field equal except wall times (a key with "seconds" in it): counts and
    checksums exactly, floats to a relative 1e-6 (the epoch's statistics are running sums carried through a stop in
    step order, so they come out equal in practice)."""
    ref_log, log = read_log(ref_dir), read_log(out_dir)
    assert [r["epoch"] for r in log] == [r["epoch"] for r in ref_log]
    for ref_line, line in zip(ref_log, log):
        keys = {k for k in ref_line if "seconds" not in k}
        assert keys == {k for k in line if "seconds" not in k}, (ref_line["epoch"], keys ^ set(line))
        for key in sorted(keys):
            a, b = ref_line[key], line[key]
            if isinstance(a, float) and not isinstance(a, bool):
                assert b == pytest.approx(a, rel=1e-6, nan_ok=True), (ref_line["epoch"], key, a, b)
            else:
                assert a == b, (ref_line["epoch"], key, a, b)


def agreed_stop(text: str, epoch: int, earliest: int) -> int:
    """The step both ranks stopped after (the same on both: they agreed), at `earliest` (the boundary after the
    one at which the flag is up when the signal comes at once) or later."""
    steps = re.findall(rf"stopped by signal in epoch {epoch} after step (\d+); checkpoint saved", text)
    assert len(steps) == 2 and steps[0] == steps[1], (steps, text[-3000:])
    assert int(steps[0]) >= earliest, steps
    return int(steps[0])


# ----------------------------------------------------------------------------------------------- unit
def test_stop_signal_sets_a_flag_and_hands_over_to_the_previous_handler():
    """The handler only sets the flag; a handler installed before (submitit's requeue on SIGUSR2) is called
    once the run has saved (hand_over), not at signal time."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopSignals([signal.SIGUSR2])
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop() and stop.signum == signal.SIGUSR2 and calls == []
        stop.hand_over()
        assert calls == [signal.SIGUSR2]
        stop.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


LOADER_SCRIPT = """
import os, signal, sys, argparse, time
import torch
from torch.utils.data import TensorDataset
from d3p.sampler import PrunedDistributedSampler
from util.loader import make_loader
from util.stop import StopSignals
from util.datasets import IndexedDataset
args = argparse.Namespace(seed=0, num_workers=2, pin_mem=False, device="cpu")
data = IndexedDataset(TensorDataset(torch.arange(64).float().view(64, 1), torch.zeros(64, dtype=torch.long)))
stop = StopSignals()
loader = make_loader(data, PrunedDistributedSampler(64, shuffle=False), args, batch_size=4, stream=0)
seen = []
if AT_START:
    # the race made wide: from its fork a worker has torch's SIGTERM handler (fatal for a signal from another
    # process) until worker_init_fn runs; here it has the default action (as fatal) and waits 0.5 s there
    os.register_at_fork(after_in_child=lambda: (signal.signal(signal.SIGNAL, signal.SIG_DFL), time.sleep(0.5)))
batches = iter(loader)  # starts the 2 workers (fork, Linux's default)
if AT_START:  # they are still starting
    os.killpg(os.getpgid(0), signal.SIGNAL)
for step, (x, _, index) in enumerate(batches):
    if step == 1 and not AT_START:
        os.killpg(os.getpgid(0), signal.SIGNAL)  # the whole group: this process and its 2 workers
    seen += index.tolist()
del batches  # (the loader's own reference is dropped at exit, which stops its persistent workers)
print("flag", stop(), "seen", sorted(seen) == list(range(64)))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
def test_loader_workers_outlive_a_stop_signal_to_the_process_group(name):
    """Without the workers ignoring it, torch's worker handler dies on a SIGTERM from a process other than
    its parent, and the loop raises "DataLoader worker (pid N) is killed by signal: Terminated"; SLURM's
    USR1/USR2 warning would kill a worker by its default action."""
    res = run_script(["-c", LOADER_SCRIPT.replace("SIGNAL", name).replace("AT_START", "False")], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "flag True seen True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "killed by signal" not in res.stderr


def test_loader_workers_outlive_a_stop_signal_that_comes_while_they_start():
    """A loader that starts its workers mid-run (the forward-only or embedding pass, evaluation) while the
    scheduler's SIGTERM reaches the process group: the workers are born with the stop signals blocked
    (util.stop.stop_signals_blocked), so the signal waits until they ignore it. Without that, both workers die
    at once here ("DataLoader worker (pid(s) ...) exited unexpectedly"), and a rank of a 2-rank run failed the
    same way when the agent's signal came as it started its forward-only loader."""
    res = run_script(["-c", LOADER_SCRIPT.replace("SIGNAL", "SIGTERM").replace("AT_START", "True")], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "flag True seen True" in res.stdout, res.stdout + res.stderr[-2000:]
    assert "killed by signal" not in res.stderr and "exited unexpectedly" not in res.stderr


# ------------------------------------------------------------------------------------ pre-training
@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("pre_ref"))
    res = run_torchrun(2, ["main_pretrain_d3p.py", *PRETRAIN, "--output_dir", ref])
    assert res.returncode == 0, res.stderr[-3000:]
    return ref


@pytest.fixture(scope="module")
def pretrain_stopped(tmp_path_factory):
    """2 ranks with 2 workers each, SIGTERM to both ranks' process groups (through torchrun's agent) in
    epoch 2 (a recording epoch after the first decision: pruned samples, a forward-only pass)."""
    out = str(tmp_path_factory.mktemp("pre_stopped"))
    res = run_torchrun(2, ["tests/fault_runner.py", *PRETRAIN, "--output_dir", out],
                       env_extra={"FAULT": "sigterm_agent:2:0:0"})
    text = res.stdout + res.stderr
    # (torchrun's agent itself ends with a traceback of the SignalException it raises on SIGTERM)
    assert "DataLoader worker" not in text and "main_pretrain_d3p.py\", line" not in text, text[-3000:]
    # the flag is up by step 1's boundary; the ranks agree at the next one (StopAgreement): after step 1, or later
    # when a loaded machine delivers the agent's signal late
    step = agreed_stop(text, epoch=2, earliest=2)
    assert os.path.exists(os.path.join(out, f"checkpoint-2-step{step}.pth")), os.listdir(out)
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    return out


def test_pretrain_sigterm_to_every_process_group_saves_and_resumes_bit_identical(tmp_path, pretrain_ref,
                                                                                 pretrain_stopped):
    out = str(tmp_path / "run")
    shutil.copytree(pretrain_stopped, out)
    res = run_torchrun(2, ["main_pretrain_d3p.py", *PRETRAIN, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"resuming epoch 2 after step \d+ ", res.stdout) and "split anew" not in res.stdout
    for epoch in (2, 3):
        assert_bit_identical(pretrain_ref, out, f"checkpoint-{epoch}.pth")
    ref_log = read_log(pretrain_ref)
    assert ref_log[2]["pruned"] > 0 and ref_log[2]["samples_forward_only"] > 0  # the stop hit such an epoch
    assert_same_log(pretrain_ref, out)  # grad_norm too: every statistic of the interrupted part is carried


def test_pretrain_sigterm_in_the_forward_only_pass_on_two_ranks_resumes_with_the_same_log(tmp_path, pretrain_ref):
    """The process-group SIGTERM during epoch 2's forward-only pass (after training): the state from before the
    pass is saved; the resume replays the pass. Weights, pruning state and every logged number match the
    uninterrupted run, the ledger's counts included (the padded positions of the trained lists count)."""
    out = str(tmp_path / "run")
    res = run_torchrun(2, ["tests/fault_runner.py", *PRETRAIN, "--output_dir", out],
                       env_extra={"FAULT": "sigterm_forward_agent:2:0:0"})
    text = res.stdout + res.stderr
    assert text.count("stopped by signal in epoch 2 after training, during its forward-only/embedding pass") == 2, \
        text[-3000:]
    res = run_torchrun(2, ["main_pretrain_d3p.py", *PRETRAIN, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    for epoch in (2, 3):
        assert_bit_identical(pretrain_ref, out, f"checkpoint-{epoch}.pth")
    assert_same_log(pretrain_ref, out)


def test_pretrain_resumed_on_one_rank_trains_each_kept_sample_once(tmp_path, pretrain_stopped):
    """Preempted on 2 ranks, requeued on 1: the epoch continues with the samples the 2 ranks had not
    trained, split anew; every kept sample gets its loss in this recording epoch, none is pruned unseen."""
    out = str(tmp_path / "run")
    shutil.copytree(pretrain_stopped, out)
    res = run_script(["main_pretrain_d3p.py", *PRETRAIN, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"resuming epoch 2 after step \d+ \(\d+ of", res.stdout), res.stdout[-3000:]
    assert "written by 2 rank(s), this run has 1" in res.stdout
    log = read_log(out)
    assert log[2]["samples_trained"] == log[2]["kept"]  # 32 by 2 ranks, the rest by 1: each kept one once
    assert log[3]["d3p_unscored"] == 0  # the decision after the recording epochs 2-3: every sample scored


def test_pretrain_resumed_on_two_ranks_after_one(tmp_path):
    """The reverse: 1 process stopped after 2 steps of epoch 2 (32 samples), 2 ranks continue it, with another
    --batch_size too (the resume counts samples, not steps)."""
    out = str(tmp_path / "run")
    one = [*PRETRAIN, "--num_workers", "0", "--batch_size", "16", "--output_dir", out]
    res = run_script(["tests/fault_runner.py", *one], env_extra={"FAULT": "sigterm:2:1"})
    assert res.returncode == EXIT_STOPPED, res.stderr[-2000:]
    res = run_torchrun(2, ["main_pretrain_d3p.py", *one, "--batch_size", "8", "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming epoch 2 after step 2 (32 of" in res.stdout and "this run has 2" in res.stdout, res.stdout[-2000:]
    log = read_log(out)
    rest = log[2]["kept"] - 32
    assert log[2]["samples_trained"] == 32 + rest + rest % 2  # the 2 ranks' rest, padded to equal shares
    assert log[3]["d3p_unscored"] == 0


# ------------------------------------------------------------------------------------- fine-tuning
def test_finetune_sigterm_to_every_process_group_saves_and_resumes_bit_identical(tmp_path):
    """Fine-tuning with D3P on 2 ranks with 2 workers each: SIGTERM to both process groups in epoch 2 (a
    recording epoch with pruned samples); the mid-epoch checkpoint resumes to the uninterrupted run's
    weights, optimizer, pruning state and ledger."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    res = run_torchrun(2, ["main_finetune.py", *FINETUNE, "--output_dir", ref])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_torchrun(2, ["tests/fault_runner.py", *FINETUNE, "--output_dir", out],
                       env_extra={"FAULT": "sigterm_agent:2:1:0", "FAULT_SCRIPT": "finetune"})
    text = res.stdout + res.stderr
    assert "DataLoader worker" not in text and "main_finetune.py\", line" not in text, text[-3000:]
    # rank 0 signals as it fetches batch 1, after its own boundary 0. Rank 1 may still be before its boundary 0
    # (on a loaded machine it lags by a few ms after the gradient all-reduce) and raise its flag there: the ranks
    # then agree at boundary 1 (after step 2); else at boundary 2 (after step 3), or later when the signal is late.
    # Never before step 2: no boundary before the signal has a flag up.
    step = agreed_stop(text, epoch=2, earliest=2)
    assert os.path.exists(os.path.join(out, f"checkpoint-2-step{step}.pth")), os.listdir(out)
    res = run_torchrun(2, ["main_finetune.py", *FINETUNE, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming epoch 2 after step {step}" in res.stdout
    assert not os.path.exists(os.path.join(out, f"checkpoint-2-step{step}.pth")), "superseded partial checkpoint kept"
    for epoch in (2, 3):
        assert_bit_identical(ref, out, f"checkpoint-{epoch}.pth")
    ref_log, log = read_log(ref), read_log(out)
    # the stop hit such an epoch: a recording epoch with pruned samples, recorded in its forward-only pass
    assert ref_log[2]["pruned"] > 0 and ref_log[2]["samples_forward_only"] >= ref_log[2]["pruned"]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert_same_log(ref, out)


# 2 ranks with 2 workers each, batches of 32: D3P decides after every epoch (window 1), so epoch 1 trains the kept
# samples and records the pruned ones in a forward-only pass of several batches (a stop is polled every batch)
FINETUNE_ONE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "32", "--num_workers", "2",
                "--mixup", "0", "--cutmix", "0", "--aa", "none", "--blr", "2e-3", "--warmup_epochs", "1",
                "--epochs", "2", "--print_freq", "1", "--keep_last", "0", "--prune_method", "d3p", "--d3p_start",
                "1", "--d3p_period", "1", "--d3p_window", "1", "--d3p_bins", "16"]


@pytest.fixture(scope="module")
def finetune_one_ref(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("ft_ref"))
    res = run_torchrun(2, ["main_finetune.py", *FINETUNE_ONE, "--output_dir", ref])
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(ref)
    assert log[1]["pruned"] > 0 and log[1]["samples_forward_only"] > 4 * 32  # a pass of 3 or more batches a rank
    return ref


@pytest.mark.parametrize("fault, line", [
    ("sigterm_forward_agent:1:0:0", "stopped by signal in epoch 1 after training, during its forward-only/embedding pass"),
    ("sigterm_eval_agent:0:1:0", "stopped by signal in the evaluation of epoch 0"),
])
def test_finetune_sigterm_in_forward_only_pass_or_evaluation_resumes_exactly(tmp_path, finetune_one_ref, fault,
                                                                              line):
    """Fine-tuning on 2 ranks with 2 workers, the process-group SIGTERM in its D3P forward-only pass (the state
    from before the pass is saved; the resume replays the pass) or in an evaluation (the epoch is saved with its
    log line pending; the resume evaluates first): the resumed run ends as the uninterrupted one, weights,
    optimizer, pruning state and every logged number; epoch_seconds leaves out the time the job was down."""
    out = str(tmp_path / "run")
    res = run_torchrun(2, ["tests/fault_runner.py", *FINETUNE_ONE, "--output_dir", out],
                       env_extra={"FAULT": fault, "FAULT_SCRIPT": "finetune"})
    text = res.stdout + res.stderr
    assert text.count(f"{line}; checkpoint saved, resume with --auto_resume") == 2, text[-3000:]
    if fault.startswith("sigterm_eval"):
        assert "evaluation stopped by a signal" in res.stdout and not os.path.exists(os.path.join(out, "log.txt"))
    time.sleep(5.0)  # the job is down (plus the restart): the resumed epoch's time must not count this
    res = run_torchrun(2, ["main_finetune.py", *FINETUNE_ONE, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert_bit_identical(finetune_one_ref, out, "checkpoint-1.pth")
    assert_same_log(finetune_one_ref, out)
    ref_log, log = read_log(finetune_one_ref), read_log(out)
    stopped_epoch = 0 if "eval" in fault else 1
    assert log[stopped_epoch]["epoch_seconds"] < ref_log[stopped_epoch]["epoch_seconds"] + 4.0


def test_pretrain_sigterm_in_d2_embedding_pass_saves_and_resume_is_exact(tmp_path):
    """SIGTERM during D2's embedding pass (the end of its warm-up epoch 0): the ranks stop at the pass's next
    sync point, save the state from before the pass and exit 143; the resume replays the pass and selects the
    same coreset as the uninterrupted run, with the same weights."""
    common = [*BASE, "--batch_size", "16", "--prune_method", "d2", "--static_warmup_epochs", "1", "--prune_ratio",
              "0.5", "--epochs", "2"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    res = run_torchrun(2, ["main_pretrain_d3p.py", *common, "--output_dir", ref])
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_torchrun(2, ["tests/fault_runner.py", *common, "--output_dir", out],
                       env_extra={"FAULT": "sigterm_embed_agent:0:1:0"})
    text = res.stdout + res.stderr
    assert text.count("stopped by signal in epoch 0 after training, during its forward-only/embedding pass") == 2, \
        text[-3000:]
    assert not os.path.exists(os.path.join(out, "kept_static.npy"))
    res = run_torchrun(2, ["main_pretrain_d3p.py", *common, "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_log(ref, out)
    assert np.array_equal(np.load(os.path.join(ref, "kept_static.npy")), np.load(os.path.join(out, "kept_static.npy")))
    a, b = _load(ref, "checkpoint-1.pth"), _load(out, "checkpoint-1.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
