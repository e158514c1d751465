"""check.py: reports the environment and exits 0 here; one line and exit 1 when a required
package is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).resolve().parents[1] / "check.py"


def run_check(prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import runpy, sys; {prelude}; runpy.run_path({str(CHECK)!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_check_reports_and_exits_zero():
    result = subprocess.run(
        [sys.executable, str(CHECK)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    import torch

    out = result.stdout
    for label in (
        "torch",
        "CUDA",
        "GPU",
        "bf16",
        "triton",
        "kernels",
        "transformers",
        "safetensors",
        "tokenizers",
        "datasets",
    ):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert torch.__version__ in out
    if not torch.cuda.is_available():
        assert "reference (PyTorch)" in out  # no GPU: it says the fused kernels will not run


def test_missing_required_package_is_one_line_and_exit_1():
    missing = "safetensors"
    result = run_check(f"sys.modules[{missing!r}] = None")  # makes `import missing` fail
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and repr(missing) in lines[0] and "pip install" in lines[0]


def test_missing_optional_package_is_only_reported():
    result = run_check("sys.modules['datasets'] = None")
    assert result.returncode == 0, result.stderr
    assert "datasets      not installed" in result.stdout
