"""main_finetune.py end to end on the embedded digits (subprocess), plus its error paths (in process).

The runs fine-tune at --input_size 16 (16 patches instead of 64: ~4x less compute on CPU) from a checkpoint of
mae_vit_tiny_patch4 pre-trained at 32 px, so they also exercise the pos-embed interpolation 8x8 -> 4x4.
OMP_NUM_THREADS=1 keeps them fast on a shared 2-core machine (OpenMP spin-waits badly under contention).
"""
import argparse
import json
import math

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import pytest
import torch

import main_finetune
import models_mae
import models_vit
from conftest import run_script


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch4()
    path = tmp_path_factory.mktemp("pretrain") / "checkpoint-0.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": {"model": "mae_vit_tiny_patch4"}}, path)
    return str(path)


def _run(script, *args, timeout=300):
    return run_script([script, "--model", "vit_tiny_patch4", "--batch_size", "64", "--num_workers", "0", *args],
                      timeout=timeout)


def _check_outputs(out_dir, mode, ckpt, proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Accuracy of the network on the 297 test images:" in proc.stdout
    assert "Position interpolate from 8x8 to 4x4" in proc.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["mode"] == mode
    assert summary["model"] == "vit_tiny_patch4"
    assert summary["epochs"] == 1
    assert summary["nb_classes"] == 10
    assert (summary["num_train"], summary["num_val"]) == (1500, 297)
    assert summary["finetune"] == ckpt
    assert 0.0 <= summary["final_acc1"] <= summary["final_acc5"] <= 100.0
    assert summary["best_acc1"] == pytest.approx(summary["final_acc1"])
    assert summary["wall_seconds"] > 0
    lines = (out_dir / "log.txt").read_text().strip().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats["epoch"] == 0
    assert math.isfinite(stats["train_loss"]) and stats["train_lr"] > 0
    assert stats["test_acc1"] == pytest.approx(summary["final_acc1"])
    assert {"test_acc5", "test_loss", "n_parameters"} <= set(stats)
    saved = torch.load(out_dir / "checkpoint-0.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "args"} <= set(saved)
    assert saved["epoch"] == 0 and isinstance(saved["args"], dict) and saved["args"]["linprobe"] == (mode == "linprobe")
    return saved


def test_finetune_one_epoch(pretrain_ckpt, tmp_path):
    out = tmp_path / "ft"
    proc = _run("main_finetune.py", "--finetune", pretrain_ckpt, "--epochs", "1", "--input_size", "16",
                "--accum_iter", "2", "--output_dir", str(out))
    saved = _check_outputs(out, "finetune", pretrain_ckpt, proc)
    assert "fc_norm.weight" in saved["model"] and saved["model"]["head.weight"].shape == (10, 192)
    # lr = blr x batch x accum x world / 256 with the fine-tuning recipe's blr 1e-3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == pytest.approx(1e-3 * 64 * 2 * 1 / 256, rel=1e-12) and summary["eff_batch_size"] == 128
    # the optimizer stepped once per accumulation group: 1500 // 64 = 23 batches (drop_last) -> 12 groups, and
    # every encoder weight moved away from the pre-trained one
    steps = {int(st["step"]) for st in saved["optimizer"]["state"].values()}
    assert steps == {12}, steps
    pre = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)["model"]
    for k in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "cls_token"):
        assert not torch.equal(saved["model"][k], pre[k]), f"{k} did not train"


def test_linprobe_one_epoch(pretrain_ckpt, tmp_path):
    out = tmp_path / "lp"
    proc = _run("main_linprobe.py", "--finetune", pretrain_ckpt, "--epochs", "1", "--input_size", "16",
                "--output_dir", str(out))
    saved = _check_outputs(out, "linprobe", pretrain_ckpt, proc)
    assert "LARS" in proc.stdout
    sd = saved["model"]
    assert "head.0.running_mean" in sd and "head.1.weight" in sd  # BatchNorm(affine=False) + linear
    pre = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)["model"]
    for k in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.bias", "norm.weight", "cls_token"):
        assert torch.equal(sd[k], pre[k]), f"{k} changed: the encoder must stay frozen"


def test_missing_finetune_file_fails_clearly(tmp_path, capsys):
    # the command-line entry point, run in process (a subprocess would only add ~5 s of imports)
    missing = str(tmp_path / "nope" / "checkpoint-799.pth")
    with pytest.raises(SystemExit) as exc:
        main_finetune.cli(["--model", "vit_tiny_patch4", "--finetune", missing, "--epochs", "1",
                           "--output_dir", str(tmp_path / "o")])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was built or written


# ----------------------------------------------------------------------------------- in process
def _args(*argv):
    args = main_finetune.get_args_parser().parse_args(list(argv))
    main_finetune.resolve_defaults(args)
    return args


def test_recipe_defaults():
    ft = _args()
    assert (ft.blr, ft.weight_decay, ft.epochs, ft.layer_decay, ft.mixup, ft.global_pool) == (1e-3, 0.05, 50, 0.75, 0.8, True)
    assert ft.input_size == 224 and ft.aa == "rand-m9-mstd0.5-inc1"
    lp = _args("--linprobe", "--model", "vit_tiny_patch4")
    assert (lp.blr, lp.weight_decay, lp.epochs, lp.mixup, lp.cutmix, lp.aa, lp.global_pool) == (0.1, 0.0, 90, 0.0, 0.0, None, False)
    assert lp.input_size == 32
    assert _args("--local-rank", "3").local_rank == 3 and _args("--local_rank", "2").local_rank == 2
    assert _args("--cls_token").global_pool is False


@pytest.mark.parametrize("argv, words", [
    (["--linprobe", "--mixup", "0.8"], "--mixup"),
    (["--accum_iter", "0"], "--accum_iter"),
    (["--batch_size", "63"], "even --batch_size"),
    (["--eval"], "--resume"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
])
def test_bad_flags_raise_config_error(argv, words):
    with pytest.raises(main_finetune.ConfigError, match=words.replace("-", r"\-")):
        args = _args(*argv)
        main_finetune.validate_args(args)


def test_mismatched_checkpoint_is_refused(pretrain_ckpt, tmp_path):
    model = models_vit.vit_tiny_patch4(num_classes=10)
    sd = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)["model"]
    bad = dict(sd)
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 256, 192)
    path = tmp_path / "bad.pth"
    torch.save({"model": bad}, path)
    with pytest.raises(main_finetune.ConfigError, match="blocks.0.attn.qkv.weight"):
        main_finetune.load_pretrained(model, str(path), global_pool=True, head_std=2e-5)
    deeper = dict(sd, **{"blocks.6.norm1.weight": torch.ones(192)})  # a 7-block encoder's extra block
    torch.save({"model": deeper}, path)
    with pytest.raises(main_finetune.ConfigError, match="blocks.6.norm1.weight"):
        main_finetune.load_pretrained(model, str(path), global_pool=True, head_std=2e-5)
    # the right checkpoint loads; a head of another size is dropped and re-initialised
    info = main_finetune.load_pretrained(model, pretrain_ckpt, global_pool=True, head_std=2e-5)
    assert set(info["missing_keys"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert model.head.weight.std() < 1e-4


def test_eval_sampler_partitions_val_set():
    n, world = 297, 4
    shards = [list(main_finetune.EvalShardSampler(n, r, world, shard=True)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    whole = [list(main_finetune.EvalShardSampler(n, r, world, shard=False)) for r in range(world)]
    assert whole[0] == list(range(n)) and not any(whole[1:])


def test_posterize_fix_gives_black_image_at_zero_bits():
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    from util.image_transforms import _posterize_keeping_zero_bits, finetune_train_transform

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert _posterize_keeping_zero_bits(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert _posterize_keeping_zero_bits(img, 8) is img
    assert _posterize_keeping_zero_bits(img, 1).getpixel((0, 0)) == (128, 0, 0)
    # MAE's RandAugment recipe gets the safe op
    tf = finetune_train_transform("digits", 32, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", [])]
    posterize_ops = [op for op in ops if isinstance(op, AugmentOp) and "Posterize" in op.name]
    assert posterize_ops and all(op.aug_fn is _posterize_keeping_zero_bits for op in posterize_ops)


def test_non_finite_loss_names_epoch_and_step():
    import argparse

    import engine_finetune
    from util import engine
    from util.amp import ScaledOptimizerStep

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.flatten(1)[:, :10] * self.w * float("nan")

    model = NaNModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,)))] * 2
    args = argparse.Namespace(accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=5, precision="fp32")
    with pytest.raises(FloatingPointError, match=r"epoch 3, step 0"):
        engine.train_one_epoch(model, batches, opt, ScaledOptimizerStep(None, "cpu"), 3, args,
                               engine_finetune.SupervisedLoss(model, torch.nn.CrossEntropyLoss(), "cpu", 3))


# ------------------------------------------------------------------------ MAE's own checkpoints (issue 9, 12)
class _NotPlainData:
    pass


def _mae_style_checkpoint(path, args):
    """What MAE's main_finetune.py saves: model, optimizer, epoch, scaler, and `args` as an argparse.Namespace."""
    from util import lr_decay

    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch4(num_classes=10, img_size=16)
    groups = lr_decay.param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.75)
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.AdamW(groups, lr=1e-3).state_dict(),
                "epoch": 0, "scaler": {}, "args": args}, path)


def test_mae_checkpoints_with_namespace_args_load_for_eval_resume_and_finetune(pretrain_ckpt, tmp_path, capsys):
    path = str(tmp_path / "mae-checkpoint-0.pth")
    mae_args = argparse.Namespace(model="vit_tiny_patch4", batch_size=64, input_size=16, nb_classes=10)
    _mae_style_checkpoint(path, mae_args)
    common = ["--model", "vit_tiny_patch4", "--input_size", "16", "--num_workers", "0", "--batch_size", "64",
              "--resume", path]
    stats = main_finetune.main(_args(*common, "--eval", "--output_dir", str(tmp_path / "eval")))
    assert stats["num_samples"] == 297 and 0.0 <= stats["acc1"] <= 100.0
    # --resume restores model, optimizer and scaler and continues after epoch 0 (nothing left of 1 epoch)
    summary = main_finetune.main(_args(*common, "--epochs", "1", "--output_dir", str(tmp_path / "resume")))
    assert "continuing at epoch 1, with optimizer and scaler" in capsys.readouterr().out
    assert summary["resumed_from"] == path and summary["final_acc1"] == pytest.approx(stats["acc1"])
    # --finetune from a pre-training checkpoint in MAE's format (args as a Namespace)
    pre = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)
    mae_pre = str(tmp_path / "mae-pretrain.pth")
    torch.save({**pre, "args": argparse.Namespace(model="mae_vit_tiny_patch4")}, mae_pre)
    info = main_finetune.load_pretrained(models_vit.vit_tiny_patch4(num_classes=10), mae_pre, True, 2e-5)
    assert set(info["missing_keys"]) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_checkpoint_with_another_class_is_refused_by_name(tmp_path, capsys):
    path = str(tmp_path / "other.pth")
    torch.save({"model": models_vit.vit_tiny_patch4(num_classes=10, img_size=16).state_dict(), "epoch": 0,
                "args": _NotPlainData()}, path)
    with pytest.raises(SystemExit) as e:
        main_finetune.cli(["--model", "vit_tiny_patch4", "--input_size", "16", "--num_workers", "0", "--eval",
                           "--resume", path, "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "test_finetune._NotPlainData" in err and "not plain data" in err and "Fix:" in err


def test_non_finite_loss_on_one_rank_stops_both():
    from conftest import run_torchrun

    res = run_torchrun(2, ["tests/dist_finetune_nan_worker.py"], timeout=120)  # a hang would time out
    assert res.returncode != 0
    # every rank names the same value, epoch, step and rank: the one that saw it, not only itself
    line = "stopped: non-finite training loss (nan) at epoch 0, step 1 (of steps 0-2; seen on rank 1; all ranks stopped)"
    for rank in (0, 1):
        assert f"rank {rank} {line}" in res.stderr, res.stderr[-3000:]


def test_last_partial_accumulation_group_is_scaled_in_finetuning():
    """accum_iter 2 over 3 steps: the last group (one micro-batch) is stepped with its full loss."""
    import argparse

    import engine_finetune
    from util import engine
    from util.amp import ScaledOptimizerStep

    class Scalar(torch.nn.Module):  # output = theta * x: d loss / d theta = mean(x) with the mean criterion
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.theta * x

    model = Scalar()
    batches = [(torch.tensor([[float(c)]]), torch.zeros(1)) for c in (1, 3, 8)]
    args = argparse.Namespace(accum_iter=2, lr=1.0, min_lr=1.0, warmup_epochs=0, epochs=1, precision="fp32")
    engine.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=1.0), ScaledOptimizerStep(None, "cpu"),
                           0, args, engine_finetune.SupervisedLoss(model, lambda out, _: out.mean(), "cpu", 0))
    assert model.theta.item() == -((1 + 3) / 2 + 8)


# ------------------------------------------------------- seeded RandAugment and Mixup (issue 9, item 1)
def test_finetune_resume_with_workers_equals_straight_run(pretrain_ckpt, tmp_path):
    """--num_workers 2 (persistent workers), RandAugment, mixup + cutmix (per element, so every step draws
    both modes): 2 epochs straight == 1 epoch + --auto_resume + 1 epoch, bit for bit. The warm-up covers both
    epochs, so the lr schedule does not depend on --epochs and the 1-epoch run is the 2-epoch run's first half.
    Before, RandAugment chose its ops from the workers' numpy RNG (seeded once per worker start: the resumed
    run's workers replayed epoch 0) and Mixup drew from the unseeded numpy RNG of the training process."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "100", "--num_workers", "2",
              "--finetune", pretrain_ckpt, "--warmup_epochs", "4", "--aa", "rand-m9-mstd0.5-inc1",
              "--mixup", "0.8", "--cutmix", "1.0", "--mixup_mode", "elem", "--reprob", "0.25"]
    main_finetune.main(_args(*common, "--epochs", "2", "--output_dir", str(straight)))
    main_finetune.main(_args(*common, "--epochs", "1", "--output_dir", str(resumed)))
    main_finetune.main(_args(*common, "--epochs", "2", "--output_dir", str(resumed), "--auto_resume"))
    a = torch.load(straight / "checkpoint-1.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(resumed / "checkpoint-1.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _op_pair_counts(augment, n_ops: int, draws: int) -> torch.Tensor:
    """How often each ordered pair (first op, second op) is chosen in `draws` calls of a 2-layer RandAugment."""
    import random

    random.seed(0)  # SeededItems seeds Python's RNG per item; here once, for a fixed sample
    counts = torch.zeros(n_ops, n_ops, dtype=torch.float64)
    for _ in range(draws):
        first, second = augment.choose_ops()
        counts[first, second] += 1
    return counts


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a pair timm never draws was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_seeded_rand_augment_draws_timm_op_distribution():
    """timm: np.random.choice(ops, 2, replace=weights is None, p=weights). Unweighted: 225 equally likely
    ordered pairs, repeats included; weighted: no repeats, P(i, j) = p_i p_j / (1 - p_i). Pearson's
    chi-square over 40,000 draws (fixed seed) against these exact probabilities; a wrong rule (e.g. no
    repeats without weights, or weights ignored) gives values far above the ~5-sigma bound used here."""
    import numpy as np

    from util.augment import SeededRandAugment

    n = 15
    uniform = SeededRandAugment(list(range(n)), 2)
    chi = _chi_square(_op_pair_counts(uniform, n, 40_000), torch.full((n, n), 1.0 / n ** 2, dtype=torch.float64))
    assert chi < 224 + 5 * (2 * 224) ** 0.5, chi  # 224 degrees of freedom

    p = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05], dtype=torch.float64)
    weighted = SeededRandAugment(list(range(len(p))), 2, choice_weights=p.numpy())
    pairs = p[:, None] * p[None, :] / (1 - p[:, None])
    pairs.fill_diagonal_(0.0)
    assert abs(pairs.sum().item() - 1.0) < 1e-12
    # these are numpy's probabilities: its legacy choice (timm's, here from a RandomState instance) fits them
    legacy, counts = np.random.RandomState(0), torch.zeros_like(pairs)
    for _ in range(20_000):
        first, second = legacy.choice(len(p), 2, replace=False, p=p.numpy())
        counts[first, second] += 1
    assert _chi_square(counts, pairs) < 41 + 5 * (2 * 41) ** 0.5
    chi = _chi_square(_op_pair_counts(weighted, len(p), 40_000), pairs)
    assert chi < 41 + 5 * (2 * 41) ** 0.5, chi  # 42 possible pairs
    with pytest.raises(ValueError, match="non-zero weight"):
        SeededRandAugment([0, 1], 2, choice_weights=[1.0, 0.0]).choose_ops()


def test_finetune_transform_uses_python_random_only():
    """MAE's recipe gets SeededRandAugment (same ops), and a training transform touches no numpy global RNG:
    with Python's and torch's RNG seeded, it is a pure function of the image. timm's RandAugment advanced
    numpy's global RNG on every call."""
    import random

    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    from util.augment import SeededRandAugment
    from util.image_transforms import finetune_train_transform

    tf = finetune_train_transform("digits", 16, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    augments = [t for t in tf.transforms if isinstance(t, RandAugment)]
    assert len(augments) == 1 and type(augments[0]) is SeededRandAugment
    assert augments[0].num_layers == 2 and len(augments[0].ops) == 15
    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    before = np.random.get_state()[1].copy()
    outs = []
    for _ in range(2):
        random.seed(7)
        torch.manual_seed(7)
        outs.append(torch.stack([tf(img) for _ in range(20)]))
    assert np.array_equal(np.random.get_state()[1], before)
    assert torch.equal(outs[0], outs[1])


def test_seeded_mixup_is_a_function_of_seed_epoch_rank_step():
    """Same (seed, epoch, rank, step) -> same lambdas, modes and mixed images, whatever was drawn before and
    without numpy's global RNG; another step, epoch or rank -> other draws. The distribution is timm's: per
    element, cutmix is chosen with switch_prob and mixup's lambda ~ Beta(0.8, 0.8) (mean 1/2, variance
    1/(4 (2 alpha + 1)) = 0.0962)."""
    import numpy as np

    from util.augment import SeededMixup

    def mixup(seed=0, rank=0, mode="elem", **kw):
        return SeededMixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=10,
                           seed=seed, rank=rank, **kw)

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    before = np.random.get_state()[1].copy()
    for mode in ("elem", "pair", "batch"):
        outs = []
        m = mixup(mode=mode)
        for warmup_steps in (0, 3):  # draws in between do not matter
            for s in range(warmup_steps):
                m.reseed(5, s)
                m(x.clone(), y)
            m.reseed(2, 7)
            outs.append(m(x.clone(), y))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), mode
    assert np.array_equal(np.random.get_state()[1], before)

    def params(m, epoch, step):
        m.reseed(epoch, step)
        return m._params_per_elem(64)

    m = mixup()
    lam, cut = params(m, 2, 7)
    for other in (params(m, 2, 8), params(m, 3, 7), params(mixup(rank=1), 2, 7), params(mixup(seed=1), 2, 7)):
        assert not np.array_equal(other[0], lam)
    lams, cuts = zip(*(params(m, 0, s) for s in range(500)))
    lams, cuts = np.concatenate(lams), np.concatenate(cuts)
    assert abs(cuts.mean() - 0.5) < 0.01  # 32,000 coin flips: sd 0.0028
    mix = lams[~cuts]
    assert abs(mix.mean() - 0.5) < 0.01 and abs(mix.var() - 1 / (4 * 2.6)) < 0.005
    # CutMix boxes: the corrected lambda is 1 - box area / image area, in [0, 1]
    m = SeededMixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=10, seed=0, rank=0)
    m.reseed(0, 0)
    (yl, yh, xl, xh), lam = m.cutmix_bbox_and_lam((3, 16, 16), 0.75)
    assert 0 <= yl <= yh <= 16 and 0 <= xl <= xh <= 16 and lam == 1 - (yh - yl) * (xh - xl) / 256


def test_effective_batch_above_the_training_set_is_refused():
    """A linear probe whose effective batch exceeds the training set would make one optimizer step per epoch."""
    args = _args("--linprobe", "--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "64",
                 "--accum_iter", "32", "--num_workers", "0")
    with pytest.raises(main_finetune.ConfigError, match=r"effective batch \(--batch_size 64 x --accum_iter 32 x 1 "
                       r"rank\(s\) = 2048\) is larger than the training set \(1500 images\).*Fix: lower --batch_size "
                       r"or --accum_iter"):
        main_finetune.build_loaders(args)
    args.accum_iter = 23  # 1472 <= 1500: accepted
    assert len(main_finetune.build_loaders(args)[0]) == 1500


def test_effective_batch_refusal_exits_2_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main_finetune.cli(["--linprobe", "--model", "vit_tiny_patch4", "--input_size", "16", "--batch_size", "64",
                           "--accum_iter", "32", "--num_workers", "0", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "= 2048) is larger than the training set (1500 images)" in err and "Fix:" in err


@pytest.mark.parametrize("data_set,rate", [("cifar10", 0.5), ("folder", 0.5), ("digits", 0.0)])
def test_finetune_transform_flips_natural_images_half_the_time_and_digits_never(data_set, rate):
    """Issue 29 item 8 (a surviving mutant): the horizontal flip of MAE's fine-tuning recipe, off for digits
    (a mirrored digit is another glyph). A left-to-right intensity ramp stays increasing under any crop and
    resize; only a flip turns it around."""
    import numpy as np
    from PIL import Image

    from util.image_transforms import finetune_train_transform

    ramp = np.repeat(np.repeat((np.arange(32) * 8).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    img = Image.fromarray(ramp)
    tf = finetune_train_transform(data_set, 16)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(200):
        out = tf(img)
        flipped += int(out[:, :, 0].mean() > out[:, :, -1].mean())
    assert abs(flipped / 200 - rate) <= 0.1, flipped
