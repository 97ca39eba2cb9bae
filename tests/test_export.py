"""d3p.export on fake checkpoints (plain data written with torch.save, no training)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d3p import export

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
    return export.main([str(a) for a in argv])


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
