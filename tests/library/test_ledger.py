"""d3p.ledger.CostLedger: what the loader really does (samples_loaded, loader_saved) beside compute_saved."""
from __future__ import annotations

import json
import os

import pytest

import main_pretrain_d3p
from conftest import read_log
from d3p.ledger import CostLedger


def test_loader_fields_add_up():
    n = 100
    ledger = CostLedger(n)
    # (trained, forward-only incl. embedding passes, seconds): full epoch, D3P-like recording epoch, pruned epoch
    epochs = [(100, 0, 10.0), (70, 30, 8.0), (64, 0, 5.0)]
    for e, (trained, fwd, sec) in enumerate(epochs):
        rec = ledger.record_epoch(e, trained, fwd, optimizer_steps=2, epoch_seconds=sec, data_seconds=1.0,
                                  kept=trained)
        assert rec["samples_loaded"] == trained + fwd
        assert rec["seconds_per_trained_sample"] == sec / trained
    s = ledger.summary()
    assert s["samples_loaded"] == 264 == s["samples_trained"] + s["samples_forward_only"]
    assert s["loader_saved"] == pytest.approx(1 - 264 / 300)
    assert s["compute_saved"] == pytest.approx(1 - (234 + 30 / 3) / 300)
    assert s["loader_saved"] < s["compute_saved"]  # a forward-only sample is a full decode but a third of compute
    assert s["seconds_per_trained_sample"] == pytest.approx(23.0 / 234)
    # a replayed epoch replaces its record, and the totals follow
    ledger.record_epoch(2, 50, 0, optimizer_steps=1, epoch_seconds=4.0, data_seconds=1.0, kept=50)
    assert ledger.summary()["samples_loaded"] == 250
    # state round trip, including records of checkpoints written before these fields existed
    old = ledger.state_dict()
    for e in old["epochs"]:
        del e["samples_loaded"], e["seconds_per_trained_sample"]
    restored = CostLedger(1)
    restored.load_state_dict(old)
    assert restored.summary() == ledger.summary()


def test_engine_logs_loader_fields_with_embedding_pass(tmp_path):
    """D2 embeds all samples at the end of its warm-up: the loader decoded them, compute counts them 1/3."""
    out = str(tmp_path / "d2")
    args = ["--num_workers", "0", "--input_size", "16", "--batch_size", "32", "--train_subset", "96",
            "--warmup_epochs", "1", "--blr", "1e-3", "--prune_method", "d2", "--static_warmup_epochs", "1",
            "--epochs", "2", "--output_dir", out]
    assert main_pretrain_d3p.cli(args) == 0
    log = read_log(out)
    assert [r["samples_loaded"] for r in log] == [96 + 96, 48]  # epoch 0: trained + embedding pass
    assert [r["total_samples_loaded"] for r in log] == [192, 240]
    for r in log:
        assert r["samples_loaded"] == r["samples_trained"] + r["samples_forward_only"]
        assert r["seconds_per_trained_sample"] == pytest.approx(r["epoch_seconds"] / r["samples_trained"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["samples_loaded"] == 240
    assert summary["loader_saved"] == pytest.approx(1 - 240 / (2 * 96)) == pytest.approx(-0.25)
    assert summary["compute_saved"] == pytest.approx(1 - (144 + 96 / 3) / 192)
    assert summary["seconds_per_trained_sample"] == pytest.approx(summary["wall_seconds"] / 144)
