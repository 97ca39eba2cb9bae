"""Tests of the offline CLI `python -m d3p.decide` and of the decision figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from d3p.decide import _IMAGE_FORMATS
from d3p.decide import main as decide_main
from d3p.plot import decision_figure, plot_decision
from d3p.stats import decide

REPO = Path(__file__).resolve().parents[2]  # tests/library/ -> the repository
KEYS = {"N", "pruned", "easy", "hard", "trimmed", "upweighted", "prune_ratio", "seconds"}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "d3p.decide", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def losses_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A persistent-difficulty window (the case D3P prunes), small enough to be quick."""
    rng = np.random.default_rng(11)
    N = 20_000
    base = rng.lognormal(0.0, 0.25, N)
    w = (base * 0.7 * (1 + 0.05 * rng.standard_normal((3, N)))).astype(np.float32)
    path = tmp_path_factory.mktemp("losses") / "losses.npy"
    np.save(path, w)
    return path, w


def test_cli_writes_decision_and_one_json_line(losses_file, tmp_path) -> None:
    path, w = losses_file
    out = tmp_path / "decision.npz"
    fig = tmp_path / "fig.png"
    res = _run(str(path), "--out", str(out), "--bins", "64", "--seed", "3", "--plot", str(fig))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert KEYS <= set(summary)

    with np.load(out) as z:
        assert set(z.files) == {"pruned", "weights", "cld", "support", "observed", "expected"}
        N = w.shape[1]
        assert z["pruned"].dtype == bool and z["pruned"].shape == (N,)
        assert z["weights"].dtype == np.float32 and z["weights"].shape == (N,)
        assert z["cld"].dtype == np.float64 and z["cld"].shape == (N,)
        assert z["support"].shape == (2,) and z["support"].dtype.kind == "f"
        assert z["observed"].shape == (64,) and z["expected"].shape == (64,)
        assert z["observed"].dtype.kind == "i" and z["expected"].dtype.kind == "i"
        # The CLI computes exactly what the library computes with the same seed.
        ref = decide(w, bins=64, rng=3)
        np.testing.assert_array_equal(z["pruned"], ref.pruned)
        np.testing.assert_array_equal(z["weights"], ref.weights)
        np.testing.assert_array_equal(z["observed"], ref.observed)
        assert summary["N"] == N
        assert summary["pruned"] == int(z["pruned"].sum()) == ref.num_pruned
        assert summary["pruned"] == summary["easy"] + summary["hard"] + summary["trimmed"] - summary["restored"]
        assert summary["fit_ks"] == ref.fit_ks and summary["max_weight"] == float(ref.weights.max())
        assert summary["prune_ratio"] == pytest.approx(summary["pruned"] / N)
        assert summary["pruned"] > 0 and summary["easy"] > 0 and summary["hard"] > 0

    data = fig.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def _bad(tmp_path: Path, name: str, arr) -> Path:
    p = tmp_path / name
    np.save(p, arr)
    return p


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "not found"),
        ("ndim", "2-D"),
        ("nan", "NaN"),
        ("bins", "--bins"),
        ("quantile", "--quantile"),
        ("quantile0", "--quantile"),
        ("notnpy", "cannot read"),
        ("outdir", "does not exist"),
        ("plotfmt", "unsupported image format"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(case, expect, losses_file, tmp_path, capsys) -> None:
    """In-process through main(argv), the same code path as the command line (a subprocess per
    case would spend seconds importing scipy); test_cli_bad_input_subprocess covers `-m`."""
    good, _ = losses_file
    out = tmp_path / "d.npz"
    fig = tmp_path / "f.png"
    args = [str(good), "--out", str(out), "--plot", str(fig)]
    if case == "missing":
        args[0] = str(tmp_path / "nope.npy")
    elif case == "ndim":
        args[0] = str(_bad(tmp_path, "one_d.npy", np.ones(10)))
    elif case == "nan":
        x = np.random.default_rng(0).random((3, 50))
        x[2, 7] = np.nan
        args[0] = str(_bad(tmp_path, "nan.npy", x))
    elif case == "bins":
        args += ["--bins", "1"]
    elif case == "quantile":
        args += ["--quantile", "1.0"]
    elif case == "quantile0":
        args += ["--quantile", "0"]
    elif case == "notnpy":
        p = tmp_path / "text.npy"
        p.write_text("not an array")
        args[0] = str(p)
    elif case == "outdir":
        args[2] = str(tmp_path / "no_such_dir" / "d.npz")
    elif case == "plotfmt":
        args[4] = str(tmp_path / "f.notanimage")
    with pytest.raises(SystemExit) as exc:
        decide_main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert expect in captured.err
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".npy") == []


def test_cli_bad_input_subprocess(tmp_path) -> None:
    x = np.random.default_rng(0).random((3, 50))
    x[0, 3] = np.inf
    p = _bad(tmp_path, "inf.npy", x)
    out = tmp_path / "d.npz"
    res = _run(str(p), "--out", str(out))
    assert res.returncode == 2
    assert "NaN/inf" in res.stderr and "epoch 0, sample 3" in res.stderr
    assert res.stdout == "" and not out.exists()


def test_cli_image_formats_are_known_to_matplotlib() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    assert _IMAGE_FORMATS <= set(FigureCanvasAgg.get_supported_filetypes())


def test_cli_zero_variance_prunes_nothing(tmp_path, capsys) -> None:
    p = _bad(tmp_path, "flat.npy", np.full((3, 500), 0.5, dtype=np.float32))
    out = tmp_path / "d.npz"
    assert decide_main([str(p), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pruned"] == 0 and "zero variance" in summary["reason"]
    with np.load(out) as z:
        assert not z["pruned"].any() and np.all(z["weights"] == 1)


def test_figure_colours_the_pruned_parts(losses_file, tmp_path) -> None:
    _, w = losses_file
    d = decide(w, bins=64, rng=0)
    fig = decision_figure(d, d.density)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = {t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()}
    assert {"kept", "easy", "hard", "trimmed"} <= labels
    # The stacked bars add up to the full histogram over the observed range.
    heights = sum(p.get_height() for p in ax.patches)
    assert heights == pytest.approx(w.shape[1])
    assert f"fit KS {d.fit_ks:.3f}" in ax.get_title()  # the goodness of fit in the figure
    path = plot_decision(d, d.density, tmp_path / "f.png")
    assert path.stat().st_size > 1000


def test_every_rail_is_an_option_and_classification_takes_the_library_default(tmp_path, capsys):
    """Issue 29 item 8: d3p-decide takes the max weight, the kept share, the poor-fit action and the fit threshold;
    --classification gives DataPruner's default decision (the rails on), the default the published one."""
    import d3p
    from d3p.strategy import EpochLosses

    rng = np.random.default_rng(7)  # a noisy cross-entropy: most losses near 0, a tail of mislabelled samples
    bad = rng.random(4001) < 0.2
    base = np.where(bad, rng.normal(3.0, 0.8, 4001).clip(0.2), rng.exponential(0.08, 4001))
    window = (base[None, :] * (1 + 0.1 * rng.standard_normal((2, 4001)))).clip(1e-4).astype(np.float32)
    path = tmp_path / "w.npy"
    np.save(path, window)

    def run(*flags):
        assert decide_main([str(path), "--out", str(tmp_path / "d.npz"), "--seed", "5", *flags]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return line, np.load(tmp_path / "d.npz")

    published, _ = run()
    assert published["max_weight"] > 1 and published["N"] - published["pruned"] < 2001  # uncapped, below half
    capped, _ = run("--max-weight", "1")
    assert capped["max_weight"] == 1.0 and capped["capped"] > 0
    floored, _ = run("--min-kept-share", "0.6")
    assert floored["N"] - floored["pruned"] == 2401  # ceil(0.6 * 4001)
    kept_all, _ = run("--poor-fit", "keep_all")
    assert kept_all["poor_fit"] and kept_all["pruned"] == 0
    lenient, _ = run("--fit-threshold", "0.99")
    assert not lenient["poor_fit"]
    clf, arrays = run("--classification")
    # the library's default pruner keeps as many from the same window (its trimming draw is seeded otherwise, so
    # which samples differ; how many does not)
    strategy = d3p.DataPruner(4001, "d3p", epochs=3, d3p_start=2, d3p_period=2, d3p_window=2).strategy
    for epoch in range(2):
        strategy.end_epoch(epoch, EpochLosses(window[epoch].astype(np.float64), np.ones(4001, dtype=np.int32)))
    assert clf["max_weight"] == 1.0 and clf["N"] - clf["pruned"] == int((~strategy.pruned).sum())
    with pytest.raises(SystemExit):
        decide_main([str(path), "--out", str(tmp_path / "d.npz"), "--max-weight", "0.5"])
    assert "--max-weight must be 0 (no cap) or >= 1" in capsys.readouterr().err
