"""Exporting a run's data on fake checkpoints (plain data written with torch.save, no training): tools/export_run.py
for this fork's run folders, d3p-export (d3p.export) for one checkpoint file."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from d3p import export

from conftest import REPO  # noqa: E402
sys.path.insert(0, os.path.join(REPO, "tools"))
import export_run  # noqa: E402

N = 50


def ledger(kept_per_epoch):
    return {"num_samples": N, "epochs": [
        {"epoch": e, "samples_trained": k, "samples_forward_only": 0, "optimizer_steps": 1, "epoch_seconds": 1.0,
         "data_seconds": 0.1, "kept": k, "pruned": N - k} for e, k in enumerate(kept_per_epoch)]}


def save_run(folder, method, strategy, kept_per_epoch, epoch=None, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    epoch = len(kept_per_epoch) - 1 if epoch is None else epoch
    pruning = {"method": method, "num_samples": N, "strategy": strategy, "ledger": ledger(kept_per_epoch),
               **(extra or {})}
    ckpt = {"model": {"w": torch.zeros(2)}, "epoch": epoch, "args": {}, "pruning": pruning}
    torch.save(ckpt, folder / f"checkpoint-{epoch}.pth")
    return folder


def d3p_state(pruned, decisions):
    return {"name": "d3p", "num_samples": N, "window": torch.zeros(2, N), "pruned": torch.from_numpy(pruned),
            "weights": torch.ones(N), "decisions": decisions, "seed": 0, "schedule": [2, 3, 2], "bins": 32,
            "quantile": 0.999}


def run_cli(argv):
    return export_run.main([str(a) for a in argv])


@pytest.mark.filterwarnings("ignore:skipping unreadable checkpoint")
def test_d3p_kept_set_from_newest_complete_checkpoint(tmp_path, capsys):
    pruned = np.zeros(N, dtype=bool)
    pruned[[0, 3, 7, 20, 49]] = True
    run = save_run(tmp_path / "d3p" / "pretrain", "d3p", d3p_state(pruned, 1), [N, N, 45, 45])
    old = np.zeros(N, dtype=bool)
    old[:10] = True
    save_run(run, "d3p", d3p_state(old, 1), [N, N, 40], epoch=2)  # older checkpoint: not used
    (run / "checkpoint-9.pth").write_bytes(b"torn")  # newest, but unreadable: skipped
    out = tmp_path / "kept.npy"
    assert run_cli([run, "--out", out]) == 0
    kept = np.load(out)
    assert kept.dtype == np.int64 and np.array_equal(kept, np.flatnonzero(~pruned))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kept"] == 45 and report["epoch"] == 3
    # the arm folder (RUN_DIR/pretrain) and the checkpoint file are accepted too
    assert run_cli([tmp_path / "d3p", "--out", out]) == 0 and np.array_equal(np.load(out), kept)
    assert run_cli([run / "checkpoint-3.pth", "--out", out]) == 0 and np.array_equal(np.load(out), kept)


def test_counts_recorded_by_engine(tmp_path):
    counts = np.arange(N, dtype=np.int32) % 5
    run = save_run(tmp_path / "ib", "infobatch", {"name": "infobatch", "num_samples": N}, [N] * 4,
                   extra={"trained_counts": torch.from_numpy(counts)})
    out = tmp_path / "c.npy"
    assert run_cli([run, "--out", out, "--counts"]) == 0
    got = np.load(out)
    assert got.dtype == np.int64 and np.array_equal(got, counts)


def test_counts_reconstructed_exactly(tmp_path):
    out = tmp_path / "c.npy"
    # D3P, one decision after epoch 1: epochs 0-1 all data, epochs 2-3 ~pruned
    pruned = np.zeros(N, dtype=bool)
    pruned[[1, 2, 3]] = True
    run = save_run(tmp_path / "d3p", "d3p", d3p_state(pruned, 1), [N, N, N - 3, N - 3])
    assert run_cli([run, "--out", out, "--counts"]) == 0
    expect = np.full(N, 4)
    expect[[1, 2, 3]] = 2
    assert np.array_equal(np.load(out), expect)
    # static: 2 warm-up epochs on all data, then the subset for 3 epochs
    subset = np.arange(0, N, 2, dtype=np.int64)
    run = save_run(tmp_path / "dynunc", "dynunc", {"name": "dynunc", "num_samples": N, "warmup_epochs": 2,
                                                   "subset": torch.from_numpy(subset)}, [N, N, 25, 25, 25])
    assert run_cli([run, "--out", out, "--counts"]) == 0
    expect = np.full(N, 2)
    expect[subset] += 3
    assert np.array_equal(np.load(out), expect)
    # static without --counts: the subset
    assert run_cli([run, "--out", out]) == 0 and np.array_equal(np.load(out), subset)
    # random (matched counts): the per-epoch subsets are replayed from (seed, epoch)
    from d3p.methods.random import RandomDynamic

    matched = [N, 40, 30]
    rnd = RandomDynamic(N, 0.5, seed=3, kept_counts=matched)
    expect = np.zeros(N, dtype=np.int64)
    for e in range(3):
        expect[rnd.plan_epoch(e).kept] += 1
    run = save_run(tmp_path / "random", "random", rnd.state_dict(), matched)
    assert run_cli([run, "--out", out, "--counts"]) == 0 and np.array_equal(np.load(out), expect)
    # none: every epoch
    run = save_run(tmp_path / "none", "none", {"name": "none", "num_samples": N}, [N] * 3)
    assert run_cli([run, "--out", out, "--counts"]) == 0 and np.array_equal(np.load(out), np.full(N, 3))


def test_bad_input_exits_2(tmp_path, capsys):
    out = tmp_path / "k.npy"
    for argv, needle in [
        ([tmp_path / "missing", "--out", out], "no such folder"),
        ([tmp_path, "--out", out], "no checkpoint"),
    ]:
        with pytest.raises(SystemExit) as exc:
            run_cli(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Fix:" in err
    # no persistent kept set -> use --counts
    run = save_run(tmp_path / "seta", "seta", {"name": "seta", "num_samples": N}, [25, 25])
    with pytest.raises(SystemExit) as exc:
        run_cli([run, "--out", out])
    assert exc.value.code == 2 and "--counts" in capsys.readouterr().err
    # counts of a D3P run with several decisions need the engine's trained_counts
    pruned = np.zeros(N, dtype=bool)
    pruned[:5] = True
    run = save_run(tmp_path / "d3p2", "d3p", d3p_state(pruned, 2), [N, N, 40, 40, 45])
    with pytest.raises(SystemExit) as exc:
        run_cli([run, "--out", out, "--counts"])
    assert exc.value.code == 2 and "trained_counts" in capsys.readouterr().err
    assert not out.exists()


def test_d3p_export_reads_one_checkpoint_file_and_refuses_a_folder(tmp_path, capsys):
    """The pip package's CLI knows no run folder: a checkpoint file (or a bare pruner state) in, the same arrays out."""
    pruned = np.zeros(N, dtype=bool)
    pruned[[4, 5]] = True
    run = save_run(tmp_path / "run", "d3p", d3p_state(pruned, 1), [N, N, N - 2])
    out = tmp_path / "kept.npy"
    assert export.main([str(run / "checkpoint-2.pth"), "--out", str(out)]) == 0
    assert np.array_equal(np.load(out), np.flatnonzero(~pruned))
    bare = tmp_path / "pruner.pth"  # what a loop of one's own saves: pruner.state_dict() alone
    torch.save(torch.load(run / "checkpoint-2.pth", weights_only=True)["pruning"], bare)
    assert export.main([str(bare), "--out", str(out)]) == 0 and np.array_equal(np.load(out), np.flatnonzero(~pruned))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        export.main([str(run), "--out", str(out)])
    assert exc.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_static_subset_of_an_old_checkpoint_comes_from_the_run_folder(tmp_path):
    """Checkpoints of early versions lack a static method's subset; the run folder's kept_static.npy holds it."""
    subset = np.arange(3, N, 4, dtype=np.int64)
    run = save_run(tmp_path / "d2", "d2", {"name": "d2", "num_samples": N, "warmup_epochs": 1}, [N, subset.size])
    np.save(run / "kept_static.npy", subset)
    out = tmp_path / "kept.npy"
    assert run_cli([run, "--out", out]) == 0 and np.array_equal(np.load(out), subset)
