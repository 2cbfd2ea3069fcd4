"""benchmarks/gpu_check.py's GPU-path and matrix checks run their logic on the CPU (--cpu-dry-run, tiny model), so
a GPU session does not spend its few minutes finding a broken script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_of_the_static_generation_and_matrix_checks(tmp_path):
    if not (ROOT.parent / "shared" / "data" / "advbench").exists():
        pytest.skip("../shared/data is not beside the checkout")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                           "--only", "static_generation,matrix"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    table = done.stdout
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| static_generation | PASS" in table and "| matrix            | PASS" in table
    assert re.search(r"3 of \d+ settings, seed 0, in \d+ s", table) and "whole grid projected" in table
    assert "identical" in table and "ms/step" in table
