"""Faults a week-long run must survive: signals, killed workers, bad input, NaN, mismatched resumes."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain_d3p
from conftest import load_ckpt, read_log, run_script, run_torchrun

BASE = ["--num_workers", "0", "--input_size", "16", "--batch_size", "32", "--train_subset", "128", "--warmup_epochs", "1",
        "--blr", "1e-3", "--print_freq", "1", "--save_every", "1"]
D3P = ["--prune_method", "d3p", "--d3p_start", "2", "--d3p_period", "2", "--d3p_window", "2", "--d3p_bins", "16"]


def assert_same_run(a_dir, b_dir, epoch):
    a, b = load_ckpt(a_dir, epoch), load_ckpt(b_dir, epoch)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    sa, sb = a["pruning"]["strategy"], b["pruning"]["strategy"]
    for key in ("pruned", "weights"):
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(a["pruning"]["trained_counts"], b["pruning"]["trained_counts"])
    la, lb = read_log(a_dir), read_log(b_dir)
    fields = ("epoch", "kept", "samples_trained", "samples_forward_only", "optimizer_steps", "epoch_prune_ratio",
              "run_prune_ratio")
    assert [[r[f] for f in fields] for r in la] == [[r[f] for f in fields] for r in lb]
    assert [r["train_loss"] for r in la] == pytest.approx([r["train_loss"] for r in lb], rel=1e-6)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    # a subprocess like the runs it is compared with: same thread count, so bit-identical arithmetic
    res = run_script(["main_pretrain_d3p.py", *BASE, *D3P, "--epochs", "4", "--output_dir", out])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_sigterm_saves_mid_epoch_and_resume_is_exact(tmp_path, straight_run):
    out = str(tmp_path / "run")
    args = ["tests/fault_runner.py", *BASE, *D3P, "--epochs", "4", "--output_dir", out]
    res = run_script(args, env_extra={"FAULT": "sigterm:2:1"})  # spec epoch 3, a recording epoch after pruning
    assert res.returncode == 143, res.stderr[-2000:]
    assert "stopped by signal in epoch 2 after step 2" in res.stdout + res.stderr
    assert os.path.exists(os.path.join(out, "checkpoint-2-step2.pth"))
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    res = run_script(["main_pretrain_d3p.py", *BASE, *D3P, "--epochs", "4", "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "checkpoint-2-step2.pth")), "superseded partial checkpoint kept"
    assert_same_run(straight_run, out, 3)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    res = run_script(["tests/fault_runner.py", *BASE, "--prune_method", "none", "--epochs", "3",
                      "--output_dir", out], env_extra={"FAULT": "nan:1:2"})
    assert res.returncode == 1
    assert "at epoch 1, step 2" in res.stderr and "last checkpoint" in res.stderr
    assert sorted(os.listdir(out)).count("checkpoint-0.pth") == 1
    assert not os.path.exists(os.path.join(out, "checkpoint-1.pth"))
    assert torch.isfinite(load_ckpt(out, 0)["model"]["blocks.0.attn.qkv.weight"]).all()
    assert [r["epoch"] for r in read_log(out)] == [0]


def test_torn_checkpoint_is_ignored_by_auto_resume(tmp_path, straight_run):
    out = str(tmp_path / "run")
    os.makedirs(out)
    shutil.copy(os.path.join(straight_run, "checkpoint-1.pth"), out)
    with open(os.path.join(straight_run, "checkpoint-2.pth"), "rb") as f:
        torn = f.read()
    with open(os.path.join(out, "checkpoint-2.pth"), "wb") as f:
        f.write(torn[: len(torn) // 2])  # a node died mid-write (without the atomic rename)
    from util.checkpoint import find_latest_checkpoint

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        path, state = find_latest_checkpoint(out)
    assert path.endswith("checkpoint-1.pth") and state["epoch"] == 1


@pytest.mark.parametrize("change,message", [
    (["--model", "mae_vit_base_patch16", "--input_size", "32"], "different model"),
    (["--train_subset", "96"], "samples"),
    (["--prune_method", "none"], "--prune_method d3p"),
])
def test_resume_from_another_run_is_refused(tmp_path, straight_run, change, message, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    shutil.copy(os.path.join(straight_run, "checkpoint-1.pth"), out)
    args = [*BASE, *D3P, "--epochs", "4", "--output_dir", out, "--auto_resume", *change]
    assert main_pretrain_d3p.cli(args) == 2  # bad input (util.run.EXIT_USAGE), as in every entry script
    assert message in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "checkpoint-1.pth"))


def _image_folder(root, classes=2, per_class=4, empty_class=False, corrupt=False):
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d)
            if empty_class and c == 1:
                continue
            for i in range(per_class):
                arr = (np.random.default_rng(c * 100 + i).random((32, 32, 3)) * 255).astype(np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"img{i}.png"))
    if corrupt:
        bad = os.path.join(root, "train", "class0", "img1.png")
        with open(bad, "r+b") as f:
            f.truncate(40)  # a truncated PNG
        return bad
    return None


FOLDER = ["--data_set", "folder", "--input_size", "32", "--model", "mae_vit_tiny_patch4", "--num_workers", "0",
          "--batch_size", "4", "--epochs", "1", "--prune_method", "none", "--warmup_epochs", "0"]


def test_bad_data_paths_name_the_problem(tmp_path, capsys):
    assert main_pretrain_d3p.cli(["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main_pretrain_d3p.cli([*FOLDER, "--data_path", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    assert "train/ and val/" in capsys.readouterr().err
    root = str(tmp_path / "data")
    _image_folder(root, empty_class=True)
    assert main_pretrain_d3p.cli([*FOLDER, "--data_path", root, "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "class1 has no images" in err and "Fix" in err


def test_corrupt_image_stops_or_is_skipped_and_counted(tmp_path, capsys):
    root = str(tmp_path / "data")
    bad = _image_folder(root, corrupt=True)
    assert main_pretrain_d3p.cli([*FOLDER, "--data_path", root, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert bad in err and "--skip_corrupt" in err
    out = str(tmp_path / "o2")
    assert main_pretrain_d3p.cli([*FOLDER, "--data_path", root, "--output_dir", out, "--skip_corrupt"]) == 0
    (rec,) = read_log(out)
    assert rec["corrupt_replaced"] == 1


@pytest.mark.parametrize("flags,message", [
    (["--d3p_start", "2", "--d3p_window", "3"], "must be <= --d3p_start"),
    (["--d3p_period", "2", "--d3p_window", "3", "--d3p_start", "5"], "must be <= --d3p_period"),
    (["--d3p_bins", "1"], "--d3p_bins must be >= 2"),
    (["--d3p_quantile", "1.0"], "--d3p_quantile must lie in (0, 1)"),
    (["--prune_ratio", "1.0"], "--prune_ratio"),
    (["--random_match", "x"], "--random_match needs --prune_method random"),
    (["--input_size", "30"], "--input_size 30 must be a positive multiple of mae_vit_tiny_patch4's patch size 4. "
                             "Fix: --input_size 32"),
    (["--input_size", "8", "--model", "mae_vit_base_patch16"], "patch size 16. Fix: --input_size 16"),
])
def test_incompatible_flags_are_rejected(flags, message, capsys, tmp_path):
    # refused as fine-tuning refuses (util.flags.raise_problems -> ConfigError): exit code 2, no traceback
    assert main_pretrain_d3p.cli([*flags, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# two ranks with DataLoader workers: the cluster default --num_workers 10 in miniature
TWO_RANKS = [*BASE, *D3P, "--train_subset", "126", "--epochs", "4", "--auto_resume", "--num_workers", "2"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("ref2"))
    res = run_torchrun(2, ["main_pretrain_d3p.py", *TWO_RANKS, "--output_dir", ref])
    assert res.returncode == 0, res.stderr[-3000:]
    return ref


def test_killed_worker_restarts_elastically_and_matches_uninterrupted(tmp_path, two_rank_run):
    """SIGKILL of rank 1 mid-epoch under torchrun --max-restarts=1, with 2 loader workers per rank:
    the job restarts itself once and resumes from its last checkpoint; decisions, ledger and weights
    equal an uninterrupted run (the workers' augmentation is seeded per item, so persistent workers
    started after the restart draw what the uninterrupted run's drew).
    (Before util.dist scoped the store's keys per attempt, the restarted ranks could read the dead
    attempt's addresses and hang in gloo's connectFullMesh.)"""
    ref, out = two_rank_run, str(tmp_path / "killed")
    common = TWO_RANKS
    os.environ["FAULT"] = "sigkill:2:1:1"
    try:
        res = run_torchrun(2, ["tests/fault_runner.py", *common, "--output_dir", out], extra=["--max-restarts=1"])
    finally:
        del os.environ["FAULT"]
    assert res.returncode == 0, res.stderr[-3000:]
    # the first attempt started in an empty folder: only a restart after the kill can have resumed
    assert "resumed from" in res.stdout and "checkpoint-1.pth" in res.stdout, res.stdout[-3000:]
    assert_same_run(ref, out, 3)


def test_nan_on_one_rank_stops_every_rank_together(tmp_path):
    """Only rank 1 sees a NaN loss (epoch 1, step 1): both ranks agree in the sync-point all-reduce
    and stop with the same message, instead of rank 0 waiting in its next collective."""
    out = str(tmp_path / "run")
    res = run_torchrun(2, ["tests/fault_runner.py", *BASE, "--prune_method", "none", "--epochs", "3",
                           "--output_dir", out, "--dist_timeout_min", "2"], timeout=150,
                       env_extra={"FAULT": "nan:1:1:1"})
    assert res.returncode != 0
    for rank in (0, 1):
        assert (f"error (rank {rank}): non-finite training loss (nan) at epoch 1, step 1 (of steps 0-1; seen on "
                "rank 1; all ranks stopped)") in res.stderr, res.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "checkpoint-0.pth"))
    assert not os.path.exists(os.path.join(out, "checkpoint-1.pth"))
    assert torch.isfinite(load_ckpt(out, 0)["model"]["blocks.0.attn.qkv.weight"]).all()


def test_a_failed_save_on_rank_0_stops_every_rank_with_its_error(tmp_path):
    """Rank 0's disk is full when it writes checkpoint-1.pth: both ranks stop at once with rank 0's error (exit 1),
    instead of rank 1 waiting in its next collective until the timeout; checkpoint-0.pth stays, no torn file."""
    out = str(tmp_path / "run")
    res = run_torchrun(2, ["tests/fault_runner.py", *BASE, "--prune_method", "none", "--epochs", "3",
                           "--output_dir", out, "--dist_timeout_min", "5"], timeout=150,
                       env_extra={"FAULT": "disk_full:1:0:0"})
    assert res.returncode != 0
    for rank in (0, 1):
        assert (f"error (rank {rank}): rank 0 could not write {os.path.join(out, 'checkpoint-1.pth')} (OSError: "
                "[Errno 28] No space left on device)") in res.stderr, res.stderr[-3000:]
    assert "Fix: free space in" in res.stderr and "util/checkpoint.py\", line" not in res.stderr  # no traceback of ours
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["checkpoint-0.pth"]


def test_auto_resume_follows_rank0_when_another_rank_sees_an_older_listing(tmp_path, two_rank_run):
    """Rank 1's storage lags (it lists no checkpoint-2.pth yet): rank 0 chooses for everyone, both
    ranks resume from checkpoint-2.pth and finish exactly as the uninterrupted run."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "log.txt"):
        shutil.copy(os.path.join(two_rank_run, name), out)
    res = run_torchrun(2, ["tests/fault_runner.py", *TWO_RANKS, "--output_dir", out, "--dist_timeout_min", "2"],
                       timeout=150, env_extra={"FAULT": "stale_listing:2:0:1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "checkpoint-2.pth (epoch 2), continuing at epoch 3" in res.stdout, res.stdout[-3000:]
    assert_same_run(two_rank_run, out, 3)


def test_sigterm_in_forward_only_pass_saves_and_resume_is_exact(tmp_path, straight_run):
    """SIGTERM during epoch 2's forward-only pass (D3P's pruned samples, a recording epoch): the
    ranks stop at the pass's next sync point, save the state from before the pass and exit 143;
    the resume replays the pass and ends bit-identical to the uninterrupted run."""
    out = str(tmp_path / "run")
    res = run_script(["tests/fault_runner.py", *BASE, *D3P, "--epochs", "4", "--output_dir", out],
                     env_extra={"FAULT": "sigterm_forward:2:0"})
    assert res.returncode == 143, res.stderr[-2000:]
    assert "stopped by signal in epoch 2 after training, during its forward-only" in res.stdout + res.stderr
    partial = [f for f in os.listdir(out) if f.startswith("checkpoint-2-step")]
    assert len(partial) == 1, os.listdir(out)
    res = run_script(["main_pretrain_d3p.py", *BASE, *D3P, "--epochs", "4", "--output_dir", out, "--auto_resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_run(straight_run, out, 3)
