"""tools/reproduce_table1.sh end to end at tiny sizes: digits at equal ratio, the CIFAR-10 block, any ImageFolder."""
from __future__ import annotations

import json
import os
import pickle
import subprocess

import numpy as np
from PIL import Image

from conftest import REPO


def run_recipe(out, timeout=900, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               **{k: str(v) for k, v in env_vars.items()})
    return subprocess.run(["bash", "tools/reproduce_table1.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _summary(path):
    with open(path) as f:
        return json.load(f)


def test_digits_equal_ratio_recipe(tmp_path):
    out = tmp_path / "out"
    res = run_recipe(out, ARMS="d3p infobatch dynunc", RATIO="match", SEEDS="0", EPOCHS=4, LP_EPOCHS=1,
                     FT_SEEDS="none", STATIC_WARMUP=2, PRETRAIN_ARGS="--train_subset 192")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d3p = _summary(out / "d3p_seed0" / "pretrain" / "summary.json")
    for arm in ("infobatch_eq", "dynunc_eq"):
        match = _summary(out / f"{arm}_seed0" / "ratio_match.json")
        assert match["target_ratio"] == d3p["prune_ratio"]
        flags = _summary(out / f"{arm}_seed0" / "pretrain" / "summary.json")["flags"]
        assert flags["prune_ratio"] == match["flags"]["prune_ratio"]
    # Dyn-Unc's ratio is exact up to rounding of the kept count: r (E - J) / E with r = target E / (E - J)
    dynunc = _summary(out / "dynunc_eq_seed0" / "pretrain" / "summary.json")
    assert abs(dynunc["prune_ratio"] - d3p["prune_ratio"]) <= 3 / (4 * 192)
    knn = _summary(out / "d3p_seed0" / "knn" / "summary.json")
    assert knn["mode"] == "knn" and knn["k"] == 20 and 0 <= knn["top1"] <= 100
    table = (out / "table1.md").read_text()
    assert "k-NN top-1 (%)" in table.splitlines()[0]
    assert "| InfoBatch (= D3P ratio) |" in table and "| Dyn-Unc (= D3P ratio) |" in table
    assert "| InfoBatch |" in table  # the calibration run at the default ratio
    # resumable: a second call skips every finished stage and prints the same table
    again = run_recipe(out, ARMS="d3p infobatch dynunc", RATIO="match", SEEDS="0", EPOCHS=4, LP_EPOCHS=1,
                       FT_SEEDS="none", STATIC_WARMUP=2, PRETRAIN_ARGS="--train_subset 192")
    assert again.returncode == 0 and "start " not in again.stdout and (out / "table1.md").read_text() == table


def _fake_cifar(root, rng):
    """torchvision's CIFAR pickle layout with a few images per file (class = dominant colour channel + noise)."""
    def batch(n, classes, key):
        labels = rng.integers(0, classes, size=n)
        images = rng.integers(0, 120, size=(n, 3, 32, 32), dtype=np.uint8)
        images[np.arange(n), labels % 3] += 120
        return {"data": images.reshape(n, -1), key: labels.tolist()}

    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (c10 / name).write_bytes(pickle.dumps(batch(16, 10, "labels")))
    (c10 / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    c100 = root / "cifar-100-python"
    c100.mkdir()
    (c100 / "train").write_bytes(pickle.dumps(batch(80, 100, "fine_labels")))
    (c100 / "test").write_bytes(pickle.dumps(batch(16, 100, "fine_labels")))
    (c100 / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"f{i}" for i in range(100)]}))


def test_cifar10_block_recipe(tmp_path):
    data = tmp_path / "cifar"
    _fake_cifar(data, np.random.default_rng(0))
    out = tmp_path / "out"
    res = run_recipe(out, DATA_SET="cifar10", DATA_PATH=data, ARMS="d3p", EPOCHS=2, FT_EPOCHS=1, LP_EPOCHS=1,
                     BATCH=16, LP_BATCH=16, NUM_WORKERS=0)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for arm in ("d3p",):
        pre = _summary(out / f"{arm}_seed0" / "pretrain" / "summary.json")
        assert pre["data_set"] == "cifar10" and pre["num_samples"] == 80 and pre["model"] == "mae_vit_tiny_patch4"
        assert _summary(out / f"{arm}_seed0" / "knn" / "summary.json")["num_val"] == 16
        assert _summary(out / f"{arm}_seed0" / "finetune" / "summary.json")["nb_classes"] == 10
        assert _summary(out / f"{arm}_seed0" / "finetune_cifar100" / "summary.json")["nb_classes"] == 100
        assert _summary(out / f"{arm}_seed0" / "linprobe" / "summary.json")["mode"] == "linprobe"
    header = (out / "table1.md").read_text().splitlines()[0]
    assert "| k-NN top-1 (%) | FT top-1 (%) | FT cifar100 top-1 (%) | LP top-1 (%) |" in header


def test_any_image_folder_recipe(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "folder"
    for split, n in (("train", 24), ("val", 8)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = data / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 30, size=(20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "out"
    res = run_recipe(out, DATA_SET="folder", DATA_PATH=data, MODEL="mae_vit_tiny_patch4", INPUT_SIZE=16, EPOCHS=2,
                     ARMS="d3p", FT_EPOCHS=1, LP_EPOCHS=1, BATCH=8, ACCUM=1, LP_ACCUM=1, NUM_WORKERS=0)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    pre = _summary(out / "d3p_seed0" / "pretrain" / "summary.json")
    assert pre["data_set"] == "folder" and pre["num_samples"] == 48 and pre["epochs"] == 2
    assert _summary(out / "d3p_seed0" / "finetune" / "summary.json")["model"] == "vit_tiny_patch4"
    knn = _summary(out / "d3p_seed0" / "knn" / "summary.json")
    assert knn["num_train"] == 48 and knn["num_val"] == 16 and knn["input_size"] == 16
    assert "| D3P |" in (out / "table1.md").read_text()
    bad = run_recipe(tmp_path / "bad", DATA_SET="folder", DATA_PATH=data, MODEL="vit_tiny_patch4", EPOCHS=2)
    assert bad.returncode == 2 and "MODEL must be an MAE model" in bad.stderr


def test_digits_converged_plan_rs2_and_equal_compute(tmp_path):
    out = tmp_path / "out"
    res = run_recipe(out, timeout=1800, PLAN="converged", ARMS="none d3p rs2 whole_eqc", SEEDS="0", EPOCHS=5,
                     LP_EPOCHS=1, PRETRAIN_ARGS="--train_subset 192")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d3p = _summary(out / "d3p_seed0" / "pretrain" / "summary.json")
    assert d3p["prune_ratio"] > 0
    rs2 = _summary(out / "rs2_eq_seed0" / "pretrain" / "summary.json")
    assert rs2["method"] == "rs2" and rs2["flags"]["prune_ratio"] == d3p["prune_ratio"]
    match = _summary(out / "whole_eqc_seed0" / "ratio_match.json")
    eqc = _summary(out / "whole_eqc_seed0" / "pretrain" / "summary.json")
    cost = d3p["samples_trained"] + d3p["samples_forward_only"] / 3
    assert eqc["method"] == "none" and eqc["epochs"] == match["flags"]["epochs"] == round(cost / 192)
    assert eqc["samples_trained"] == eqc["epochs"] * 192  # whole data, fewer epochs
    assert (out / "whole_eqc_seed0" / "pretrain" / f"checkpoint-{eqc['epochs'] - 1}.pth").is_file()
    assert _summary(out / "whole_eqc_seed0" / "knn" / "summary.json")["mode"] == "knn"
    table = (out / "table1.md").read_text()
    assert "| RS2 (= D3P ratio) |" in table and "| Train less: Whole, " in table and "vs Train less" in table
    assert (out / "figure.png").stat().st_size > 10_000


def _jobs(plan: subprocess.CompletedProcess) -> list[str]:
    assert plan.returncode == 0, plan.stderr
    return next(line for line in plan.stdout.splitlines() if line.startswith("jobs: "))[len("jobs: "):].split()


def test_converged_plan_calibrates_infobatch_once_for_every_seed(tmp_path):
    # the plan: InfoBatch's default-ratio run only for the first seed (CALIBRATE=first); each seed with CALIBRATE=each
    plan = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="converged", SEEDS="3 5"))
    assert [j for j in plan if j.startswith("infobatch")] == ["infobatch:3", "infobatch_eq:3", "infobatch_eq:5"]
    each = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="converged", SEEDS="3 5", CALIBRATE="each"))
    assert [j for j in each if j.startswith("infobatch:")] == ["infobatch:3", "infobatch:5"]
    sweep = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="sweep", SEEDS="0 1"))
    assert "infobatch:0" in sweep and "infobatch:1" not in sweep and "infobatch_p30:1" in sweep
    table1 = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="table1", SEEDS="0 1"))
    assert {"infobatch:0", "infobatch:1"} <= set(table1)  # table1's default-ratio runs are rows: every seed
    bad = run_recipe(tmp_path / "plan", PLAN_ONLY=1, CALIBRATE="once")
    assert bad.returncode == 2 and "CALIBRATE=once: choose first or each" in bad.stderr
    # run: seed 1's equal-ratio arm takes its flag from seed 0's calibration run, and seed 1 runs none of its own
    out = tmp_path / "out"
    res = run_recipe(out, timeout=1800, PLAN="converged", ARMS="d3p infobatch", SEEDS="0 1", EPOCHS=4,
                     PRETRAIN_ARGS="--train_subset 192")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not (out / "infobatch_seed1").exists()
    for seed in (0, 1):
        match = _summary(out / f"infobatch_eq_seed{seed}" / "ratio_match.json")
        assert match["calibration_run"] == os.path.abspath(out / "infobatch_seed0" / "pretrain")
        assert match["target_ratio"] == _summary(out / f"d3p_seed{seed}" / "pretrain" / "summary.json")["prune_ratio"]


def test_sweep_plan_skips_a_ratio_out_of_reach(tmp_path):
    out = tmp_path / "out"
    res = run_recipe(out, timeout=1800, PLAN="sweep", SWEEP_RATIOS="70", SWEEP_METHODS="infobatch d3p whole_eqc",
                     SEEDS="0", EPOCHS=4, LP_EPOCHS=1, PRETRAIN_ARGS="--train_subset 192")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # D3P's sweep arm is solved for the column's compute (--by_compute): 1 pruned epoch of 4 saves at most 25%
    assert "SKIP d3p_p70_seed0: error: D3P saves at most 25.0% of the compute" in res.stdout
    # InfoBatch prunes at most (its below-mean fraction x the pruned epochs) / E: 70% is out of reach -> skipped
    assert "SKIP infobatch_p70_seed0" in res.stdout and not (out / "infobatch_p70_seed0" / "pretrain").exists()
    eqc = _summary(out / "whole_eqc_p70_seed0" / "pretrain" / "summary.json")
    assert eqc["epochs"] == 1  # round(0.3 x 4)
    table = (out / "table1.md").read_text()
    assert "| Train less: Whole, 1 of 4 epochs (= the compute of 70% pruned) |" in table


def test_folder_plan_fits_the_batches_to_a_small_folder(tmp_path):
    data = tmp_path / "folder"
    for split, n in (("train", 4000), ("val", 2)):
        folder = data / split / "c0"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.png").touch()
    plan = run_recipe(tmp_path / "out", PLAN_ONLY=1, DATA_SET="folder", DATA_PATH=data, EPOCHS=10)
    assert plan.returncode == 0, plan.stderr
    lines = dict(line.split(": ", 1) for line in plan.stdout.splitlines() if ": " in line)
    # effective batches <= N / 32 = 125: pre-training 64 (BATCH lowered from 128), linear probe 64 at MAE's lr 6.4
    assert "--batch_size 64 --accum_iter 1 --blr 1.5e-4" in lines["pretrain"]
    assert "--batch_size 64 --accum_iter 1 --blr 25.6 " in lines["linprobe"]
    assert not (tmp_path / "out").exists()  # PLAN_ONLY writes nothing
    given = run_recipe(tmp_path / "out", PLAN_ONLY=1, DATA_SET="folder", DATA_PATH=data, EPOCHS=10, BATCH=128)
    assert given.returncode == 2 and "Fix: BATCH=64, or set ACCUM" in given.stderr
    for i in range(3800):
        (data / "train" / "c0" / f"{i}.png").unlink()
    small = run_recipe(tmp_path / "out", PLAN_ONLY=1, DATA_SET="folder", DATA_PATH=data, EPOCHS=10)
    assert small.returncode == 2 and "too few for a linear probe" in small.stderr and "LP_BATCH" in small.stderr


def test_plans_hold_orderdp_d3p_at_a_ratio_and_random_static(tmp_path):
    """converged: OrderDP at D3P's ratio (no default-ratio OrderDP run); sweep: D3P (--d3p_target_ratio), OrderDP
    and random_static at every ratio."""
    converged = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="converged", SEEDS="0 1"))
    assert [j for j in converged if j.startswith("orderdp")] == ["orderdp_eq:0", "orderdp_eq:1"]
    sweep = _jobs(run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="sweep", SEEDS="0"))
    for pct in (30, 50, 70):
        assert {f"d3p_p{pct}:0", f"orderdp_p{pct}:0", f"random_static_p{pct}:0", f"whole_eqc_p{pct}:0"} <= set(sweep)
    assert "d3p:0" not in sweep  # D3P runs at the sweep's ratios only
    bad = run_recipe(tmp_path / "plan", PLAN_ONLY=1, PLAN="sweep", SWEEP_METHODS="d3p topk")
    assert bad.returncode == 2 and "SWEEP_METHODS: topk is not one of" in bad.stderr
