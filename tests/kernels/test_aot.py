"""Ahead-of-time compilation of the kernels for sm_90 (kernels/aot.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _child_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEQUANT_KERNEL")}


def test_kernels_compile_for_sm90():
    """Lower representative launches to sm_90 cubins with triton's ptxas (no GPU needed; a fresh process,
    since compiling needs triton in compiled mode): every variant compiles, no register spills."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "moequant.kernels.aot", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=_child_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 with register spills" in proc.stderr, proc.stderr
