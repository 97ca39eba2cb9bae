"""A method of one's own plugs in without editing the repository: tests/plugins/keep_hardest.py registers itself
with @d3p.register_method, and the library, the flags, validation and a training run take it by name."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

import d3p
from conftest import REPO, read_log, run_script
from d3p.registry import Option, import_prune_plugin, register_method
from d3p.stats import FIT_KS_THRESHOLD

PLUGIN = os.path.join(REPO, "tests", "plugins", "keep_hardest.py")


@pytest.fixture(scope="module")
def plugin():
    import_prune_plugin(PLUGIN)
    import_prune_plugin(PLUGIN)  # a second import of the same file registers nothing twice
    return d3p.get_method("keep_hardest")


def test_the_method_is_one_file_that_nothing_else_names():
    """Adding the method touched no file but its own (and this test): no other source file names it."""
    naming = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "build", "output_dir")]
        for name in files:
            if name.endswith((".py", ".sh", ".md", ".toml", ".txt", ".cfg", ".ini")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    if "keep_hardest" in f.read():
                        naming.append(os.path.relpath(path, REPO))
    assert sorted(naming) == ["tests/library/test_method_plugin.py", "tests/plugins/keep_hardest.py"]


def test_data_pruner_builds_it_by_name_and_it_prunes_by_its_rule(plugin):
    assert plugin.kind == "dynamic" and plugin.option_names() == ["hardest_ratio"]
    assert "keep_hardest" in d3p.method_names("dynamic") and "keep_hardest" not in d3p.method_names("static")
    n = 40
    pruner = d3p.DataPruner(n, method="keep_hardest", epochs=3, hardest_ratio=0.25)
    losses = torch.from_numpy(np.random.default_rng(0).permutation(n).astype(np.float32))  # sample i: loss losses[i]
    for epoch in range(3):
        pruner.begin_epoch(epoch)
        kept = torch.from_numpy(pruner.plan.kept)
        pruner.batch_loss(losses[kept], kept)
        pruner.end_epoch(epoch)
    # after epoch 0 every epoch trains on the 30 highest-loss samples (losses are fixed here)
    np.testing.assert_array_equal(pruner.plan.kept, np.sort(np.argsort(-losses.numpy())[:30]))
    assert pruner.summary()["flags"] == {"hardest_ratio": 0.25}
    assert [e["kept"] for e in pruner.ledger.state_dict()["epochs"]] == [40, 30, 30]
    resumed = d3p.DataPruner(n, method="keep_hardest", epochs=3, hardest_ratio=0.25)
    resumed.load_state_dict(pruner.state_dict())
    np.testing.assert_array_equal(resumed.begin_epoch(3).kept, pruner.begin_epoch(3).kept)


def test_its_options_are_flags_validated_by_its_rule(plugin):
    parser = argparse.ArgumentParser()
    d3p.add_pruning_args(parser)
    args = parser.parse_args(["--prune_method", "keep_hardest", "--hardest_ratio", "1.5", "--prune_plugin", PLUGIN])
    assert args.hardest_ratio == 1.5 and args.prune_plugin == [PLUGIN]
    assert d3p.validate_pruning_args(args) == ["--hardest_ratio must lie in [0, 1), got 1.5"]
    with pytest.raises(ValueError, match=r"^hardest_ratio must lie in \[0, 1\), got 1.0"):  # a library call: keywords
        d3p.DataPruner(10, method="keep_hardest", hardest_ratio=1.0)


def test_a_name_or_an_option_taken_by_another_method_is_refused(plugin):
    with pytest.raises(ValueError, match="'d3p' is already registered"):
        register_method("d3p")(type("Other", (d3p.BaseStrategy,), {"name": "d3p"}))
    with pytest.raises(ValueError, match="option 'prune_ratio' is already defined differently"):
        register_method("ratio_again", options=[Option("prune_ratio", 0.3, float)])(lambda num_samples: None)
    with pytest.raises(ValueError, match="reserved"):
        register_method("seeded", options=[Option("seed", 0, int)])(lambda num_samples: None)
    assert "ratio_again" not in d3p.method_names() and "seeded" not in d3p.method_names()


def test_prune_plugin_on_the_command_line_trains_with_it(tmp_path):
    """main_pretrain_d3p.py --prune_plugin FILE: the plugin's method and flag exist before parsing; the run trains
    on its kept sets (a fresh process: nothing imported the plugin before)."""
    out = str(tmp_path / "run")
    res = run_script(["main_pretrain_d3p.py", "--num_workers", "0", "--input_size", "16", "--batch_size", "32",
                      "--train_subset", "64", "--epochs", "2", "--warmup_epochs", "1", "--output_dir", out,
                      "--prune_plugin", "tests/plugins/keep_hardest.py", "--prune_method", "keep_hardest",
                      "--hardest_ratio", "0.5"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["kept"], r["keep_hardest_seen"]) for r in read_log(out)] == [(64, 64), (32, 32)]
    res = run_script(["main_pretrain_d3p.py", "--prune_method", "keep_hardest", "--output_dir", out], timeout=120)
    assert res.returncode == 2 and "invalid choice: 'keep_hardest'" in res.stderr  # without the plugin: unknown


def test_the_builtins_keep_their_names_kinds_flags_and_defaults():
    """The registry reproduces what the lists held before it: every built-in, its kind, and every option's name
    and default (the flags of earlier runs parse to the same values)."""
    from d3p.options import defaults

    builtins = ("d3p", "none", "infobatch", "seta", "random", "dynunc", "d2")
    assert d3p.method_names()[:7] == builtins
    assert d3p.method_names("static")[:2] == ("dynunc", "d2")
    assert defaults(builtins) == {
        "d3p_start": 3, "d3p_period": 10, "d3p_window": 3, "d3p_bins": 128, "d3p_quantile": 0.999,
        "d3p_anneal_epochs": 0, "d3p_max_weight": 0.0, "d3p_min_kept": 0.0, "d3p_poor_fit": "warn",
        "d3p_fit_threshold": FIT_KS_THRESHOLD, "d3p_target_ratio": None, "prune_ratio": 0.5, "delta": 0.875, "seta_groups": 10, "seta_window_scale": 0.5,
        "random_match": None, "static_warmup_epochs": 10, "dynunc_window": 3, "d2_neighbors": 10, "d2_gamma": None,
        "d2_mode": "sum", "d2_sampling": "absolute", "d2_knn": "auto", "d2_knn_index": "auto", "d2_nprobe": 8,
    }
    assert {m: d3p.get_method(m).option_names() for m in builtins} == {
        "d3p": ["d3p_start", "d3p_period", "d3p_window", "d3p_bins", "d3p_quantile", "d3p_anneal_epochs",
                "d3p_max_weight", "d3p_min_kept", "d3p_poor_fit", "d3p_fit_threshold", "d3p_target_ratio"],
        "none": [], "infobatch": ["prune_ratio", "delta"],
        "seta": ["prune_ratio", "delta", "seta_groups", "seta_window_scale"],
        "random": ["prune_ratio", "random_match"], "dynunc": ["prune_ratio", "static_warmup_epochs", "dynunc_window"],
        "d2": ["prune_ratio", "static_warmup_epochs", "d2_neighbors", "d2_gamma", "d2_mode", "d2_sampling", "d2_knn",
               "d2_knn_index", "d2_nprobe"],
    }
    parser = argparse.ArgumentParser()
    d3p.add_pruning_args(parser)
    old_spellings = parser.parse_args(["--s", "4", "--p", "5", "--n", "2", "--bin_num", "64"])
    assert (old_spellings.d3p_start, old_spellings.d3p_period, old_spellings.d3p_window, old_spellings.d3p_bins) == \
        (4, 5, 2, 64)


def test_random_match_takes_kept_counts_and_refuses_a_path():
    """The package reads no run folder: DataPruner takes the counts (util.run_folder reads them from a run)."""
    pruner = d3p.DataPruner(10, "random", epochs=2, random_match=[7, 3])
    assert [pruner.begin_epoch(e).kept.size for e in range(2)] == [7, 3]
    with pytest.raises(TypeError, match="kept counts per epoch"):
        d3p.DataPruner(10, "random", epochs=2, random_match="runs/d3p_seed0")
