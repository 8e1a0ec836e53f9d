"""The entry point: declared in pyproject.toml, found by vLLM's Python, registers "moequant"; `import moequant`
imports nothing from vLLM."""

import subprocess
import sys
from pathlib import Path

import pytest
from vllm_runner import run_vllm

import moequant

REPO = Path(moequant.__file__).resolve().parents[1]


def test_entry_point_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"moequant": "moequant.vllm.plugin:register"}
    assert "vllm" in project["optional-dependencies"]


def test_import_moequant_imports_no_vllm():
    code = "import sys, moequant; print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'moequant.vllm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_vllm_finds_and_registers_the_method(vllm_python):
    code = (
        "from importlib.metadata import entry_points\n"
        "assert [e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'moequant'] == "
        "['moequant.vllm.plugin:register']\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.model_executor.layers.quantization import get_quantization_config\n"
        "from moequant.vllm.plugin import register\n"
        "register()  # a second time: vLLM may load plugins more than once\n"
        "print(get_quantization_config('moequant').__module__)\n"
    )
    proc = run_vllm("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "moequant.vllm.quant_config"
