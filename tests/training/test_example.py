"""examples/train_classifier.py (the short form) and train_classifier_explicit.py (every hook) on the digits."""
import json
import os

import torch

from conftest import run_script

FLAGS = ["--subset", "256", "--prune_method", "d3p", "--d3p_start", "1", "--d3p_period", "1", "--d3p_window", "1",
         "--d3p_bins", "16"]
TIMES = ("epoch_seconds", "wall_seconds", "seconds_per_trained_sample", "run_seconds_per_trained_sample",
         "d3p_seconds", "data_seconds", "total_data_seconds")


def _lines(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def test_example_prunes_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    first = _lines(run_script(["examples/train_classifier.py", *FLAGS, "--epochs", "2", "--output_dir", out]))
    assert [r["epoch"] for r in first[:-1]] == [0, 1]
    assert first[0]["kept"] == 256 and "d3p_support" in first[0]  # decision after epoch 1 (1-based)
    assert first[1]["kept"] == 256 - first[1]["pruned"] < 256 and first[1]["samples_forward_only"] > 0
    for r in first[:-1]:  # top-1 over the 297 validation digits: a whole number of them
        assert abs(r["top1"] * 297 / 100 - round(r["top1"] * 297 / 100)) < 1e-9
    # the loop really trains: AdamW stepped once per batch (4 + 3 batches of 64), and the resumed epoch moves
    # the weights again
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
    steps = first[0]["optimizer_steps"] + first[1]["optimizer_steps"]
    assert steps == 4 + -(-first[1]["kept"] // 64)
    assert {int(st["step"]) for st in ckpt["optimizer"]["state"].values()} == {steps}
    # a longer run in the same folder resumes from its checkpoint: epoch 2 only, with the ledger carried on
    proc = run_script(["examples/train_classifier.py", *FLAGS, "--epochs", "3", "--output_dir", out])
    again = _lines(proc)
    assert [r["epoch"] for r in again[:-1]] == [2]
    summary = again[-1]["summary"]
    assert summary["method"] == "d3p" and summary["epochs"] == 3
    assert summary["samples_trained"] == 256 + first[1]["kept"] + again[0]["kept"]
    later = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert {int(st["step"]) for st in later["optimizer"]["state"].values()} == {steps + again[0]["optimizer_steps"]}
    assert any(not torch.equal(ckpt["model"][k], later["model"][k]) for k in ckpt["model"])
    assert f"prune ratio {summary['prune_ratio']:.3f}, compute saved {summary['compute_saved']:.3f}" in proc.stdout
    # the explicit loop (IndexedDataset, begin/end_epoch, the forward-only loader) is the same run as the short
    # form (pruner.epoch, pruner.loss): the same epochs, decisions, ledger and accuracy
    explicit = _lines(run_script(["examples/train_classifier_explicit.py", *FLAGS, "--epochs", "2", "--output_dir",
                                  str(tmp_path / "explicit")]))
    assert _untimed(explicit[:-1]) == _untimed(first[:-1])
