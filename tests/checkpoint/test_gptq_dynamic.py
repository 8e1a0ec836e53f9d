"""The GPTQ export's `dynamic` rules mean in vLLM and GPTQModel what moequant means: routed experts of each MoE
layer at that layer's width; attention, shared experts, routers, dense MLPs, embeddings and lm_head unquantized.

Judged against the names vLLM itself gives each layer (tests/checkpoint/vllm_layer_names.json: recorded from
vLLM's model classes by evals/bench/vllm_layer_names.py, vLLM's version in the file), with vLLM's matching
rule: `re.match(pattern, layer_name)`, rules in order, "-:" excludes, the first "+:" overrides
(vllm/model_executor/layers/quantization/utils/gptq_utils.py `get_dynamic_override`; GPTQModel's `dynamic_get`
walks them the same way). Where vLLM is importable (or MOEQUANT_VLLM_PYTHON names a Python that has it), vLLM's
own function judges the same names.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from moequant.checkpoint.export_gptq import dynamic_rules

TABLE = json.loads((Path(__file__).parent / "vllm_layer_names.json").read_text())
BASE = 4
EXPERT_CLASSES = ("RoutedExperts", "TransformersRoutedExperts")


def _match(rules: dict, name: str):
    """vLLM's get_dynamic_override(config, name) (key None): False, the override dict, or None."""
    for pattern, override in rules.items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), name):
                return False
        elif re.match(pattern.removeprefix("+:"), name):
            return override
    return None


def _families():
    return {k: v for k, v in TABLE["families"].items() if "quant_layers" in v}


def _case(family: dict) -> tuple[dict[int, int], dict]:
    """One width per MoE layer, alternating 8 and 4 bits, and the export's rules for it."""
    layers = sorted(
        {
            int(re.search(r"\.layers\.(\d+)\.", n).group(1))
            for c, n in family["quant_layers"]
            if c in EXPERT_CLASSES
        }
    )
    layer_bits = {i: (8, 4)[k % 2] for k, i in enumerate(layers)}
    return layer_bits, dynamic_rules(family["moequant_layers"], layer_bits, BASE)


def _expected(family: dict, layer_bits: dict[int, int]) -> list[tuple[str, object]]:
    """(name, what get_dynamic_override must give) for every layer vLLM asks its GPTQ config about."""
    out = []
    for cls, name in family["quant_layers"]:
        if cls in EXPERT_CLASSES:
            i = int(re.search(r"\.layers\.(\d+)\.", name).group(1))
            out.append((name, layer_bits[i]))
        else:
            out.append((name, False))
    return out


def _bits(result) -> object:
    if result is False:
        return False
    return (result or {}).get("bits", BASE)


def test_table_records_vllms_version_and_the_main_families():
    assert TABLE["vllm"] and TABLE["transformers"]
    names = _families()
    for family in (
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe",
        "jamba",
    ):
        assert family in names, family
    for entry in TABLE["families"].values():  # a family vLLM could not build says why, and where
        assert "quant_layers" in entry or entry["refused"]


@pytest.mark.parametrize("model_type", sorted(_families()))
def test_rules_give_each_vllm_layer_moequants_width(model_type):
    family = _families()[model_type]
    layer_bits, rules = _case(family)
    assert layer_bits, "no routed experts recorded"
    for name, want in _expected(family, layer_bits):
        assert _bits(_match(rules, name)) == want, (name, want, rules)
    for _, name in family[
        "unquantized_linears"
    ]:  # built without a quant config; a rule would leave them alone too
        assert _match(rules, name) is False, name


def test_old_rules_excluded_vllms_fused_experts():
    """The rules the export wrote before: every FusedMoE layer fell under the negative rule (why this test
    file exists)."""
    old = {r"-:^(?!.*\.experts\.).*$": {}, r"+:^model\.layers\.0\..*\.experts\..*$": {"bits": 8}}
    assert _match(old, "model.layers.0.block_sparse_moe.experts") is False
    rules = dynamic_rules("model.layers", {0: 8, 1: 4}, 4)
    assert _bits(_match(rules, "model.layers.0.block_sparse_moe.experts")) == 8
    assert _bits(_match(rules, "model.layers.1.block_sparse_moe.experts")) == 4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "jamba"])
def test_rules_keep_working_for_gptqmodel_module_names(model_type):
    """GPTQModel matches transformers' module names with the experts unfused (`...experts.3.gate_proj`);
    shared experts, routers and attention stay unquantized."""
    family = _families()[model_type]
    layer_bits, rules = _case(family)
    layers = family["moequant_layers"]
    block = family["expert_keys"]["gate"].split("{i}.", 1)[1].split(".experts.")[0]  # e.g. mlp, feed_forward
    block = "mlp" if block == "block_sparse_moe" else block  # transformers 5 names Mixtral's block `mlp`
    for i, bits in layer_bits.items():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert _bits(_match(rules, f"{layers}.{i}.{block}.experts.5.{proj}")) == bits
        for other in ("self_attn.q_proj", "self_attn.o_proj", f"{block}.gate", f"{block}.router",
                      f"{block}.shared_expert.gate_proj", f"{block}.shared_experts.down_proj"):  # fmt: skip
            assert _match(rules, f"{layers}.{i}.{other}") is False, other
    assert _match(rules, "lm_head") is False and _match(rules, "model.embed_tokens") is False


VLLM_CHILD = """
import json, sys
from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override
cases = json.load(sys.stdin)
class C:  # what get_dynamic_override reads of a GPTQ config
    pass
out = []
for rules, names in cases:
    c = C(); c.dynamic = rules
    out.append([get_dynamic_override(c, n) for n in names])
print(json.dumps(out))
"""


def _vllm_python() -> list[str] | None:
    import sys

    try:
        import vllm

        if getattr(vllm, "__file__", None) is None:  # tests/vllm/ on sys.path, as a namespace package
            raise ImportError("not vLLM")
        return [sys.executable]
    except ImportError:
        exe = os.environ.get("MOEQUANT_VLLM_PYTHON")
        return [exe] if exe and Path(exe).is_file() else None


def test_vllms_own_matcher_agrees():
    """vLLM's get_dynamic_override on every recorded name (skipped where no vLLM is at hand)."""
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM not importable (set MOEQUANT_VLLM_PYTHON to a Python with vLLM, e.g. its own venv)")
    cases, wants = [], []
    for family in _families().values():
        layer_bits, rules = _case(family)
        expected = _expected(family, layer_bits)
        cases.append([rules, [n for n, _ in expected]])
        wants.append([w for _, w in expected])
    env = dict(
        os.environ, PYTHONSAFEPATH="1"
    )  # the repository's kernels/ must not shadow the `kernels` package
    proc = subprocess.run(
        [*python, "-c", VLLM_CHILD], input=json.dumps(cases), capture_output=True, text=True, env=env, cwd="/",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for (rules, names), results, want in zip(cases, got, wants, strict=True):
        for name, result, w in zip(names, results, want, strict=True):
            assert _bits(result) == w, (name, result, w, rules)
