"""End-to-end pre-training on the embedded digits: logging, weights, resume, pruning, 2 ranks."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import main_pretrain_d3p
from conftest import load_ckpt, read_log, run_torchrun
from d3p import DataPruner, EpochPlan, weighted_batch_loss
from d3p.stats import FIT_KS_THRESHOLD
from engine_pretrain import MAELoss
from util.engine import train_one_epoch

BASE = ["--num_workers", "0", "--input_size", "16", "--batch_size", "32", "--train_subset", "192", "--warmup_epochs", "1",
        "--blr", "1e-3", "--print_freq", "3"]
# spec epochs 1,2 record, decide at 2; 3 trains pruned; 4,5 record (forward-only pass) and 5 decides
SHORT_D3P = ["--prune_method", "d3p", "--d3p_start", "2", "--d3p_period", "3", "--d3p_window", "2", "--d3p_bins", "16"]


def test_weighted_batch_loss_rules():
    torch.manual_seed(0)
    l = torch.rand(7)
    assert torch.equal(weighted_batch_loss(l, None, True), l.mean())
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 1.0])
    assert torch.allclose(weighted_batch_loss(l, w, True), (w * l).sum() / w.sum())
    assert torch.allclose(weighted_batch_loss(l, w, False), (w * l).mean())


class _LinearLossModel(torch.nn.Module):
    """Per-sample loss = theta * c_i: its gradient exposes exactly how samples were weighted."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def forward(self, imgs, mask_ratio=0.75):
        return self.theta * imgs.flatten(1).sum(1), None, None


class _FixedPlan:
    """A strategy that trains on all samples with given weights (tests plug it into DataPruner)."""

    name = "fixed"

    def __init__(self, num_samples, weights, normalize):
        self.num_samples, self.weights, self.normalize = num_samples, weights, normalize

    def plan_epoch(self, epoch):
        return EpochPlan(kept=np.arange(self.num_samples), weights=self.weights, normalize_weights=self.normalize)

    def end_epoch(self, epoch, losses, embeddings=None):
        return {}


def test_engine_uses_sample_weights_in_the_gradient():
    from types import SimpleNamespace

    from util.amp import ScaledOptimizerStep

    imgs = torch.arange(1.0, 5.0).view(4, 1, 1, 1)  # c_i = 1, 2, 3, 4
    batch = [(imgs, torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3]))]
    weights = np.array([1.0, 1.0, 4.0, 2.0], dtype=np.float32)
    args = SimpleNamespace(accum_iter=1, lr=1.0, min_lr=1.0, warmup_epochs=0, epochs=1, mask_ratio=0.75, print_freq=5)
    for normalize, expected in ((True, (1 + 2 + 12 + 8) / 8.0), (False, (1 + 2 + 12 + 8) / 4.0), (None, 2.5)):
        model = _LinearLossModel()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        pruner = DataPruner(4, _FixedPlan(4, None if normalize is None else weights, bool(normalize)))
        pruner.begin_epoch(0)
        train_one_epoch(model, batch, opt, ScaledOptimizerStep(None, "cpu"), 0, args,
                        MAELoss(model, torch.device("cpu"), args.mask_ratio), pruner=pruner)
        assert model.theta.item() == pytest.approx(-expected, rel=1e-6)


def test_one_epoch_pretrain_logs_and_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    assert main_pretrain_d3p.cli([*BASE, "--prune_method", "none", "--epochs", "1", "--accum_iter", "2",
                                  "--output_dir", out]) == 0
    (rec,) = read_log(out)
    for key in ("epoch", "train_loss", "lr", "samples_trained", "epoch_seconds", "kept", "epoch_prune_ratio",
                "run_prune_ratio"):
        assert key in rec
    assert rec["samples_trained"] == 192 and rec["optimizer_steps"] == 3 and rec["run_prune_ratio"] == 0.0
    assert rec["epoch_prune_ratio"] == 0.0
    assert np.isfinite(rec["train_loss"])
    # lr = blr x batch x accum x world / 256; the log holds the lr of the last accumulation group (steps 4, 5 of
    # 6), 4/6 into the one warm-up epoch
    peak = 1e-3 * 32 * 2 * 1 / 256
    assert rec["lr"] == pytest.approx(peak * 4 / 6, rel=1e-12)
    ckpt = load_ckpt(out, 0)  # weights_only=True
    assert ckpt["args"]["lr"] == pytest.approx(peak, rel=1e-12)
    assert {"model", "optimizer", "scaler", "epoch", "rng_states", "pruning"} <= set(ckpt)
    assert "blocks.0.attn.qkv.bias" in ckpt["model"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["method"] == "none" and summary["samples_trained"] == 192
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))


def test_resume_equals_straight_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = [*BASE, "--prune_method", "none", "--epochs", "2", "--save_every", "1"]
    assert main_pretrain_d3p.cli([*common, "--output_dir", straight]) == 0
    pruned = str(tmp_path / "keep_last")
    assert main_pretrain_d3p.cli([*common, "--epochs", "3", "--keep_last", "2", "--output_dir", pruned]) == 0
    assert sorted(f for f in os.listdir(pruned) if f.endswith(".pth")) == ["checkpoint-1.pth", "checkpoint-2.pth"]
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "checkpoint-0.pth"), resumed)
    assert main_pretrain_d3p.cli([*common, "--output_dir", resumed, "--auto_resume"]) == 0
    a, b = load_ckpt(straight, 1)["model"], load_ckpt(resumed, 1)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_d3p_end_to_end_prunes_records_and_resumes_mid_cycle(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = [*BASE, *SHORT_D3P, "--epochs", "5", "--save_every", "1"]
    assert main_pretrain_d3p.cli([*common, "--output_dir", straight]) == 0
    log = read_log(straight)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]
    assert "d3p_support" in log[1] and "d3p_support" in log[4] and "d3p_support" not in log[2]
    assert log[0]["kept"] == 192 and log[2]["kept"] < 192, "the decision at spec epoch 2 pruned nothing"
    pruned = log[2]["pruned"]
    assert log[1]["d3p_decision_pruned"] == pruned == log[1]["d3p_easy"] + log[1]["d3p_hard"] + log[1]["d3p_trimmed"] - log[1]["d3p_restored"]
    # forward-only passes exactly in the recording epochs after pruning (spec epochs 4, 5), over the pruned set
    assert [r["samples_forward_only"] for r in log] == [0, 0, 0, pruned, pruned]
    # the same kept set trains in spec epochs 3-5; the forward-only samples of 4 and 5 are not counted as trained
    assert [r["samples_trained"] for r in log[2:]] == [192 - pruned] * 3
    # the epoch's own ratio and the run's cumulative one (the paper's figure), under names that say which
    assert log[2]["epoch_prune_ratio"] == 1 - log[2]["kept"] / 192 and log[0]["epoch_prune_ratio"] == 0.0
    assert log[4]["run_prune_ratio"] == pytest.approx(1 - sum(r["samples_trained"] for r in log) / (5 * 192))
    assert "prune_ratio" not in log[4]
    # the fit diagnostic at every decision, warned exactly above the threshold; MAE's losses fit at the first
    # decision (0.09 here). The second, on 125 trained samples of 192 and 16 bins, sits near the threshold (KS has
    # a sampling noise of ~1/sqrt(192)): how well MAE's losses fit is tested on the stored windows
    # (tests/library/test_d3p_fit.py), not on this toy run. No rail acted (all off by default)
    assert 0 <= log[1]["d3p_fit_ks"] < FIT_KS_THRESHOLD and "d3p_warning" not in log[1]
    assert 0 <= log[4]["d3p_fit_ks"] <= 1 and ("d3p_warning" in log[4]) == (log[4]["d3p_fit_ks"] > FIT_KS_THRESHOLD)
    assert all(log[e]["d3p_capped"] == 0 and log[e]["d3p_tail_kept"] == 0 for e in (1, 4))
    state = load_ckpt(straight, 2)["pruning"]["strategy"]
    assert (state["weights"] > 1).any(), "histogram matching up-weighted nothing"
    # TensorBoard: per-step loss against epoch_1000x, per-epoch scalars, the CLD histogram and the figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(straight, size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"train_loss", "lr", "epoch/epoch_prune_ratio", "epoch/run_prune_ratio", "epoch/d3p_trimmed",
            "epoch/d3p_fit_ks"} <= set(tags["scalars"])
    assert "d3p/cld" in tags["histograms"] and "d3p/decision" in tags["images"]
    assert [e.step for e in events.Scalars("train_loss")][:2] == [0, int(1000 / 6)]
    # resume mid-cycle (after spec epoch 3) gives the same later decision and weights
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "checkpoint-2.pth"), resumed)
    shutil.copy(os.path.join(straight, "log.txt"), resumed)  # holds epochs 3, 4: resume must not duplicate them
    assert main_pretrain_d3p.cli([*common, "--output_dir", resumed, "--auto_resume"]) == 0
    a, b = load_ckpt(straight, 4), load_ckpt(resumed, 4)
    for key in ("pruned", "weights", "window"):  # window is NaN between decisions: NaN == NaN here
        torch.testing.assert_close(a["pruning"]["strategy"][key], b["pruning"]["strategy"][key], rtol=0, atol=0,
                                   equal_nan=True, msg=key)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["epoch"] for r in read_log(resumed)] == [0, 1, 2, 3, 4]


def test_two_process_torchrun_d3p(tmp_path):
    out = str(tmp_path / "ddp")
    res = run_torchrun(2, ["main_pretrain_d3p.py", *BASE, *SHORT_D3P, "--train_subset", "190", "--epochs", "4",
                           "--accum_iter", "2", "--save_every", "1", "--output_dir", out], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = read_log(out)
    assert len(log) == 4
    # lr = blr x batch x accum x world / 256 = 1e-3 x 32 x 2 x 2 / 256; epoch 0 (95 samples per rank: 3 steps)
    # logs the lr of its last accumulation group, which starts at step 2 of 3 of the warm-up epoch
    peak = 1e-3 * 32 * 2 * 2 / 256
    assert load_ckpt(out, 3)["args"]["lr"] == pytest.approx(peak, rel=1e-12)
    assert log[0]["lr"] == pytest.approx(peak * 2 / 3, rel=1e-12)
    for rec in log:
        sums = rec["replica_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], "model weights differ between the ranks"
    # 190 samples on 2 ranks: padded sampler lengths; kept set after the decision is shared by both ranks
    assert log[0]["samples_trained"] == 190
    assert log[2]["kept"] < 190
    assert log[2]["samples_trained"] == log[2]["kept"] + log[2]["kept"] % 2


@pytest.mark.parametrize("method", ["infobatch", "seta", "random"])
def test_dynamic_baselines_run_in_the_engine_with_the_same_ledger(tmp_path, method):
    out = str(tmp_path / method)
    assert main_pretrain_d3p.cli([*BASE, "--prune_method", method, "--epochs", "3", "--output_dir", out]) == 0
    log = read_log(out)
    assert all(r["samples_trained"] == r["kept"] for r in log)  # one rank: sampler length == kept
    assert any(r["kept"] < 192 for r in log), f"{method} never pruned"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["method"] == method and summary["flags"]["prune_ratio"] == 0.5
    assert summary["samples_trained"] == sum(r["samples_trained"] for r in log)
    assert summary["prune_ratio"] == pytest.approx(1 - summary["samples_trained"] / (3 * 192))
    assert summary["optimizer_steps"] == sum(-(-r["samples_trained"] // 32) for r in log)


def test_random_matched_to_a_d3p_run_keeps_its_counts(tmp_path):
    """The D3P run anneals its last epoch (--d3p_anneal_epochs 1): the decision at spec epoch 2 prunes epoch 3,
    epoch 4 trains all 192 samples again with no forward-only pass and no decision; random follows every count."""
    d3p_dir, rand_dir = str(tmp_path / "d3p"), str(tmp_path / "random")
    common = [*BASE, "--epochs", "4"]
    assert main_pretrain_d3p.cli([*common, *SHORT_D3P, "--d3p_anneal_epochs", "1", "--output_dir", d3p_dir]) == 0
    assert main_pretrain_d3p.cli([*common, "--prune_method", "random", "--random_match", d3p_dir,
                                  "--output_dir", rand_dir]) == 0
    log = read_log(d3p_dir)
    kept_d3p = [r["kept"] for r in log]
    assert kept_d3p[2] < 192 and log[1]["d3p_decision_pruned"] == 192 - kept_d3p[2]
    tail = log[3]
    assert tail["kept"] == tail["samples_trained"] == 192 and tail["pruned"] == 0
    assert tail["samples_forward_only"] == 0 and "d3p_support" not in tail
    assert [r["kept"] for r in read_log(rand_dir)] == kept_d3p


@pytest.mark.parametrize("method", ["dynunc", "d2"])
def test_static_methods_select_once_and_charge_the_warmup(tmp_path, method):
    out = str(tmp_path / method)
    args = [*BASE, "--prune_method", method, "--static_warmup_epochs", "2", "--epochs", "3", "--output_dir", out,
            "--dynunc_window", "2"]
    assert main_pretrain_d3p.cli(args) == 0
    log = read_log(out)
    assert [r["kept"] for r in log] == [192, 192, 96]
    # D2's embedding pass over all samples at the end of the warm-up is charged as forward-only work
    assert [r["samples_forward_only"] for r in log] == ([0, 192, 0] if method == "d2" else [0, 0, 0])
    kept = np.load(os.path.join(out, "kept_static.npy"))
    state = load_ckpt(out, 2)["pruning"]["strategy"]
    assert kept.size == 96 and np.array_equal(kept, state["subset"].numpy())


def test_bf16_autocast_on_cpu_trains(tmp_path, capsys):
    out = str(tmp_path / "bf16")
    # one step (bf16 matmuls are slow on CPUs without native bf16), and the same step in fp32
    args = [*BASE, "--prune_method", "none", "--epochs", "1", "--train_subset", "32", "--warmup_epochs", "0",
            "--precision", "bf16", "--output_dir", out]
    assert main_pretrain_d3p.cli(args) == 0
    (rec,) = read_log(out)
    assert np.isfinite(rec["train_loss"]) and rec["optimizer_steps"] == 1
    fp32 = str(tmp_path / "fp32")
    assert main_pretrain_d3p.cli([*args[:-3], "fp32", "--output_dir", fp32]) == 0
    (ref,) = read_log(fp32)
    # the forward really ran in bf16 (8 mantissa bits): the same batch's loss differs from fp32's, but only by
    # bf16's rounding
    assert rec["train_loss"] != ref["train_loss"]
    assert abs(rec["train_loss"] - ref["train_loss"]) < 0.02 * abs(ref["train_loss"])
    a, b = load_ckpt(out, 0)["model"], load_ckpt(fp32, 0)["model"]
    assert all(v.dtype == torch.float32 for v in a.values())  # autocast: the weights stay fp32
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])
    # fp16 needs CUDA (GradScaler): refused with the fix on a CPU machine, as a bad flag (nothing was trained)
    assert main_pretrain_d3p.cli([*args[:-1], str(tmp_path / "fp16"), "--precision", "fp16", "--device", "cpu"]) == 2
    assert "--precision fp16 needs CUDA" in capsys.readouterr().err


def test_resume_with_workers_equals_straight_run(tmp_path):
    """--num_workers 2 (persistent workers): 4 epochs straight == 2 epochs + --auto_resume + 2 epochs,
    bit for bit, through a D3P decision and two forward-only passes (epochs 2, 3) after the resume.
    Before the item seeds, persistent workers kept the RNG of the epoch they were started in, so the
    resumed run's augmentation differed from the uninterrupted run's."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    common = [*BASE, "--num_workers", "2", "--train_subset", "128", "--prune_method", "d3p", "--d3p_start", "2",
              "--d3p_period", "2", "--d3p_window", "2", "--d3p_bins", "16", "--epochs", "4", "--save_every", "1"]
    assert main_pretrain_d3p.cli([*common, "--output_dir", straight]) == 0
    os.makedirs(resumed)
    for name in ("checkpoint-1.pth", "log.txt"):
        shutil.copy(os.path.join(straight, name), resumed)
    assert main_pretrain_d3p.cli([*common, "--output_dir", resumed, "--auto_resume"]) == 0
    assert [r["samples_forward_only"] for r in read_log(straight)][2:] == [r["samples_forward_only"] for r in
                                                                          read_log(resumed)][2:]
    assert read_log(straight)[3]["samples_forward_only"] > 0, "no forward-only pass after the resume"
    a, b = load_ckpt(straight, 3), load_ckpt(resumed, 3)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key in ("pruned", "weights"):
        assert torch.equal(a["pruning"]["strategy"][key], b["pruning"]["strategy"][key]), key


def test_item_seeds_depend_on_position_epoch_rank_and_stream_only():
    from d3p.sampler import PrunedDistributedSampler
    from util.item_seeding import STREAM_FORWARD_ONLY, STREAM_TRAIN, ItemSeedSampler

    base = PrunedDistributedSampler(10, 2, 1, seed=3)
    seeds = ItemSeedSampler(base, seed=3, rank=1, stream=STREAM_TRAIN)
    whole = list(seeds)
    assert [i for i, _ in whole] == list(base) and len(set(s for _, s in whole)) == 5
    base.skip(2)  # a resumed epoch keeps the seeds of its remaining positions
    assert list(seeds) == whole[2:]
    other = [s for _, s in ItemSeedSampler(base, seed=3, rank=1, stream=STREAM_FORWARD_ONLY)]
    assert not set(other) & {s for _, s in whole}
    base.set_epoch(1)
    assert not {s for _, s in seeds} & {s for _, s in whole}
    assert ItemSeedSampler(base, 3, 0, STREAM_TRAIN).epoch_key(1) != seeds.epoch_key(1)


def test_last_partial_accumulation_group_is_stepped_with_its_own_mean():
    """accum_iter 4 over 10 one-sample steps: groups of 4, 4 and a last one of 2, each stepped with the
    mean gradient of its own micro-batches (c = 1..10: 2.5, 6.5, 9.5). The old rule divided the last
    group by 4 too (an extra, down-scaled step: 4.75)."""
    from types import SimpleNamespace

    from util.amp import ScaledOptimizerStep

    batches = [(torch.full((1, 1, 1, 1), float(c)), torch.zeros(1, dtype=torch.long), torch.tensor([c - 1]))
               for c in range(1, 11)]
    args = SimpleNamespace(accum_iter=4, lr=1.0, min_lr=1.0, warmup_epochs=0, epochs=1, mask_ratio=0.75, print_freq=3)
    model = _LinearLossModel()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    outcome = train_one_epoch(model, batches, opt, ScaledOptimizerStep(None, "cpu"), 0, args,
                              MAELoss(model, torch.device("cpu"), args.mask_ratio))
    assert outcome.meters.optimizer_steps == 3
    assert model.theta.item() == -(2.5 + 6.5 + 9.5)


def test_embeddings_drop_replaced_images():
    """A replaced unreadable image (index -1 - i) adds no row; before, it landed in row N - 1 - i."""
    from engine_pretrain import compute_embeddings

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1, 2))

        def embed(self, imgs):
            return imgs.flatten(1)[:, :2]

    imgs = torch.tensor([[1.0, 2.0], [5.0, 7.0]]).view(2, 2, 1, 1)
    batch = [(imgs, torch.zeros(2, dtype=torch.long), torch.tensor([0, -1 - 2]))]  # sample 2 was unreadable
    feats, seen = compute_embeddings(Net(), batch, torch.device("cpu"), num_samples=4)
    assert seen == 2
    assert feats.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_compile_flag_trains_and_keeps_checkpoint_keys(tmp_path):
    out = str(tmp_path / "compiled")
    args = [*BASE, "--prune_method", "none", "--epochs", "1", "--train_subset", "64", "--compile",
            "--compile_backend", "eager", "--output_dir", out]
    assert main_pretrain_d3p.cli(args) == 0
    (rec,) = read_log(out)
    assert np.isfinite(rec["train_loss"]) and rec["optimizer_steps"] == 2
    keys = load_ckpt(out, 0)["model"].keys()
    assert "blocks.0.attn.qkv.weight" in keys and not any("_orig_mod" in k for k in keys)
