"""d3p.PruningCallback in Lightning's fit loop (examples/lightning_classifier.py): exact resume through
Lightning's checkpoint, 2 DDP ranks pruning the same samples, Lightning's sampler replacement refused."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_state_equal, run_torchrun

FLAGS = ["--subset", "128", "--batch_size", "16", "--prune_method", "d3p", "--d3p_start", "1", "--d3p_period", "1",
         "--d3p_window", "1", "--d3p_bins", "16"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lightning_resume_is_bit_identical(tmp_path):
    from examples.lightning_classifier import main

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main([*FLAGS, "--epochs", "4", "--output_dir", straight])
    main([*FLAGS, "--epochs", "4", "--stop_after", "2", "--output_dir", split])
    ckpt = _load(f"{split}/last.ckpt")
    assert ckpt["callbacks"]["d3p.PruningCallback"]["pruner"]["ledger"]["epochs"][-1]["epoch"] == 1
    main([*FLAGS, "--epochs", "4", "--resume", "--output_dir", split])
    a, b = _load(f"{straight}/weights.pt"), _load(f"{split}/weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = _load(f"{straight}/pruning-rank0.pt"), _load(f"{split}/pruning-rank0.pt")
    assert_state_equal(pa, pb)
    assert pa["strategy"]["pruned"].any()  # decisions were made and pruned something
    assert [e["epoch"] for e in pb["ledger"]["epochs"]] == [0, 1, 2, 3]


def test_lightning_two_ddp_ranks_prune_the_same_samples(tmp_path):
    res = run_torchrun(2, ["tests/lightning_worker.py", str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):  # Lightning's DistributedSamplerWrapper in place of the pruner's sampler: refused
        refused = json.loads((tmp_path / f"refused-rank{rank}.json").read_text())
        assert "use_distributed_sampler=False" in refused and "DistributedSamplerWrapper" in refused, refused
    r0, r1 = _load(tmp_path / "pruning-rank0.pt"), _load(tmp_path / "pruning-rank1.pt")
    assert_state_equal(r0["strategy"], r1["strategy"])
    assert_state_equal(r0["ledger"]["epochs"][-1]["kept"], r1["ledger"]["epochs"][-1]["kept"])
    pruned = r0["strategy"]["pruned"].numpy()
    assert pruned.any() and not pruned.all()
    # the two ranks' shares together cover the kept set once (padded to an even count), not twice
    for e in r0["ledger"]["epochs"]:
        assert e["samples_trained"] == e["kept"] + e["kept"] % 2, e
    assert np.array_equal(r0["trained_counts"].numpy(), r1["trained_counts"].numpy())


def _check_validation_follows_the_pruned_epoch(result, devices):
    epochs = list(range(5))
    assert result["validated"] == epochs, result  # before issue 29: epoch 0 only, once pruning began
    assert min(result["kept"]) < result["kept"][0] == 160  # pruning shortened the epochs
    # the fit loop's (and the progress bar's) batch count is the pruned epoch's, on each rank
    assert result["batches"] == [-(-k // 16) for k in result["local_kept"]], result
    assert result["last_batch_idx"] == [b - 1 for b in result["batches"]]
    # a val_loss-monitored checkpoint each epoch, each with that epoch's fresh val_loss
    assert result["checkpoints"] == [f"epoch={e}.ckpt" for e in epochs]
    assert len(set(result["scores"])) == 5, result["scores"]
    # EarlyStopping saw every epoch's val_loss: its best is the best checkpoint's, its wait counts from there
    assert result["early_stopping_best"] == min(result["scores"])
    assert result["early_stopping_wait"] == 4 - result["scores"].index(min(result["scores"]))
    assert result["sync_dist_warnings"] == []
    assert result["metrics"] == sorted(f"d3p/{k}" for k in ("kept", "epoch_prune_ratio", "run_prune_ratio",
                                                            "compute_saved"))
    # each metric is the last epoch's log entry of its name (the epoch's and the run's ratio differ here)
    last = result["last_log"]
    assert last["epoch_prune_ratio"] != last["run_prune_ratio"]
    assert result["logged"] == {f"d3p/{k}": pytest.approx(v, abs=1e-6) for k, v in last.items()}


def test_lightning_validation_checkpoints_and_early_stopping_follow_the_pruned_epoch(tmp_path):
    """Issue 29 item 3, one rank: validation, ModelCheckpoint(monitor="val_loss"), EarlyStopping and the batch
    count run on every pruned epoch."""
    from lightning_validation_worker import run

    _check_validation_follows_the_pruned_epoch(run(str(tmp_path), 1), 1)


def test_lightning_validation_follows_the_pruned_epoch_on_two_ddp_ranks(tmp_path):
    """The same under DDP (2 gloo ranks), with no sync_dist warning from the d3p/* metrics."""
    res = run_torchrun(2, ["tests/lightning_validation_worker.py", str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = [json.loads((tmp_path / f"validation-rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        _check_validation_follows_the_pruned_epoch(result, 2)
    assert results[0]["kept"] == results[1]["kept"]
