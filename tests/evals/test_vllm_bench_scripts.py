"""The vLLM benchmarks run by path with vLLM's own Python, where moequant is not installed: their module level
imports the standard library only (moequant only inside the functions moequant's side runs), and the report
renders from a saved record."""

import ast
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "evals" / "bench"


@pytest.mark.parametrize("name", ["vllm_serve.py", "vllm_layer_names.py", "vllm_plugin.py"])
def test_module_level_imports_are_stdlib_only(name):
    tree = ast.parse((BENCH / name).read_text())
    top = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            top += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            top.append((node.module or "").split(".")[0])
    assert top and all(m in sys.stdlib_module_names for m in top), top


def test_report_renders_loads_and_refusals():
    from moequant.evals.bench.vllm_serve import WNA16_NOTE, report

    ok = {"ok": True, "vllm": "0.32.0"}
    refused = {
        "ok": False,
        "error": "NotImplementedError: No WNA16 MoE backend supports the deployment configuration.",
        "where": "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:361 select_wna16_moe_backend",
        "vllm_frames": [
            "a.py:1 f",
            "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:361 select_wna16_moe_backend",
        ],
    }
    record = {
        "date": "2026-12-06",
        "machine": {"model": "AMD EPYC", "cpus": "2", "amx": "none", "avx512": True},
        "vllm": "0.32.0",
        "vllm_extras": {"zentorch": "2.13.0.2"},
        "command": "python -m moequant.evals.bench.vllm_serve",
        "prompts": "8 windows",
        "seconds": 1.0,
        "rows": [
            {"name": "16-bit", "dtype": "float32", "made": "bundled", "vllm_result": ok,
             "compare": {"ppl_transformers": 46.6, "ppl_vllm": 46.6, "ppl_rel": 0.0, "greedy_equal": 8,
                         "greedy_prefix_mean": 16.0}},
            {"name": "ct", "dtype": "bfloat16", "made": "x", "vllm_result": refused, "ppl_transformers": 46.7},
        ],
    }  # fmt: skip
    md = report(record)
    assert "| 16-bit | float32 | loads | 46.600 | 46.600 | +0.00% | 8/8" in md
    assert "`vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:361 select_wna16_moe_backend`" in md
    assert "`zentorch` 2.13.0.2" in md and WNA16_NOTE in md


def test_plugin_report_gives_ratios_to_the_16bit_model_in_the_same_run():
    from moequant.evals.bench.vllm_plugin import report

    def speed(b1, b8):
        return {"vllm": "0.32.0", "rows": [
            {"batch": 1, "tokens_per_s": b1, "loadavg_1min": 2.0}, {"batch": 1, "tokens_per_s": b1 / 2, "loadavg_1min": 3.0},
            {"batch": 8, "tokens_per_s": b8, "loadavg_1min": 2.5}]}  # fmt: skip

    cmp = {
        "ppl_transformers": 47.0,
        "ppl_vllm": 47.0,
        "ppl_rel": 1e-7,
        "greedy_equal": 8,
        "greedy_prefix_mean": 16.0,
    }
    record = {
        "date": "2026-12-07", "machine": {"model": "AMD EPYC", "cpus": "2"}, "vllm": "0.32.0",
        "command": "python -m moequant.evals.bench.vllm_plugin", "prompts": "8 windows", "speed_setup": "b 1 and 8",
        "seconds": 1.0,
        "rows": [
            {"name": "16-bit (bundled)", "folder": "x", "made": "bundled", "compare": cmp, "speed": speed(100.0, 400.0)},
            {"name": "planned 3.0 bits", "folder": "y", "made": "moequant quantize --bits 3.0", "compare": cmp,
             "speed": speed(50.0, 100.0), "widths_per_layer": {"0": ["gptq:2", "gptq:3/gptq:4"]}},
        ],
    }  # fmt: skip
    md = report(record)
    row = "| planned 3.0 bits | 47.000 | 47.000 | +0.0000% | 8/8 (mean prefix 16.0/16) | 50.0 [25.0, 50.0] (2.0-3.0)"
    assert row + " | 0.50x | 100.0 [100.0, 100.0] (2.5-2.5) | 0.25x |" in md
    assert "layer 0: gptq:2, gptq:3/gptq:4" in md and "CUDA" in md and "unmeasured" in md
