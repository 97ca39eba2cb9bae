"""The public API (d3p.DataPruner) driven by the 30-line loop of tests/api_loop.py: every method, exact resume
from a plain-data state, 2 gloo ranks deciding identically; and the API's own rules."""
import io
import json

import numpy as np
import pytest
import torch

import d3p
from api_loop import D3P_OPTIONS, N, train
from conftest import TIMES as _TIMES, assert_state_equal as _equal, run_script, run_torchrun

METHODS = {
    "none": {}, "d3p": D3P_OPTIONS, "infobatch": {}, "seta": {}, "random": {}, "rs2": {},
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
    with pytest.raises(ValueError, match=r"^d3p_window \(n=3\) must be <= d3p_start \(s=1\)"):  # keywords, no flags
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
    with pytest.raises(ValueError, match="resume with method='random', or start a new run"):
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


# ----------------------------------------------------------------------- the short form and the mistakes it catches
def _digits_like():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def _short_loop(epochs=5):
    """The five-line form: loss_fn, pruner.epoch, pruner.loss."""
    torch.manual_seed(0)
    data = _digits_like()
    model, loss_fn = torch.nn.Linear(8, 3), torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = d3p.DataPruner(N, "d3p", epochs=epochs, seed=3, min_kept=16, loss_fn=loss_fn, **D3P_OPTIONS)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    for epoch in range(epochs):
        for x, y in pruner.epoch(loader, epoch, model):
            loss = pruner.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, pruner


def _explicit_loop(epochs=5):
    """Every hook written out, with the same loss for both passes."""
    torch.manual_seed(0)
    data = d3p.IndexedDataset(_digits_like())
    model, loss_fn = torch.nn.Linear(8, 3), torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = d3p.DataPruner(N, "d3p", epochs=epochs, seed=3, min_kept=16, **D3P_OPTIONS)
    # pruner.epoch's loaders batch like this: balanced batches (every kept sample once, no runt)
    loader = torch.utils.data.DataLoader(data, batch_sampler=d3p.BalancedBatchSampler(pruner.sampler, 16))
    forward_loader = torch.utils.data.DataLoader(data, batch_sampler=d3p.BalancedBatchSampler(
        pruner.forward_sampler, 16))
    for epoch in range(epochs):
        pruner.begin_epoch(epoch)
        for x, y, index in loader:
            loss = pruner.batch_loss(loss_fn(model(x), y), index)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if pruner.forward_only_indices.size:
            with torch.no_grad():
                for x, y, index in forward_loader:
                    pruner.record(index, loss_fn(model(x), y))
        pruner.end_epoch(epoch)
    return model, pruner


def test_short_form_is_the_explicit_loop():
    """pruner.epoch + pruner.loss do exactly the explicit hooks: the same weights and pruning state, bit for bit."""
    short_model, short = _short_loop()
    explicit_model, explicit = _explicit_loop()
    assert all(torch.equal(a, b) for a, b in zip(short_model.state_dict().values(),
                                                   explicit_model.state_dict().values()))
    _equal(short.state_dict(), explicit.state_dict())
    assert short.state_dict()["strategy"]["pruned"].any()
    # the forward-only pass ran inside pruner.epoch (D3P's recording epochs)
    assert any(e["samples_forward_only"] > 0 for e in short.ledger.epochs)


def test_short_form_records_both_passes_with_one_loss_in_the_training_mode():
    """Issue 22 item 4: the pruned samples' losses come from the same loss_fn (label smoothing included) and the
    same model mode (dropout active) as the trained samples' ones, without gradient; otherwise they would look
    easier than they are and stay pruned."""
    calls = []

    class Probe(torch.nn.Module):  # notes the mode and the gradient state of every forward
        def __init__(self):
            super().__init__()
            self.linear, self.drop = torch.nn.Linear(8, 3), torch.nn.Dropout(0.5)

        def forward(self, x):
            calls.append(("forward", self.training, torch.is_grad_enabled()))
            return self.drop(self.linear(x))

    smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")

    def loss_fn(outputs, targets):
        calls.append(("loss", None, None))
        return smoothed(outputs, targets)

    torch.manual_seed(0)
    model = Probe()
    pruner = d3p.DataPruner(N, "d3p", epochs=5, seed=3, min_kept=16, loss_fn=loss_fn, **D3P_OPTIONS)
    loader = torch.utils.data.DataLoader(_digits_like(), batch_size=16, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(5):
        model.train()
        calls.clear()
        batches = 0
        for x, y in pruner.epoch(loader, epoch, model):
            loss = pruner.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            batches += 1
        forward_only = calls[2 * batches:]
        if pruner.last_log["samples_forward_only"]:
            break
    assert forward_only, "no recording epoch with a forward-only pass"
    assert calls[:2 * batches] == [("forward", True, True), ("loss", None, None)] * batches
    # the forward-only pass: the same model mode (dropout on), no gradient, and the same loss_fn per batch
    assert forward_only == [("forward", True, False), ("loss", None, None)] * (len(forward_only) // 2)


def test_short_form_does_nothing_extra_when_nothing_is_needed():
    """No forward-only pass when the method needs none: no model needed, no extra batch drawn."""
    data = _digits_like()
    pruner = d3p.DataPruner(N, "none", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    seen = []
    for x, y in pruner.epoch(loader, 0):  # model=None: nothing would need it
        seen.append(len(x))
        pruner.loss(torch.zeros(len(x), 3, requires_grad=True), y)
    assert sum(seen) == N and pruner.last_log["samples_forward_only"] == 0


def test_mistakes_get_an_error_that_names_the_fix():
    pruner = d3p.DataPruner(N, "d3p", epochs=4, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), **D3P_OPTIONS)
    pruner.begin_epoch(0)
    logits, y, index = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3])
    # items without an index: no indices for the batch, or a column that is not an index
    with pytest.raises(ValueError, match="no dataset indices.*IndexedDataset"):
        pruner.loss(logits, y)
    with pytest.raises(TypeError, match="int64 tensor.*IndexedDataset"):
        pruner.batch_loss(torch.ones(4), torch.ones(4))
    # a scalar (mean-reduced) loss where per-sample losses are needed
    with pytest.raises(ValueError, match="scalar.*reduction='none'"):
        pruner.batch_loss(torch.nn.functional.cross_entropy(logits, y), index)
    mean_reduced = d3p.DataPruner(N, "none", loss_fn=torch.nn.CrossEntropyLoss())
    mean_reduced.begin_epoch(0)
    with pytest.raises(ValueError, match="scalar.*reduction='none'"):
        mean_reduced.loss(logits, y, index)
    # a loss whose batch size does not match the indices
    with pytest.raises(ValueError, match="3 per-sample losses for 4 dataset indices"):
        pruner.batch_loss(torch.ones(3), index)
    with pytest.raises(ValueError, match="3 per-sample losses for 4 dataset indices"):
        pruner.record(index, torch.ones(3))
    assert pruner.recorder.totals()[1].sum() == 0  # nothing of the refused batches was recorded
    # a loader whose sampler the pruner would silently drop
    weighted = torch.utils.data.DataLoader(_digits_like(), batch_size=8,
                                           sampler=torch.utils.data.WeightedRandomSampler(torch.ones(N), N))
    with pytest.raises(ValueError, match="WeightedRandomSampler.*shuffle=True"):
        next(iter(pruner.epoch(weighted, 1)))
    # no loss_fn for the short form
    with pytest.raises(TypeError, match="loss_fn"):
        d3p.DataPruner(N, "none").loss(logits, y, index)


def test_cluster_traps_under_two_ranks(tmp_path):
    """Pruner built before init_process_group; end_epoch on some ranks only (mismatch, and timeout)."""
    res = run_torchrun(2, ["tests/traps_worker.py", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 1. world size read at begin_epoch: each rank trains its half, together the whole set once
    assert r0["world_size"] == r1["world_size"] == 2
    n = 40  # tests/traps_worker.py's dataset
    assert len(r0["share"]) == len(r1["share"]) == n // 2 and sorted(r0["share"] + r1["share"]) == list(range(n))
    assert r0["samples_trained"] == n
    # 2. both ranks name both calls
    for r in (r0, r1):
        assert "rank 0: end_epoch(1)" in r["mismatch"] and "rank 1: begin_epoch(2)" in r["mismatch"], r["mismatch"]
    # 3. rank 0 gives up after sync_timeout, naming the call and the fix
    assert "DataPruner.end_epoch(1)" in r0["timeout"] and "every rank" in r0["timeout"], r0["timeout"]
    assert 3.5 < r0["waited"] < 8


def test_a_rank_that_never_chose_its_gpu_is_refused_with_the_fix():
    """Issue 22 item 4: under torchrun without torch.cuda.set_device(local_rank), every rank's current GPU is
    cuda:0 and the library's NCCL collectives would all land there. collective_device() refuses that case
    (the decision is a pure function of LOCAL_RANK, the visible GPUs and the current one, testable on CPU)."""
    from d3p.collectives import rank_device_problem

    message = rank_device_problem("3", 8, 0)
    assert "local rank 3" in message and "torch.cuda.set_device(int(os.environ['LOCAL_RANK']))" in message
    for fine in (("3", 8, 3), ("0", 8, 0), (None, 8, 0), ("3", 1, 0)):  # chosen; rank 0; no torchrun; 1 GPU each
        assert rank_device_problem(*fine) is None, fine


def test_import_d3p_does_not_import_the_frameworks():
    """The integrations import lightning / transformers only when used."""
    code = ("import sys, d3p, torch; "
            "p = d3p.DataPruner(8, 'none', loss_fn=torch.nn.CrossEntropyLoss(reduction='none')); "
            "d3p.IndexedDataset([(1, 2)]); p.begin_epoch(0); "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules];"
            "assert not bad, bad")
    res = run_script(["-c", code], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
