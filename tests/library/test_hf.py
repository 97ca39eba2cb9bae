"""d3p.PruningTrainer in the Hugging Face Trainer (examples/hf_trainer_*.py): a mid-epoch resume through the
Trainer's checkpoint bit-identical to an uninterrupted run (causal LM), 2 ranks pruning the same samples
(classifier), a re-split training loader refused."""
import json
import os

import torch

from conftest import assert_state_equal, run_torchrun

FLAGS = ["--subset", "96", "--batch_size", "16", "--prune_method", "d3p", "--d3p_start", "1", "--d3p_period", "1",
         "--d3p_window", "1", "--d3p_bins", "16"]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_hf_causal_lm_resumes_mid_epoch_bit_identically(tmp_path):
    from examples.hf_trainer_causal_lm import main

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    main([*FLAGS, "--epochs", "3", "--output_dir", straight])
    # 6 steps in epoch 0 (96 samples), then a pruned recording epoch of 3 steps: step 8 is inside epoch 1
    main([*FLAGS, "--epochs", "3", "--stop_after_steps", "8", "--output_dir", split])
    saved = _load(f"{split}/checkpoint-8/d3p_pruning-rank0.pt")
    assert saved["epoch"] == 1 and saved["batches"] == 2 and saved["recorded"] is not None
    main([*FLAGS, "--epochs", "3", "--resume", "--output_dir", split])
    a, b = _load(f"{straight}/weights.pt"), _load(f"{split}/weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = _load(f"{straight}/pruning-rank0.pt"), _load(f"{split}/pruning-rank0.pt")
    assert_state_equal(pa, pb)
    assert pa["strategy"]["pruned"].any()
    assert [e["epoch"] for e in pb["ledger"]["epochs"]] == [0, 1, 2]


def test_hf_two_ranks_prune_the_same_samples(tmp_path):
    res = run_torchrun(2, ["tests/hf_worker.py", str(tmp_path)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):  # accelerate's BatchSamplerShard over the pruner's sampler: refused
        refused = json.loads((tmp_path / f"refused-rank{rank}.json").read_text())
        assert "BatchSamplerShard" in refused and "accelerator.prepare" in refused, refused
    r0, r1 = _load(tmp_path / "pruning-rank0.pt"), _load(tmp_path / "pruning-rank1.pt")
    assert_state_equal(r0["strategy"], r1["strategy"])
    pruned = r0["strategy"]["pruned"].numpy()
    assert pruned.any() and not pruned.all()
    for e in r0["ledger"]["epochs"]:  # the ranks' shares cover the kept set once (padded to even), not twice
        assert e["samples_trained"] == e["kept"] + e["kept"] % 2, e
    assert [e["kept"] for e in r0["ledger"]["epochs"]] == [e["kept"] for e in r1["ledger"]["epochs"]]


def test_a_failed_save_on_rank_0_stops_every_rank_with_its_error(tmp_path):
    """Issue 29 item 7: rank 0's save fails (disk full). Every rank raises rank 0's error at that save, at once,
    rather than rank 1 training on into a collective that never completes (or being killed without a word)."""
    res = run_torchrun(2, ["tests/hf_save_worker.py", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):
        error = json.loads((tmp_path / f"save-rank{rank}.json").read_text())
        assert error.startswith("CheckpointSaveError: rank 0 could not save checkpoint-2: OSError: [Errno 28] No "
                                "space left on device. Every rank stops here"), (rank, error)
    # rank 1's own pruning state of that checkpoint was written whole (atomically): no temporary file is left
    names = sorted(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert "d3p_pruning-rank1.pt" in names and not any(n.startswith(".tmp") for n in names), names
