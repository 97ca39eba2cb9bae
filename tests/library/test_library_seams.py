"""Issue 29: where a user's own code meets the library. A user's loader with drop_last=True, the floor, the
ledger; the mistakes, warned or refused in the caller's terms at the caller's line; a resume that would change the
decisions; something to read (repr, the per-epoch line, the decision figure)."""
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import d3p

N, BATCH = 100, 16  # 6 full batches: a drop_last loader leaves 4 samples out of every epoch


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def _own_loop(drop_last, epochs=6, **options):
    """A user's own loop: their DataLoader over pruner.sampler (and pruner.forward_sampler), with drop_last."""
    torch.manual_seed(0)
    data = d3p.IndexedDataset(_data())
    model = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = d3p.DataPruner(N, "d3p", epochs=epochs, seed=3, d3p_start=2, d3p_period=2, d3p_window=2, d3p_bins=16,
                            **options)
    loader = DataLoader(data, batch_size=BATCH, sampler=pruner.sampler, drop_last=drop_last)
    forward_loader = DataLoader(data, batch_size=BATCH, sampler=pruner.forward_sampler, drop_last=drop_last)
    logs, trained, seen = [], [], []
    for epoch in range(epochs):
        pruner.begin_epoch(epoch)
        epoch_seen = np.zeros(N, dtype=bool)
        for x, y, index in loader:
            loss = pruner.batch_loss(F.cross_entropy(model(x), y, reduction="none"), index)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_seen[index.numpy()] = True
        trained.append(int(epoch_seen.sum()))
        if pruner.forward_only_indices.size:
            with torch.no_grad():
                for x, y, index in forward_loader:
                    pruner.record(index, F.cross_entropy(model(x), y, reduction="none"))
                    epoch_seen[index.numpy()] = True
        seen.append(epoch_seen)
        logs.append(pruner.end_epoch(epoch))
        logs[-1]["pruned_mask"] = pruner.strategy.pruned.copy()
    return pruner, logs, trained, seen


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_drop_last_loader_prunes_nothing_it_dropped_and_the_floor_and_ledger_hold(drop_last):
    """Issue 29 items 1-2: a sample the loader dropped has no loss; it is kept (weight 1), never pruned for it; the
    floor d3p_min_kept counts it; the ledger counts what the model trained."""
    pruner, logs, trained, seen = _own_loop(drop_last, d3p_min_kept=0.95)
    assert [r["samples_trained"] for r in logs] == trained  # the samples the model trained, not the sampler's
    assert trained[0] == (96 if drop_last else N)
    floor = math.ceil(0.95 * N)
    for epoch in (1, 3, 5):  # the decisions (windows of epochs 0-1, 2-3, 4-5)
        log = logs[epoch]
        unscored = ~(seen[epoch - 1] & seen[epoch])
        assert log["d3p_unscored"] == int(unscored.sum())
        assert (log["d3p_unscored"] > 0) == drop_last
        kept = N - log["d3p_decision_pruned"]
        assert kept >= floor, (epoch, kept)
        assert not (log["pruned_mask"] & unscored).any()  # the samples the loader dropped are kept
        assert int((~log["pruned_mask"]).sum()) == kept
    assert any(r.get("d3p_restored", 0) for r in logs)  # the floor acted


def test_leaving_an_epoch_early_nothing_scored_is_a_decision_of_nothing():
    """A recording epoch left before end_epoch loses its losses: the next decision has nothing scored and prunes
    nothing (it used to fail with `loss_window must have shape (n >= 1, N >= 1), got (2, 0)`)."""
    pruner = d3p.DataPruner(N, "d3p", epochs=4, d3p_start=2, d3p_period=2, d3p_window=2, d3p_bins=16)
    pruner.begin_epoch(0)
    pruner.end_epoch(0)  # no batch_loss: nothing recorded
    pruner.begin_epoch(1)
    log = pruner.end_epoch(1)
    assert log["d3p_unscored"] == N and log["d3p_decision_pruned"] == 0 and "nothing pruned" in log["d3p_note"]
    assert log["samples_trained"] == N  # no batch_loss on any rank: the sampler's length


# ------------------------------------------------------------------ mistakes: the caller's terms, the caller's line
def _line_of(marker):
    """The line number of this file's line that ends with `# <marker>`."""
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith(f"# {marker}"))


def _one_warning(caught, category=UserWarning):
    found = [w for w in caught if issubclass(w.category, category)]
    assert len(found) == 1, [str(w.message) for w in caught]
    return found[0]


def test_a_size_mismatch_is_refused_with_the_fix():
    loader = DataLoader(_data(120), batch_size=BATCH, shuffle=True)
    for size, words in ((N, "never draw the last 20"), (150, "draw indices past the dataset's end")):
        pruner = d3p.DataPruner(size, "none", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
        with pytest.raises(ValueError, match=f"has 120 samples, but the pruner was built for {size}: it would "
                                             f"{words}.*DataPruner\\(len\\(train_set\\)") as err:
            for x, y in pruner.epoch(loader, 0):  # SIZE
                pass
        ours = [entry for entry in err.traceback if entry.path.name == "test_library_seams.py"]
        assert ours[-1].lineno + 1 == _line_of("SIZE")  # raised from the user's for-line (0-based lineno)


def test_leaving_an_epoch_early_is_warned_at_the_loop():
    pruner = d3p.DataPruner(N, "none", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in pruner.epoch(loader, 0):
            pruner.loss(torch.zeros(len(x), 3, requires_grad=True), y)
            break  # LEAVE
        w = _one_warning(caught)
    assert "pruner.epoch(loader, 0, ...) was left before its last batch" in str(w.message)
    assert "pruner.end_epoch(0) on every rank" in str(w.message)
    assert (w.filename, w.lineno) == (__file__, _line_of("LEAVE"))
    with warnings.catch_warnings(record=True) as caught:  # the next epoch does not warn a second time
        warnings.simplefilter("always")
        for x, y in pruner.epoch(loader, 1):
            pruner.loss(torch.zeros(len(x), 3, requires_grad=True), y)
    assert not caught and pruner.last_log["kept"] == N


def test_epoch_order_mistakes_are_warned_at_the_call():
    pruner = d3p.DataPruner(N, "none", epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.begin_epoch(0)
        pruner.begin_epoch(0)  # TWICE
        twice = _one_warning(caught)
        caught.clear()
        pruner.begin_epoch(1)  # SKIPPED
        skipped = _one_warning(caught)
        pruner.end_epoch(1)
        caught.clear()
        pruner.begin_epoch(2)  # PAST
        past = _one_warning(caught)
    assert "begin_epoch(0) was called twice without end_epoch(0)" in str(twice.message)
    assert "begin_epoch(1) without end_epoch(0): epoch 0's losses and decision are lost" in str(skipped.message)
    assert "epoch 2 is past the run's epochs: the pruner was built with epochs=2" in str(past.message)
    assert "build the pruner with epochs=3 or more" in str(past.message)
    for w, marker in ((twice, "TWICE"), (skipped, "SKIPPED"), (past, "PAST")):
        assert (w.filename, w.lineno) == (__file__, _line_of(marker)), marker


def test_a_forgotten_callback_or_begin_epoch_is_named():
    pruner = d3p.DataPruner(N, "none", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(RuntimeError, match=r"callbacks=\[d3p.PruningCallback\(pruner\)\].*d3p.PruningTrainer.*"
                                           r"pruner.epoch\(loader, epoch, model\)"):
        pruner.loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.arange(4))


def test_messages_speak_keywords_to_library_callers_and_flags_to_scripts():
    with pytest.raises(ValueError) as err:
        d3p.DataPruner(N, "d3p", epochs=10, d3p_period=2, d3p_window=3)
    assert str(err.value).startswith("d3p_window (n=3) must be <= d3p_period (p=2)") and "--" not in str(err.value)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    d3p.add_pruning_args(parser)
    args = parser.parse_args(["--d3p_period", "2"])
    with pytest.raises(ValueError, match=r"--d3p_window \(n=3\) must be <= --d3p_period \(p=2\)"):
        d3p.DataPruner.from_args(args, N)


def test_the_fit_warning_names_the_users_line_in_keywords():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _own_loop(False, d3p_min_kept=0.95)
    fit = [w for w in caught if issubclass(w.category, d3p.D3PFitWarning)]
    assert fit and all(w.filename == __file__ for w in fit)
    assert all("--" not in str(w.message) and "method='random'" in str(w.message) for w in fit)


# ------------------------------------------------------------------ state that refuses what it cannot resume
@pytest.mark.parametrize("option,saved,now", [("d3p_bins", 16, 32), ("d3p_quantile", 0.999, 0.99),
                                              ("d3p_max_weight", 1.0, 4.0), ("d3p_min_kept", 0.5, 0.0),
                                              ("d3p_poor_fit", "warn", "keep_all"), ("d3p_fit_threshold", 0.2, 0.5)])
def test_a_resume_that_changes_the_decisions_is_refused_naming_the_option(option, saved, now):
    """Issue 29 item 7: bins, quantile and the rails are saved and compared, like the schedule."""
    pruner = d3p.DataPruner(N, "d3p", epochs=10, **{option: saved})
    state = pruner.state_dict()
    with pytest.raises(ValueError, match=f"made with {option}={saved!r}, this run has {option}={now!r}.*"
                                         f"Fix: resume with {option}={saved!r}"):
        d3p.DataPruner(N, "d3p", epochs=10, **{option: now}).load_state_dict(state)
    d3p.DataPruner(N, "d3p", epochs=10, **{option: saved}).load_state_dict(state)  # the same options: resumes


# ------------------------------------------------------------------ something to read
def test_repr_the_per_epoch_line_and_the_decision_figure(tmp_path, caplog):
    pruner = d3p.DataPruner(N, "d3p", epochs=6, seed=3, d3p_start=2, d3p_period=2, d3p_window=2, d3p_bins=16,
                            log_epochs=True)
    assert repr(pruner) == ("DataPruner(100, method='d3p', epochs=6, seed=3, d3p_start=2, d3p_period=2, "
                            "d3p_window=2, d3p_max_weight=1.0, d3p_min_kept=0.7, world_size=1; no epoch yet)")
    with pytest.raises(ValueError, match="no D3P decision to plot"):
        pruner.plot(str(tmp_path / "none.png"))
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.INFO, logger="d3p"):
        for epoch in range(2):
            pruner.begin_epoch(epoch)
            index = torch.tensor(list(pruner.sampler))
            pruner.batch_loss(torch.rand(len(index), generator=g) + index / N, index)
            log = pruner.end_epoch(epoch)
    assert [r.getMessage() for r in caplog.records][0] == (
        "d3p epoch 0: kept 100/100, epoch prune ratio 0.000, run prune ratio 0.000, compute saved 0.000")
    assert caplog.records[1].getMessage().startswith(f"d3p epoch 1: kept 100/100") and ", fit KS 0." in \
        caplog.records[1].getMessage()
    assert f"after epoch 1: kept 100/100, run prune ratio 0.000" in repr(pruner)
    assert log["d3p_decision_pruned"] > 0
    path = pruner.plot(str(tmp_path / "decision.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ issue 29 item 8: the mutants that survived
def test_a_batch_whose_indices_were_never_used_is_refused():
    pruner = d3p.DataPruner(N, "none", loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # leaving the epoch by the error is warned; not what this test reads
        with pytest.raises(ValueError, match="the previous batch's indices were never used: call "
                                             r"pruner.loss\(outputs, targets\) once per batch"):
            for x, y in pruner.epoch(loader, 0):
                pass  # no pruner.loss: the next batch is refused


def test_num_replicas_and_rank_come_together():
    for given in (dict(num_replicas=2), dict(rank=1)):
        with pytest.raises(ValueError, match="give both num_replicas and rank, or neither"):
            d3p.DataPruner(N, "none", **given)
    assert d3p.DataPruner(N, "none", num_replicas=2, rank=1).sampler.rank == 1
