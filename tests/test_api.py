"""The public API (d3p.DataPruner) driven by the 30-line loop of tests/api_loop.py: every method, exact resume
from a plain-data state, 2 gloo ranks deciding identically; and the API's own rules."""
import io

import numpy as np
import pytest
import torch

import d3p
from api_loop import D3P_OPTIONS, N, train
from conftest import TIMES as _TIMES, assert_state_equal as _equal, run_torchrun

METHODS = {
    "none": {}, "d3p": D3P_OPTIONS, "infobatch": {}, "seta": {}, "random": {},
    "dynunc": dict(static_warmup_epochs=2, dynunc_window=2), "d2": dict(static_warmup_epochs=2, d2_neighbors=5),
}
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_through_the_api_and_resumes_exactly(method):
    straight, logs = train(method, 6, **METHODS[method])
    kept = [r["kept"] for r in logs]
    assert (kept == [N] * 6) if method == "none" else min(kept) < N, kept
    assert [r["samples_trained"] for r in logs] == kept  # one process: the sampler yields the kept set
    assert straight["pruning"]["ledger"]["epochs"][-1]["kept"] == kept[-1]
    # stop after 3 epochs, save as plain data, load with weights_only=True, continue in a new loop
    buf = io.BytesIO()
    torch.save(train(method, 6, stop_after=3, **METHODS[method])[0], buf)
    buf.seek(0)
    resumed, later = train(method, 6, resume=torch.load(buf, weights_only=True), **METHODS[method])
    _equal(straight, resumed)
    _equal([{k: v for k, v in r.items() if k not in _TIMES} for r in logs[3:]],
           [{k: v for k, v in r.items() if k not in _TIMES} for r in later])


def test_d3p_weights_and_recording_follow_the_plan():
    pruner = d3p.DataPruner(8, "d3p", epochs=4, **D3P_OPTIONS)
    plan = pruner.begin_epoch(0)
    assert plan.record_losses and pruner.recorder is not None and pruner.forward_only_indices.size == 0
    losses = torch.arange(1.0, 5.0)
    # no weights yet: the plain mean; a negative index (replaced unreadable sample) weighs 0 and is not recorded
    assert torch.equal(pruner.batch_loss(losses, torch.tensor([0, 1, 2, 3])), losses.mean())
    assert pruner.batch_loss(losses, torch.tensor([4, 5, -7, 6])).item() == pytest.approx((1 + 2 + 4) / 3)
    loss_sum, count = pruner.recorder.totals()
    assert count.tolist() == [1, 1, 1, 1, 1, 1, 1, 0] and loss_sum[6] == 4.0

    class Weighted:  # any object with the PruningStrategy protocol plugs in
        name, num_samples = "weighted", 8

        def __init__(self, normalize):
            self.normalize = normalize

        def plan_epoch(self, epoch):
            return d3p.EpochPlan(kept=np.arange(8), weights=np.array([1, 2, 1, 1, 3, 1, 1, 1], dtype=np.float32),
                                 normalize_weights=self.normalize)

    # D3P's rule sum(w l) / sum(w), InfoBatch's mean(w l), from the plan's weights
    idx = torch.tensor([0, 1, 4, 5])
    for normalize, expected in ((True, (1 + 4 + 9 + 4) / 7), (False, (1 + 4 + 9 + 4) / 4)):
        pruner = d3p.DataPruner(8, Weighted(normalize))
        pruner.begin_epoch(0)
        assert pruner.batch_loss(losses, idx).item() == pytest.approx(expected)


def test_epoch_weights_reach_the_device_once_per_epoch():
    """Issue 9 item 14: the [N] weights are copied to the loss's device at the epoch's first batch and then
    indexed there (no per-step copy from pageable memory). The meta device stands in for a GPU on CPU."""
    class Weighted:
        name, num_samples = "weighted", 8

        def plan_epoch(self, epoch):
            return d3p.EpochPlan(kept=np.arange(8), weights=np.full(8, 2.0, dtype=np.float32))

    pruner = d3p.DataPruner(8, Weighted())
    pruner.begin_epoch(0)
    first = pruner.batch_weights(torch.tensor([0, 1]), "meta")
    resident = pruner._weights
    assert first.device.type == "meta" and resident.device.type == "meta" and resident.shape == (8,)
    pruner.batch_weights(torch.tensor([2, -3]), "meta")
    assert pruner._weights is resident  # the same device tensor: no second copy this epoch
    pruner.begin_epoch(1)  # a new epoch's plan starts from the host copy again
    assert pruner._weights.device.type == "cpu"


def test_bad_use_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="--d3p_window"):
        d3p.DataPruner(100, "d3p", epochs=10, d3p_start=1, d3p_window=3)
    with pytest.raises(ValueError, match="needs the number of epochs"):
        d3p.DataPruner(100, "infobatch")
    with pytest.raises(TypeError, match="unknown pruning option"):
        d3p.DataPruner(100, "random", prune_raito=0.3)
    with pytest.raises(ValueError, match="nope is not supported"):
        d3p.DataPruner(100, "nope", epochs=3)
    with pytest.raises(RuntimeError, match="begin_epoch"):
        d3p.DataPruner(100, "none").batch_loss(torch.ones(2), torch.tensor([0, 1]))
    pruner = d3p.DataPruner(100, "random", epochs=3)
    with pytest.raises(ValueError, match="--prune_method random"):
        d3p.DataPruner(100, "none").load_state_dict(pruner.state_dict())


def test_two_gloo_ranks_decide_identically(tmp_path):
    res = run_torchrun(2, ["tests/api_loop.py", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    for key in ("pruned", "weights", "kept", "fingerprints", "trained"):
        assert np.array_equal(r0[key], r1[key]), key
    assert r0["pruned"].any() and r0["kept"][-1] < N
    # the ranks' sampler shares together cover the kept set (padding to an even count)
    assert np.array_equal(r0["trained"], r0["kept"] + r0["kept"] % 2)
