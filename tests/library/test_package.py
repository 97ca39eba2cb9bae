"""`pip install .` into a fresh virtual environment: the d3p package, its console scripts, usable from
outside the checkout (it imports none of the repository's top-level modules)."""
import os
import shutil
import subprocess
import sys
import sysconfig

from conftest import REPO


def test_pip_install_into_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "d3p"), src / "d3p", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # A venv of its own that sees the packages of the environment running this test (torch, numpy, scipy and the
    # build backend, setuptools, which requirements.txt installs) through a .pth file, and nothing of the base
    # interpreter's site-packages: the test depends only on the environment that runs it, not on what happens
    # to be installed in the machine's Python, and downloads nothing (2 GB of torch).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip()
    parent_site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    with open(os.path.join(venv_site, "_parent_env.pth"), "w") as f:
        f.write("\n".join(sorted(parent_site)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    py = str(venv / "bin" / "python")
    torch_before = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"], env=env,
                                  check=True, capture_output=True, text=True).stdout
    # With its dependencies (no --no-deps) but no index: pip may only accept the torch/numpy/scipy it finds, so a
    # pyproject that asked for another torch would fail here instead of replacing the user's torch build.
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-index", str(src)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    torch_after = subprocess.run([py, "-c", "import torch; print(torch.__version__, torch.__file__)"], env=env,
                                 check=True, capture_output=True, text=True).stdout
    assert torch_after == torch_before  # the installed torch build was kept
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
