"""The engine core (util/engine.py) as the fine-tuning engine uses it: the batched NaN-and-stop check, a stop
mid-epoch resumed exactly, and the forward-only pass recorded in the training mode (issue 22 items 2 and 4)."""
import argparse

import numpy as np
import pytest
import torch

import engine_finetune
import models_vit
from d3p import per_sample_cross_entropy
from util.amp import ScaledOptimizerStep
from util import engine
from util.engine import EpochMeters, NonFiniteLossError, SyncPoint

ARGS = dict(accum_iter=2, lr=0.05, min_lr=0.0, warmup_epochs=0, epochs=3, precision="fp32", print_freq=2)


def _batches(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g),
             torch.arange(4 * i, 4 * i + 4)) for i in range(n_batches)]


def _model():
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch4(num_classes=5, img_size=8, drop_path_rate=0.3)


def _losses(model, epoch=1, **kw):
    """The fine-tuning engine's per-sample loss (what main_finetune trains the one loop with)."""
    return engine_finetune.SupervisedLoss(model, per_sample_cross_entropy, torch.device("cpu"), epoch, **kw)


def _epoch(model, batches, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    stats = engine.train_one_epoch(model, batches, opt, ScaledOptimizerStep(None, "cpu"), 1, argparse.Namespace(**ARGS),
                                   _losses(model), **kw)
    return opt, stats


def test_stop_at_a_sync_point_then_resume_equals_the_uninterrupted_epoch():
    """Stopped at the first sync point after the flag (print_freq 2, accum 2: after step 4), then resumed with
    start_step/carried on a fresh optimizer loaded from the stopped one: weights, AdamW state and the epoch's
    averages equal the uninterrupted epoch's."""
    batches = _batches()
    straight = _model()
    torch.manual_seed(1)
    opt_a, stats_a = _epoch(straight, batches)
    assert stats_a.interrupted_at_step is None and stats_a.meters.optimizer_steps == 3

    model = _model()
    calls = []
    torch.manual_seed(1)
    opt_b, part = _epoch(model, batches, stop_requested=lambda: calls.append(1) or len(calls) >= 2)
    assert part.interrupted_at_step == 4 and part.meters.optimizer_steps == 2 and len(calls) == 2
    carried = EpochMeters()
    carried.load_state_dict(part.meters.state_dict())  # what a mid-epoch checkpoint stores for this rank
    rng = torch.get_rng_state()
    opt_c = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt_c.load_state_dict(opt_b.state_dict())
    torch.set_rng_state(rng)
    stats_c = engine.train_one_epoch(
        model, batches[4:], opt_c, ScaledOptimizerStep(None, "cpu"), 1, argparse.Namespace(**ARGS), _losses(model),
        start_step=4, meters=carried)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), model.state_dict().values()))
    for k, state in opt_a.state_dict()["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_c.state_dict()["state"][k]["exp_avg_sq"])
    assert stats_c.meters.optimizer_steps == 3 and stats_c.meters.steps == 6
    # the running sums add the same values in the same order: the epoch's statistics are equal, not close
    assert stats_c.meters.reduced() == stats_a.meters.reduced()


def test_nan_is_found_at_the_sync_point_with_its_step_and_is_a_floating_point_error():
    sync = SyncPoint(epoch=7, start_step=10, num_steps=20, print_freq=3)
    for value in (1.0, float("nan"), 2.0):
        sync.add(torch.tensor(value))
    assert sync.due(12) and not SyncPoint(7, 10, 20, 3).due(10)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at epoch 7, step 11 \(of steps 0-19; seen on rank 0; "):
        sync.check()
    assert issubclass(NonFiniteLossError, RuntimeError)
    sync = SyncPoint(epoch=0, start_step=0, num_steps=4, print_freq=4)
    for value in (1.0, 2.0, float("-inf"), float("nan")):  # the earliest bad step and its own value
        sync.add(torch.tensor(value))
    with pytest.raises(NonFiniteLossError, match=r"loss \(-inf\) at epoch 0, step 2 \(of steps 0-3;"):
        sync.check()


class _Recorder:
    def __init__(self):
        self.losses = []

    def record(self, index, losses):
        self.losses.append(losses.clone())


def test_forward_only_losses_are_recorded_in_training_mode():
    """Drop path is active in the forward-only pass as in training (the same RNG draws give the same losses as
    a training-mode forward), not switched off as in eval mode, which would make pruned samples look easier."""
    model = _model()
    batches = [_batches(1)[0]]
    pruner = _Recorder()
    torch.manual_seed(5)
    seen = engine.forward_only_pass(model, batches, _losses(model, 0, forward_only=True), pruner, 0)
    assert seen == 4 and model.training
    images, targets, _ = batches[0]
    torch.manual_seed(5)
    with torch.no_grad():
        train_mode = per_sample_cross_entropy(model.train()(images), targets)
        eval_mode = per_sample_cross_entropy(model.eval()(images), targets)
    assert torch.equal(pruner.losses[0], train_mode)
    assert not torch.allclose(pruner.losses[0], eval_mode)


def test_forward_only_pass_stopped_records_nothing():
    model, pruner, calls = _model(), _Recorder(), []
    seen = engine.forward_only_pass(model, _batches(4), _losses(model, 0, forward_only=True), pruner, 0,
                                    stop_requested=lambda: calls.append(1) or True, print_freq=2)
    assert seen is None and pruner.losses == [] and len(calls) == 1


def test_evaluation_stopped_by_a_signal_returns_none():
    model = _model()
    batches = [(x, y) for x, y, _ in _batches(3)]
    assert engine_finetune.evaluate(batches, model, "cpu", stop_requested=lambda: True) is None
    stats = engine_finetune.evaluate(batches, model, "cpu", stop_requested=lambda: False)
    assert stats["num_samples"] == 12 and np.isfinite(stats["loss"])


class _HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that copy a float tensor to the host (item, tolist, cpu, numpy, float(), bool()). On a
    GPU each is a device sync; the float tensors here are the ones a GPU run keeps on the device (outputs,
    losses, gradients), while the dataset indices stay on the host."""
    HOST = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__float__,
            torch.Tensor.__bool__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.HOST and args and args[0].is_floating_point():
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_finetune_steps_between_sync_points_make_no_host_sync():
    """Issue 22 item 2: the fine-tuning engine copies losses to the host only at its sync points (every
    print_freq steps), not per step: an epoch of 12 steps makes as many host copies as one of 6 (one sync
    point each), with the pruner's weighting and recording in the step."""
    import d3p

    counts = []
    for steps in (6, 12):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # (CPU AdamW reads its step counts)
        pruner = d3p.DataPruner(48, "infobatch", epochs=3)
        pruner.begin_epoch(1)  # weights and recording
        with _HostSyncs() as syncs:
            stats = engine.train_one_epoch(
                model, _batches(steps), opt, ScaledOptimizerStep(None, "cpu"), 1,
                argparse.Namespace(**{**ARGS, "print_freq": 100}), _losses(model), pruner=pruner)
        assert stats.meters.optimizer_steps == steps // 2
        counts.append(syncs.count)
    assert counts[0] == counts[1] and counts[0] <= 10, counts
