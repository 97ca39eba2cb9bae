"""Supervised training with pruning (main_finetune.py --prune_method): per-sample cross-entropy, the ledger and
summary of pre-training, exact resume, 2 ranks, flag rules. From scratch on the embedded digits at 16 px."""
import json
import shutil

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import main_finetune
from conftest import read_log, run_torchrun
from d3p import per_sample_cross_entropy

BASE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "64", "--num_workers", "0",
        "--mixup", "0", "--cutmix", "0", "--aa", "none", "--blr", "2e-3", "--warmup_epochs", "1"]
SHORT_D3P = ["--prune_method", "d3p", "--d3p_start", "2", "--d3p_period", "2", "--d3p_window", "2", "--d3p_bins", "16"]
N = 1500


def test_per_sample_cross_entropy_matches_timm_losses():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    torch.testing.assert_close(per_sample_cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(per_sample_cross_entropy(logits, y, 0.1).mean(),
                               LabelSmoothingCrossEntropy(0.1)(logits, y))
    # Mixup (mode batch: row i = lam x_i + (1 - lam) x_flip(i)): the soft-target loss of row i is recorded for i
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
    _, soft = mix(torch.randn(6, 3, 4, 4, generator=g), y)
    per_sample = per_sample_cross_entropy(logits, soft)
    torch.testing.assert_close(per_sample.mean(), SoftTargetCrossEntropy()(logits, soft))
    torch.testing.assert_close(per_sample[2], -(soft[2] * logits[2].log_softmax(-1)).sum())
    with pytest.raises(ValueError, match="targets must be"):
        per_sample_cross_entropy(logits, y[:, None, None])


def test_supervised_d3p_end_to_end_resumes_exactly(tmp_path, monkeypatch):
    # keep every epoch's checkpoint (the script keeps only the newest) so the run can restart after epoch 1
    monkeypatch.setattr(main_finetune.ckpt_util, "prune_old_checkpoints", lambda *a, **k: None)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*BASE, *SHORT_D3P, "--epochs", "4"]
    main_finetune.cli([*common, "--output_dir", str(straight)])
    log = read_log(str(straight))
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert "d3p_support" in log[1] and "d3p_support" in log[3] and "d3p_support" not in log[2]
    pruned = log[2]["pruned"]
    assert log[0]["kept"] == N and 0 < pruned == N - log[2]["kept"]
    assert [r["samples_forward_only"] for r in log] == [0, 0, pruned, pruned]  # recording epochs after pruning
    assert [r["samples_trained"] for r in log] == [r["kept"] for r in log]  # drop_last off: all kept trained
    for key in ("train_loss", "test_acc1", "compute_saved", "epoch_prune_ratio", "run_prune_ratio", "plan_fingerprint", "optimizer_steps"):
        assert key in log[3], key
    assert log[2]["optimizer_steps"] == -(-(N - pruned) // 64)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["mode"] == "finetune" and summary["method"] == "d3p" and summary["finetune"] is None
    assert summary["samples_trained"] == sum(r["samples_trained"] for r in log)
    assert summary["compute_saved"] == pytest.approx(log[3]["compute_saved"]) and summary["compute_saved"] > 0
    assert summary["flags"]["d3p_start"] == 2 and summary["epochs"] == 4
    # the classification defaults: D3P's rails on (no up-weights, half kept), the fit measured at each decision
    assert (summary["flags"]["d3p_max_weight"], summary["flags"]["d3p_min_kept"]) == (1.0, 0.7)
    assert all(log[e]["d3p_max_weight"] == 1.0 and 0 <= log[e]["d3p_fit_ks"] <= 1 for e in (1, 3))
    assert all(r["kept"] >= N // 2 for r in log)
    ckpt = torch.load(straight / "checkpoint-1.pth", map_location="cpu", weights_only=True)
    assert ckpt["pruning"]["method"] == "d3p"
    # TensorBoard, as pre-training writes it: the pruning fields per epoch, the CLD histogram and decision figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"perf/test_acc1", "epoch/epoch_prune_ratio", "epoch/d3p_fit_ks", "epoch/kept"} <= set(tags["scalars"])
    assert [e.step for e in events.Images("d3p/decision")] == [1, 3]
    assert [e.value for e in events.Scalars("epoch/kept")] == [r["kept"] for r in log]
    # resume after epoch 1 (the first decision): the same later decisions, weights and model
    resumed.mkdir()
    shutil.copy(straight / "checkpoint-1.pth", resumed)
    main_finetune.cli([*common, "--output_dir", str(resumed), "--auto_resume"])
    a, b = (torch.load(d / "checkpoint-3.pth", map_location="cpu", weights_only=True) for d in (straight, resumed))
    for key in ("pruned", "weights"):
        assert torch.equal(a["pruning"]["strategy"][key], b["pruning"]["strategy"][key]), key
    assert a["pruning"]["ledger"]["epochs"][3]["kept"] == b["pruning"]["ledger"]["epochs"][3]["kept"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_process_supervised_pruning(tmp_path):
    out = tmp_path / "ddp"
    # 4 epochs: epoch 2 records (with a forward-only pass) for the decision at epoch 3; with 3 epochs that
    # decision would never come, and nothing would be recorded (d3p.schedule)
    res = run_torchrun(2, ["main_finetune.py", *BASE, *SHORT_D3P, "--epochs", "4", "--mixup", "0.8",
                           "--accum_iter", "2", "--output_dir", str(out)], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = read_log(str(out))
    assert log[0]["samples_trained"] == N and log[2]["kept"] < N
    assert log[2]["samples_trained"] == log[2]["kept"] + log[2]["kept"] % 2  # one padding sample when odd
    assert log[2]["samples_forward_only"] == log[2]["pruned"] + log[2]["pruned"] % 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # lr = blr x batch x accum x world / 256
    assert summary["lr"] == pytest.approx(2e-3 * 64 * 2 * 2 / 256, rel=1e-12) and summary["eff_batch_size"] == 256


def _args(*argv):
    args = main_finetune.get_args_parser().parse_args(list(argv))
    main_finetune.resolve_defaults(args)
    return args


def test_pruning_flag_rules():
    assert _args().prune_method == "none"
    for method in ("dynunc", "d2"):
        with pytest.raises(main_finetune.ConfigError, match=f"--prune_method {method} is not supported here.*d3p-export"):
            main_finetune.validate_args(_args("--prune_method", method))
    with pytest.raises(main_finetune.ConfigError, match="--d3p_window"):
        main_finetune.validate_args(_args("--prune_method", "d3p", "--d3p_start", "1"))
    with pytest.raises(main_finetune.ConfigError, match="--random_match needs --prune_method random"):
        main_finetune.validate_args(_args("--random_match", "somewhere"))
    # the linear probe measures the pre-trained encoder: it is not pruned
    with pytest.raises(main_finetune.ConfigError, match="--linprobe evaluates the pre-trained encoder"):
        main_finetune.validate_args(_args("--linprobe", "--prune_method", "infobatch", "--model", "vit_tiny_patch4"))


def test_every_method_trains_balanced_batches_and_drop_last_is_for_the_unscored_ones(tmp_path, capsys):
    """Random at 70% keeps 450 of the 1,500 digits: 8 balanced batches (2 x 57 + 6 x 56), not 7 x 64 and a runt of
    2 (docs/does_pruning_pay.md, the 70% column); with Mixup the sizes are even. --drop_last is MAE's batching (7 x
    64, 2 dropped) and is refused for a method that scores samples by their loss."""
    main_finetune.cli([*BASE, "--prune_method", "random", "--prune_ratio", "0.7", "--epochs", "1",
                       "--output_dir", str(tmp_path / "ft")])
    line = read_log(str(tmp_path / "ft"))[0]
    assert (line["samples_trained"], line["batch_min"], line["batch_max"], line["optimizer_steps"]) == (450, 56, 57, 8)
    main_finetune.cli([*BASE, "--prune_method", "random", "--prune_ratio", "0.7", "--epochs", "1", "--mixup", "0.8",
                       "--output_dir", str(tmp_path / "mix")])
    line = read_log(str(tmp_path / "mix"))[0]
    assert (line["batch_min"], line["batch_max"]) == (56, 58)  # 450 = 58 + 7 x 56: pairs for Mixup
    main_finetune.cli([*BASE, "--prune_method", "random", "--prune_ratio", "0.7", "--epochs", "1", "--drop_last",
                       "--output_dir", str(tmp_path / "mae")])
    line = read_log(str(tmp_path / "mae"))[0]
    assert (line["samples_trained"], line["batch_min"], line["batch_max"]) == (448, 64, 64)
    with pytest.raises(SystemExit) as refused:
        main_finetune.cli([*BASE, "--prune_method", "infobatch", "--drop_last", "--output_dir", str(tmp_path / "x")])
    assert refused.value.code == 2
    assert "--drop_last drops samples that --prune_method infobatch scores by their loss" in capsys.readouterr().err

