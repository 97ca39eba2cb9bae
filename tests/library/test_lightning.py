"""d3p.PruningCallback in Lightning's fit loop (examples/lightning_classifier.py): exact resume through
Lightning's checkpoint, 2 DDP ranks pruning the same samples, Lightning's sampler replacement refused."""
import json

import numpy as np
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
