"""`pip install .` into a fresh virtual environment: the d3p package, its console scripts, usable from
outside the checkout (it imports none of the repository's top-level modules)."""
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_pip_install_into_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "d3p"), src / "d3p", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # system site packages: torch/numpy/scipy/setuptools come from the machine (no 2 GB download), d3p does not;
    # without the venv's own (older, bundled) pip and setuptools, this machine's pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    py = str(venv / "bin" / "python")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", str(src)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for tool in ("d3p-decide", "d3p-export", "d3p-static"):
        res = subprocess.run([str(venv / "bin" / tool), "--help"], cwd=outside, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, (tool, res.stdout[-1000:], res.stderr[-1000:])
    code = ("import d3p, sys; "
        "p = d3p.DataPruner(64, 'random', epochs=2, prune_ratio=0.5); p.begin_epoch(0); "
        "assert len(p.sampler) == 32; "
        "assert not any(m in sys.modules for m in ('util', 'models_mae', 'timm')); print(d3p.__file__)")
    res = subprocess.run([py, "-c", code], cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(venv) in res.stdout and REPO not in res.stdout  # the installed copy, not the checkout
