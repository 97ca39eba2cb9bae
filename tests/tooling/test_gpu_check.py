"""benchmarks/gpu_check.py's logic on CPU: it refuses clearly without CUDA, plans its checks, prints one table."""
import pytest

from benchmarks import gpu_check


def test_refuses_without_cuda(capsys):
    assert gpu_check.main([]) == 2  # this machine has no CUDA
    err = capsys.readouterr().err
    assert "no CUDA device visible" in err and "Fix:" in err
    with pytest.raises(SystemExit, match="no CUDA device visible"):
        gpu_check.plan(0, True, set())


def test_plan_skips_what_is_missing_or_asked():
    planned = dict(gpu_check.plan(1, False, {"train"}))
    assert list(planned) == list(gpu_check.CHECKS)
    assert planned["train"] == "--skip" and "faiss" in planned["faiss"] and planned["collectives"] == ""
    assert dict(gpu_check.plan(8, True, set()))["faiss"] == ""
    with pytest.raises(SystemExit, match="unknown --skip"):
        gpu_check.plan(1, True, {"trian"})


def test_table_has_one_aligned_row_per_check():
    rows = [gpu_check.Row("bf16", "PASS", "1.2e-03", "auto -> bf16"),
            gpu_check.Row("train (compile)", "INFO", "2400 img/s")]
    lines = gpu_check.format_table(rows).splitlines()
    assert len(lines) == 4 and lines[1].startswith("---")
    assert lines[0].index("status") == lines[2].index("PASS") == lines[3].index("INFO")
    assert lines[3].startswith("train (compile)") and lines[3].endswith("2400 img/s")
