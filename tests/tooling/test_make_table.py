"""tools/make_table.py on hand-written summary.json fixtures (no training)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO as ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_table  # noqa: E402

N, E = 1000, 10


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def arm(root, name, method, *, seed=0, trained=None, fwd=0, wall=100.0, ft=None, lp=None, flags=None,
        layout="arm", knn=None, ft2=None, ratio_match=None, epochs=E):
    """An arm folder (layout='arm': NAME/{pretrain,finetune,linprobe}) or a bare pre-training folder
    (layout='bare': NAME/summary.json with siblings NAME_finetune/, NAME_linprobe/)."""
    folder = root / name
    pre_dir = folder / "pretrain" if layout == "arm" else folder
    trained = N * epochs if trained is None else trained
    _write(pre_dir / "summary.json", {
        "mode": "pretrain", "method": method, "epochs": epochs, "num_samples": N, "samples_trained": trained,
        "samples_forward_only": fwd, "optimizer_steps": trained // 64, "prune_ratio": 1 - trained / (N * epochs),
        "compute_saved": 1 - (trained + fwd / 3) / (N * epochs), "wall_seconds": wall, "data_seconds": 1.0,
        "flags": flags or {}, "model": "mae_vit_tiny_patch4", "data_set": "digits", "seed": seed, "world_size": 1,
    })
    for mode, acc in (("finetune", ft), ("linprobe", lp)):
        if acc is None:
            continue
        down = folder / mode if layout == "arm" else root / f"{name}_{mode}"
        _write(down / "summary.json", {"mode": mode, "best_acc1": acc + 1.0, "final_acc1": acc, "final_acc5": 99.0,
                                       "wall_seconds": 5.0, "finetune": str(pre_dir / f"checkpoint-{E - 1}.pth")})
    if knn is not None:
        down = folder / "knn" if layout == "arm" else root / f"{name}_knn"
        _write(down / "summary.json", {"mode": "knn", "top1": knn, "top5": 99.0, "k": 20, "temperature": 0.07,
                                       "checkpoint": str(pre_dir / f"checkpoint-{E - 1}.pth")})
    if ft2 is not None:
        _write(folder / "finetune_cifar100" / "summary.json", {"mode": "finetune", "best_acc1": ft2, "final_acc1": ft2})
    if isinstance(ratio_match, dict):  # as written: the sweep (no target_run) or whole_eqc
        _write(folder / "ratio_match.json", ratio_match)
    elif ratio_match is not None:  # at the prune ratio of the D3P arm of the seed (tools/match_ratio.py)
        _write(folder / "ratio_match.json", {"method": method, "target_ratio": ratio_match,
                                             "target_run": str(root / f"d3p_seed{seed}" / "pretrain"),
                                             "flags": {"prune_ratio": (flags or {}).get("prune_ratio")}})
    return str(folder)


def rows_by_key(dirs, acc="final"):
    runs = [make_table.load_run(d) for d in dirs]
    return {r["key"]: r for r in make_table.build_rows([r for r in runs if r], acc)}


def test_deltas_arrows_and_savings_against_whole(tmp_path):
    dirs = [
        arm(tmp_path, "none", "none", wall=200.0, ft=83.3, lp=65.4),
        arm(tmp_path, "infobatch", "infobatch", trained=7120, wall=150.0, ft=82.8, lp=64.0,
            flags={"prune_ratio": 0.5, "delta": 0.875}),
        arm(tmp_path, "d3p", "d3p", trained=6970, fwd=900, wall=160.0, ft=83.3, lp=65.9, flags={"d3p_start": 3}),
        arm(tmp_path, "random", "random", trained=6970, wall=120.0, ft=82.0,
            flags={"prune_ratio": 0.5, "random_match": "x/d3p/pretrain"}),
    ]
    rows = rows_by_key(dirs)
    whole, ib, d3p, rnd = rows["none"], rows["infobatch"], rows["d3p"], rows["random_matched"]
    assert whole["method"] == "Whole dataset" and whole["is_whole"]
    assert ib["method"] == "InfoBatch" and d3p["method"] == "D3P" and rnd["method"] == "Random (matched to D3P)"
    assert make_table.format_cell(whole, "ft_top1", True) == "83.3 (–)"
    assert make_table.format_cell(ib, "ft_top1", True) == "82.8 (↓0.5)"
    assert make_table.format_cell(d3p, "ft_top1", True) == "83.3 (±0.0)"
    assert make_table.format_cell(d3p, "lp_top1", True) == "65.9 (↑0.5)"
    assert make_table.format_cell(ib, "prune_ratio") == "28.8"
    # compute saved vs Whole's cost (10000): InfoBatch 1 - 7120/10000; D3P 1 - (6970 + 900/3)/10000
    assert ib["compute_saved"] == pytest.approx(28.8)
    assert d3p["compute_saved"] == pytest.approx(27.3)
    assert make_table.format_cell(d3p, "compute_saved") == "27.3"
    assert whole["compute_saved"] == pytest.approx(0.0)
    # wall-clock saved vs Whole's 200 s
    assert ib["wall_clock_saved"] == pytest.approx(25.0) and d3p["wall_clock_saved"] == pytest.approx(20.0)
    assert make_table.format_cell(rnd, "wall_clock_saved") == "40.0"
    # missing linear probe (still running) -> em dash, no arrow
    assert rnd["lp_top1"] is None and make_table.format_cell(rnd, "lp_top1", True) == "—"

    text = make_table.markdown(list(make_table.build_rows([make_table.load_run(d) for d in dirs])), "final", [])
    lines = text.splitlines()
    assert lines[0] == ("| Method | Prune ratio (%) | k-NN top-1 (%) | FT top-1 (%) | LP top-1 (%) | Compute saved (%) "
                        "| Loader saved (%) | Wall-clock saved (%) |")
    assert [ln.split("|")[1].strip() for ln in lines[2:6]] == [
        "Whole dataset", "InfoBatch", "D3P", "Random (matched to D3P)"]
    assert "| InfoBatch | 28.8 | — | 82.8 (↓0.5) | 64.0 (↓1.4) | 28.8 | 28.8 | 25.0 |" in lines
    # D3P's 900 forward-only samples: a third of the compute, but full decodes (loader saved 1 - 7870/10000)
    assert "| D3P | 30.3 | — | 83.3 (±0.0) | 65.9 (↑0.5) | 27.3 | 21.3 | 20.0 |" in lines
    assert "| Random (matched to D3P) | 30.3 | — | 82.0 (↓1.3) | — | 30.3 | 30.3 | 40.0 |" in lines
    source_line = [ln for ln in lines if ln.startswith("Sources: ")][0]
    assert os.path.join(dirs[0], "pretrain", "summary.json") in source_line
    assert os.path.join(dirs[1], "linprobe", "summary.json") in source_line


def test_missing_finetune_shows_dash(tmp_path):
    dirs = [arm(tmp_path, "none", "none", ft=90.0, lp=80.0), arm(tmp_path, "seta", "seta", trained=5000)]
    rows = rows_by_key(dirs)
    assert make_table.format_cell(rows["seta"], "ft_top1", True) == "—"
    assert make_table.format_cell(rows["seta"], "lp_top1", True) == "—"
    assert make_table.format_cell(rows["seta"], "prune_ratio") == "50.0"


def test_several_seeds_mean_std(tmp_path):
    dirs = [arm(tmp_path, "none", "none", ft=90.0, lp=80.0)]
    for seed, (ft, trained) in enumerate([(88.0, 7000), (89.0, 7000), (90.0, 7300)]):
        dirs.append(arm(tmp_path, f"d3p_s{seed}", "d3p", seed=seed, trained=trained, ft=ft if seed < 2 else ft,
                        lp=70.0 + seed if seed < 2 else None))
    rows = rows_by_key(dirs)
    d3p = rows["d3p"]
    assert d3p["seeds"] == 3 and d3p["seed_list"] == [0, 1, 2]
    assert make_table.format_cell(d3p, "ft_top1", True) == "89.0 ± 1.0 (↓1.0)"  # sample std of 88, 89, 90
    assert make_table.format_cell(d3p, "prune_ratio") == "29.0 ± 1.7"
    assert make_table.format_cell(d3p, "lp_top1", True) == "70.5 ± 0.7 (↓9.5) [2 of 3]"
    text = make_table.markdown(make_table.build_rows([make_table.load_run(d) for d in dirs]), "final", [])
    assert "| D3P (3 seeds) |" in text


def test_bare_pretrain_folder_sibling_lookup_best_acc_and_cli_json(tmp_path):
    whole = arm(tmp_path, "whole", "none", ft=80.0, lp=60.0, layout="bare")
    rnd = arm(tmp_path, "rnd", "random", trained=5000, ft=79.0, flags={"prune_ratio": 0.5, "random_match": None},
              layout="bare")
    os.makedirs(tmp_path / "running" / "pretrain")  # pre-training still running: skipped, named in the footnote
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), whole, rnd,
                          str(tmp_path / "running"), "--json", "--acc", "best"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    rows = {r["key"]: r for r in data["rows"]}
    assert rows["random"]["method"] == "Random"
    assert rows["random"]["ft_top1"] == pytest.approx(80.0) and rows["random"]["ft_top1_delta"] == pytest.approx(-1.0)
    assert rows["none"]["lp_top1"] == pytest.approx(61.0)
    assert data["skipped"] == [str(tmp_path / "running")]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such folder" in bad.stderr


def test_no_pretraining_row(tmp_path):
    whole = arm(tmp_path, "none", "none", ft=90.0, lp=80.0)
    _write(tmp_path / "scratch" / "finetune" / "summary.json",
           {"mode": "finetune", "best_acc1": 70.0, "final_acc1": 70.0, "final_acc5": 95.0, "wall_seconds": 3.0,
            "finetune": None})
    rows = rows_by_key([whole, str(tmp_path / "scratch")])
    assert rows["scratch"]["method"] == "No pre-training"
    assert make_table.format_cell(rows["scratch"], "ft_top1", True) == "70.0 (↓20.0)"
    assert make_table.format_cell(rows["scratch"], "prune_ratio") == "—"


def test_knn_column_equal_ratio_rows_and_second_finetune(tmp_path):
    dirs = [arm(tmp_path, "none", "none", ft=90.0, ft2=70.0, knn=80.0, lp=60.0)]
    for seed, (target, ib_trained, knn) in enumerate([(0.10, 9050, 78.0), (0.12, 8750, 79.0)]):
        dirs.append(arm(tmp_path, f"d3p_seed{seed}", "d3p", seed=seed, trained=round(N * E * (1 - target)),
                        knn=knn + 1.0, flags={"d3p_start": 3}))
        dirs.append(arm(tmp_path, f"infobatch_seed{seed}", "infobatch", seed=seed, trained=7500, knn=70.0,
                        flags={"prune_ratio": 0.5, "delta": 0.875}))
        # at D3P's ratio: a per-seed solved r must not split the seeds into two rows
        dirs.append(arm(tmp_path, f"infobatch_eq_seed{seed}", "infobatch", seed=seed, trained=ib_trained, knn=knn,
                        ft2=68.0 + seed, flags={"prune_ratio": 0.2 + seed / 100, "delta": 0.875},
                        ratio_match=target))
    # a bare pre-training folder finds its k-NN summary by the checkpoint it names
    bare = arm(tmp_path, "seta_run", "seta", trained=5000, flags={"prune_ratio": 0.5}, layout="bare", knn=75.0)
    (tmp_path / "seta_run_knn").rename(tmp_path / "knn_of_seta")
    dirs.append(bare)
    rows = {r["key"]: r for r in make_table.build_rows([make_table.load_run(d) for d in dirs])}
    eq = rows["infobatch@d3p"]
    assert eq["method"] == "InfoBatch (= D3P ratio)" and eq["seeds"] == 2 and eq["equal_ratio"]
    assert not rows["infobatch"]["equal_ratio"] and rows["infobatch"]["method"] == "InfoBatch"
    assert make_table.format_cell(eq, "prune_ratio") == "11.0 ± 2.1"
    assert make_table.format_cell(eq, "knn_top1", True) == "78.5 ± 0.7 (↓1.5)"
    assert make_table.format_cell(rows["d3p"], "knn_top1", True) == "79.5 ± 0.7 (↓0.5)"
    assert make_table.format_cell(rows["seta"], "knn_top1", True) == "75.0 (↓5.0)"
    assert make_table.format_cell(eq, "ft2_top1", True) == "68.5 ± 0.7 (↓1.5)"
    text = make_table.markdown(list(rows.values()), "final", [])
    lines = text.splitlines()
    assert lines[0] == ("| Method | Prune ratio (%) | k-NN top-1 (%) | FT top-1 (%) | FT cifar100 top-1 (%) "
                        "| LP top-1 (%) | Compute saved (%) | Loader saved (%) | Wall-clock saved (%) |")
    assert "| InfoBatch (= D3P ratio) (2 seeds) | 11.0 ± 2.1 | 78.5 ± 0.7 (↓1.5) | — | 68.5 ± 0.7 (↓1.5) | — " \
           "| 11.0 ± 2.1 | 11.0 ± 2.1 | 0.0 ± 0.0 |" in lines
    assert any(ln.startswith("= D3P ratio: ") for ln in lines)
    # equal-ratio rows come after the default-ratio block
    order = [r["key"] for r in make_table.build_rows([make_table.load_run(d) for d in dirs])]
    assert order == ["none", "infobatch", "seta", "d3p", "infobatch@d3p"]
def test_supervised_runs_with_pruning(tmp_path):
    """main_finetune.py --prune_method runs (tools/reproduce_supervised.sh): cost and top-1 from one summary."""
    dirs = []
    for method, seed, trained, acc, flags in (("none", 0, N * E, 90.0, {}), ("none", 1, N * E, 92.0, {}),
                                              ("d3p", 0, 8000, 91.0, {"d3p_start": 2}),
                                              ("random", 0, 8000, 89.0, {"random_match": "x/d3p_seed0"})):
        folder = tmp_path / f"{method}_seed{seed}"
        _write(folder / "summary.json", {
            "mode": "finetune", "finetune": None, "final_acc1": acc, "best_acc1": acc, "method": method, "seed": seed,
            "epochs": E, "num_samples": N, "samples_trained": trained, "samples_forward_only": 0,
            "prune_ratio": 1 - trained / (N * E), "compute_saved": 1 - trained / (N * E), "wall_seconds": 100.0,
            "flags": flags, "model": "vit_tiny_patch4", "data_set": "digits"})
        dirs.append(str(folder))
    rows = rows_by_key(dirs)
    assert rows["none"]["seeds"] == 2 and rows["none"]["ft_top1"] == 91.0
    assert rows["d3p"]["compute_saved"] == pytest.approx(20.0) and rows["d3p"]["ft_top1_delta"] == pytest.approx(0.0)
    assert rows["random_matched"]["prune_ratio"] == pytest.approx(20.0)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), *dirs], capture_output=True,
                         text=True, check=True).stdout
    assert "| Method | Prune ratio (%) | Top-1 (%) | Compute saved (%) | Wall-clock saved (%) |" in out
    assert "| D3P | 20.0 | 91.0 (±0.0) | 20.0 | 0.0 |" in out
    assert "Mislabelled" not in out  # clean-label runs: no noise columns


def test_noisy_label_runs_show_the_mislabelled_shares(tmp_path):
    """tools/train_mlp_digits.py's runs: the share of mislabelled samples among the kept ones and in the weight."""
    dirs = []
    for method, kept, weight, flags in (("none", 0.2, 0.2, {}), ("d3p", 0.25, 0.4, {"d3p_max_weight": 0.0}),
                                        ("d3p", 0.18, 0.18, {"d3p_max_weight": 1.0})):
        folder = tmp_path / f"{method}_{len(dirs)}"
        _write(folder / "summary.json", {
            "mode": "finetune", "final_acc1": 90.0, "method": method, "seed": 0, "epochs": E, "num_samples": N,
            "samples_trained": N * E, "samples_forward_only": 0, "prune_ratio": 0.0, "compute_saved": 0.0,
            "wall_seconds": 1.0, "flags": flags, "model": "mlp", "data_set": "digits", "label_noise": 0.2,
            "mislabelled_kept": kept, "mislabelled_weight": weight})
        dirs.append(str(folder))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), *dirs], capture_output=True,
                         text=True, check=True).stdout
    assert "| Mislabelled in kept (%) | Mislabelled in weight (%) |" in out
    assert "| D3P (d3p_max_weight=0.0) | 0.0 | 90.0 (±0.0) | 0.0 | 0.0 | 25.0 | 40.0 |" in out
    assert "| D3P (d3p_max_weight=1.0) | 0.0 | 90.0 (±0.0) | 0.0 | 0.0 | 18.0 | 18.0 |" in out


def test_paired_difference_matches_scipy_ttest_rel():
    from scipy import stats

    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8):
        a, b = rng.normal(70, 2, n), rng.normal(69, 2, n)
        arm_vals = {seed: float(v) for seed, v in enumerate(a)}
        ctl = {seed: float(v) for seed, v in enumerate(b)}
        ctl[99] = 50.0  # a seed only the control ran: not paired
        diff = make_table.paired_difference(arm_vals, ctl)
        ref = stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        assert diff["n"] == n and diff["seeds"] == list(range(n))
        assert diff["mean"] == pytest.approx(float(np.mean(a - b)), abs=1e-12)
        assert diff["lo"] == pytest.approx(ci.low, abs=1e-9) and diff["hi"] == pytest.approx(ci.high, abs=1e-9)
        assert diff["significant"] == (ref.pvalue < 0.05)  # the 95% interval excludes 0 iff p < 0.05
    # a clear, consistent gap is significant; one paired seed has no interval; no common seed: None
    sig = make_table.paired_difference({0: 80.0, 1: 81.0, 2: 80.5}, {0: 78.0, 1: 78.6, 2: 78.4})
    assert sig["significant"] and sig["lo"] > 0
    one = make_table.paired_difference({0: 80.0, 1: 81.0}, {1: 78.0})
    assert one["n"] == 1 and one["mean"] == 3.0 and one["lo"] is None and not one["significant"]
    assert make_table.paired_difference({0: 1.0}, {1: 1.0}) is None
    assert make_table.format_diff(sig, 3) == f"{sig['mean']:+.1f} [{sig['lo']:+.1f}, {sig['hi']:+.1f}]*"
    assert make_table.format_diff(one, 2) == "+3.0 (n=1)"


def _converged_and_sweep(tmp_path):
    """5 seeds: Whole (10 epochs), D3P, Random matched, RS2 and Train less at D3P's ratio; a 3-seed sweep at 30%."""
    dirs = []
    for seed in range(5):
        noise = 0.2 * seed
        dirs.append(arm(tmp_path, f"none_seed{seed}", "none", seed=seed, knn=80.0 + noise, lp=60.0 + noise))
        dirs.append(arm(tmp_path, f"d3p_seed{seed}", "d3p", seed=seed, trained=9000 + 10 * seed, fwd=300,
                        knn=79.8 + noise + 0.01 * seed, flags={"d3p_start": 3}))
        dirs.append(arm(tmp_path, f"random_seed{seed}", "random", seed=seed, trained=9000 + 10 * seed,
                        knn=78.0 + noise, flags={"prune_ratio": 0.5, "random_match": f"d3p_seed{seed}"}))
        dirs.append(arm(tmp_path, f"rs2_eq_seed{seed}", "rs2", seed=seed, trained=9000, knn=79.0 + noise + 0.1 * seed,
                        flags={"prune_ratio": 0.1 - seed / 1000}, ratio_match=0.1))
        eqc_epochs = 9 if seed < 4 else 8  # round((9000 + 10 s + 100) / 1000): per seed, one row
        dirs.append(arm(tmp_path, f"whole_eqc_seed{seed}", "none", seed=seed, epochs=eqc_epochs, knn=79.8 + noise,
                        ratio_match={"method": "whole_eqc", "target_ratio": 0.1, "full_epochs": E,
                                     "target_run": f"d3p_seed{seed}", "flags": {"epochs": eqc_epochs}}))
    for seed in range(3):
        for method, knn in (("random", 75.0), ("rs2", 76.0)):
            dirs.append(arm(tmp_path, f"{method}_p30_seed{seed}", method, seed=seed, trained=7000, knn=knn + seed,
                            flags={"prune_ratio": 0.3}, ratio_match={"method": method, "target_ratio": 0.3,
                                                                     "flags": {"prune_ratio": 0.3}}))
        dirs.append(arm(tmp_path, f"whole_eqc_p30_seed{seed}", "none", seed=seed, epochs=7, knn=77.0 + seed,
                        ratio_match={"method": "whole_eqc", "target_ratio": 0.3, "full_epochs": E,
                                     "flags": {"epochs": 7}}))
    return dirs


def test_equal_compute_rs2_and_sweep_rows_with_paired_statistics(tmp_path):
    dirs = _converged_and_sweep(tmp_path)
    rows = rows_by_key(dirs)
    assert list(rows) == ["none", "d3p", "random_matched", "rs2@d3p", "whole_eqc@d3p", "random@30", "rs2@30",
                          "whole_eqc@30"]
    eqc = rows["whole_eqc@d3p"]
    assert eqc["seeds"] == 5 and eqc["method"] == "Train less: Whole, 8-9 of 10 epochs (= D3P's compute)"
    assert rows["whole_eqc@30"]["method"] == "Train less: Whole, 7 of 10 epochs (= the compute of 30% pruned)"
    assert rows["rs2@d3p"]["method"] == "RS2 (= D3P ratio)" and rows["rs2@30"]["method"] == "RS2 (30% pruned)"
    assert eqc["compute_saved"] == pytest.approx(100 * (1 - (4 * 9 + 8) / 50))  # epochs / Whole's 10
    assert eqc["prune_ratio"] == 0.0
    d3p = rows["d3p"]["paired"]["knn_top1"]
    assert set(d3p) == {"Whole", "Random", "RS2", "Train less"}  # D3P against the controls at its ratio
    ctl = rows["random_matched"]["paired"]["knn_top1"]
    assert set(ctl) == {"Whole", "RS2", "Train less"}  # the controls against each other
    # D3P minus Whole by seed: -0.2 + 0.01 s -> mean -0.18, std 0.0158: significant
    assert d3p["Whole"]["mean"] == pytest.approx(-0.18) and d3p["Whole"]["significant"]
    rs2 = rows["rs2@d3p"]["paired"]["knn_top1"]
    assert rs2["Random"]["mean"] == pytest.approx(1.2) and rs2["Random"]["control"] == "random_matched"
    assert rs2["Train less"]["mean"] == pytest.approx(-0.6) and rs2["Train less"]["control"] == "whole_eqc@d3p"
    sweep = rows["rs2@30"]["paired"]["knn_top1"]
    assert sweep["Random"]["mean"] == pytest.approx(1.0) and sweep["Random"]["std"] == pytest.approx(0.0)
    assert sweep["Random"]["control"] == "random@30" and sweep["Train less"]["control"] == "whole_eqc@30"
    assert sweep["Whole"]["n"] == 3  # the seeds both ran
    text = make_table.markdown(list(rows.values()), "final", [])
    assert "| Method | k-NN top-1 (%) | vs Whole | vs Random | vs RS2 | vs Train less |" in text
    assert "| D3P (5 seeds) | 80.2 ± 0.3 | -0.2 [-0.2, -0.2]* | +1.8 [+1.8, +1.8]* | +0.6 [+0.4, +0.8]* |" in text
    assert "| LP top-1 (%) | vs Whole |" not in text  # only Whole has a linear probe: nothing to pair
    assert "Train less: the whole data for fewer epochs" in text


def test_cli_plot(tmp_path):
    dirs = _converged_and_sweep(tmp_path)
    fig = tmp_path / "fig.png"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), *dirs, "--plot", str(fig)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000
    assert "vs Train less" in res.stdout


def test_verdict_per_method_against_train_less(tmp_path):
    """One line per method: it pays where its paired interval against Train less lies above 0, at that ratio."""
    dirs = _converged_and_sweep(tmp_path)
    for seed in range(3):  # OrderDP and random_static in the 30% sweep: OrderDP clearly above Train less (77 + s)
        for method, knn in (("orderdp", 78.5 + 0.1 * seed), ("random_static", 76.9 + 0.3 * seed)):
            dirs.append(arm(tmp_path, f"{method}_p30_seed{seed}", method, seed=seed, trained=7000, knn=knn + seed,
                            ratio_match={"method": method, "target_ratio": 0.3, "flags": {}}))
    rows = list(rows_by_key(dirs).values())
    got = {v["key"]: v for v in make_table.verdicts(rows)}
    assert list(got) == ["d3p", "orderdp", "random", "rs2", "random_static"]
    # OrderDP - Train less at 30%: 1.5, 1.6, 1.7 -> mean 1.6, interval [1.35, 1.85]
    assert got["orderdp"]["text"] == "pays at 30% (beats train less by +1.6 [+1.4, +1.8]* k-NN points)"
    assert [x for x, _ in got["orderdp"]["pays"]] == ["30%"]
    # D3P - Train less: 0.01 s over 5 seeds, mean 0.02, interval [+0.0004, +0.0396]: above 0, at D3P's realised
    # ratio 1 - (9000 + 10 s) / 10000, mean 9.8%
    assert got["d3p"]["text"] == "pays at 9.8% (beats train less by +0.0 [+0.0, +0.0]* k-NN points)"
    assert got["d3p"]["pays"][0][1]["lo"] == pytest.approx(0.0003676, abs=1e-6)
    # random: -1.8 (matched to D3P) and -2.0 at 30%: both listed, neither pays
    assert got["random"]["text"].startswith("does not pay here") and len(got["random"]["compared"]) == 2
    # random_static: -0.1 + 0.3 s -> +0.2 [-0.55, +0.95]: not significant
    assert got["random_static"]["pays"] == [] and "at 30%" in got["random_static"]["text"]
    # the random_static row is a control of the others at 30%
    assert rows_by_key(dirs)["orderdp@30"]["paired"]["knn_top1"]["Random static"]["control"] == "random_static@30"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_table.py"), *dirs],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "- OrderDP: pays at 30% (beats train less by +1.6 [+1.4, +1.8]* k-NN points)" in res.stdout
    assert "- Random: does not pay here (vs train less: -1.8 [-1.8, -1.8]* at 9.8%; -2.0 [" in res.stdout


def test_verdict_without_a_train_less_control():
    rows = [{"key": "infobatch", "is_whole": False, "paired": {"knn_top1": {}}, "prune_ratio": 30.0}]
    (v,) = make_table.verdicts(rows)
    assert v["text"].startswith("not compared with train less here") and v["pays"] == []


def test_d3p_sweep_arm_at_the_columns_compute(tmp_path):
    """D3P's sweep arm (match_ratio --by_compute) prunes more than the column's ratio so that, its forward-only
    passes included, it spends the column's compute: it is named by that, paired with the column's controls."""
    dirs = _converged_and_sweep(tmp_path)
    for seed in range(3):  # 30% of the compute saved: 6,700 trained + 900 forward-only / 3 = 7,000 of 10,000
        dirs.append(arm(tmp_path, f"d3p_p30_seed{seed}", "d3p", seed=seed, trained=6700, fwd=900, knn=77.5 + seed,
                        ratio_match={"method": "d3p", "target_ratio": 0.3, "target": "compute_saved",
                                     "flags": {"d3p_target_ratio": 0.358}}))
    rows = rows_by_key(dirs)
    row = rows["d3p@30"]
    assert row["method"] == "D3P (30% compute saved)"
    assert row["prune_ratio"] == pytest.approx(33.0) and row["compute_saved"] == pytest.approx(30.0)
    assert row["paired"]["knn_top1"]["Train less"]["control"] == "whole_eqc@30"
    assert row["paired"]["knn_top1"]["Train less"]["mean"] == pytest.approx(0.5)
    assert rows["rs2@30"]["method"] == "RS2 (30% pruned)"
    assert "(P% compute saved): D3P's sweep arm" in make_table.markdown(list(rows.values()), "final", [])


def test_orderdp_at_d3p_ratio_is_one_row_over_seeds(tmp_path):
    """Each seed's OrderDP arm gets its own solved --orderdp_target_ratio (D3P's ratio of that seed): still one
    configuration, one row with every seed, as for the other arms at D3P's ratio."""
    dirs = _converged_and_sweep(tmp_path)
    for seed in range(5):
        dirs.append(arm(tmp_path, f"orderdp_eq_seed{seed}", "orderdp", seed=seed, trained=9000 + 10 * seed,
                        knn=79.5 + 0.2 * seed, flags={"orderdp_target_ratio": 0.1 - seed / 1000}, ratio_match=0.1))
    rows = rows_by_key(dirs)
    row = rows["orderdp@d3p"]
    assert row["seeds"] == 5 and row["method"] == "OrderDP (= D3P ratio)"
    assert row["paired"]["knn_top1"]["Random"]["control"] == "random_matched"
