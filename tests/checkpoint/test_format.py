"""Quantized checkpoints: save + from_pretrained reload is exact, streaming equals in-memory, bad files fail."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moequant  # noqa: F401  (registers the format)
from moequant import api
from moequant.arch.tiny import save_tiny, tiny_model
from moequant.calibration.data import CalibData
from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec
from moequant.errors import CheckpointError
from moequant.plan.schema import Plan

QCFG = QuantizeConfig(progress=False, batch_size=4, min_tokens=4)


def _data(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CalibData(torch.randint(0, 256, (n, seq), generator=g), ["x"] * n, "random ids")


def _mixed_plan(model, group_size=32):
    """Every method and width the format supports, spread over the experts."""
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, group_size))
    cycle = [
        QuantSpec(Method.GPTQ, 2, group_size),
        QuantSpec(Method.GPTQ, 3, group_size),
        QuantSpec(Method.GPTQ, 4, group_size, sym=True),
        QuantSpec(Method.RTN, 8, group_size),
        QuantSpec(Method.KEEP, 16, group_size),
        QuantSpec(Method.BNB_NF4),
        QuantSpec(Method.BNB_INT8),
        QuantSpec(Method.GPTQ, 8, group_size),
    ]
    for i in plan.layers:
        plan.layers[i] = [cycle[(e + i) % len(cycle)] for e in range(len(plan.layers[i]))]
    return plan


@pytest.mark.parametrize(
    "model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
)
def test_reload_logits_equal_in_memory(tmp_path, model_type):
    model = tiny_model(model_type, seed=11)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = _mixed_plan(model)
    api.quantize(model, plan, _data(), tmp_path / "q", QCFG, save_dtype=torch.float32)
    with torch.no_grad():
        quant = model(input_ids=ids).logits  # the in-memory model now holds QuantizedExperts
    assert not torch.equal(quant, ref)
    rel = (quant - ref).norm() / ref.norm()
    assert rel < 0.35, f"quantized logits drifted too far: {rel:.3f}"  # garbage weights give ~1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert torch.equal(again, quant)


def test_streaming_equals_in_memory(tmp_path):
    save_tiny("qwen3_moe", tmp_path / "src", seed=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    plan = _mixed_plan(model)
    api.quantize(model, plan, _data(), tmp_path / "mem", QCFG)
    api.quantize(str(tmp_path / "src"), plan, _data(), tmp_path / "stream", QCFG)
    for f in sorted((tmp_path / "mem").glob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "stream" / f.name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmt")
    model = tiny_model("mixtral", seed=2)
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    api.quantize(model, plan, _data(), tmp / "q", QCFG, save_dtype=torch.float32)
    return tmp / "q"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_an_error(tmp_path, quantized_folder):
    q = _copy(quantized_folder, tmp_path / "q")
    shard = q / "model-layer-00001.safetensors"
    tensors = load_file(shard)
    tensors.pop("model.layers.1.mlp.experts.3.down.scales")
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="experts.3.down.scales missing"):
        AutoModelForCausalLM.from_pretrained(q)


def test_wrong_shape_is_an_error(tmp_path, quantized_folder):
    q = _copy(quantized_folder, tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["experts"]["0"][2] = "rtn:8"  # bit map no longer matches the tensors
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        AutoModelForCausalLM.from_pretrained(q)


def test_unknown_format_version_and_incomplete_status(tmp_path, quantized_folder):
    q = _copy(quantized_folder, tmp_path / "q")
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version 99"):
        AutoModelForCausalLM.from_pretrained(q)
    cfg["quantization_config"]["format_version"] = 1
    cfg["quantization_config"]["status"] = "incomplete"
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="incomplete"):
        AutoModelForCausalLM.from_pretrained(q)


def test_truncated_shard_is_an_error(tmp_path, quantized_folder):
    q = _copy(quantized_folder, tmp_path / "q")
    shard = q / "model-layer-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(q)


def test_plan_must_match_model(tmp_path):
    model = tiny_model("olmoe")
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    bad = Plan.from_json(plan.to_json() | {"layers": {"0": ["rtn:4"] * 8}})
    with pytest.raises(Exception, match="layers"):
        api.quantize(model, bad, _data(), tmp_path / "q", QCFG)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_non_expert_linears_quantized_and_reloaded(tmp_path, model_type):
    from torch import nn

    from moequant.modules.qlinear import QuantLinear

    model = tiny_model(model_type, seed=7)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32))
    plan.non_expert = QuantSpec(Method.GPTQ, 8, 32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    api.quantize(model, plan, _data(), tmp_path / "q", QCFG, save_dtype=torch.float32)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, QuantLinear)
    assert isinstance(model.lm_head, QuantLinear)  # tiny models do not tie embeddings
    assert type(layer.mlp.gate).__name__.endswith("Router")  # routers stay as they were
    if model_type == "qwen2_moe":
        assert isinstance(layer.mlp.shared_expert.down_proj, QuantLinear)
        assert isinstance(layer.mlp.shared_expert_gate, nn.Linear)  # a gate, never quantized
    else:
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)  # the dense first layer
    with torch.no_grad():
        quant = model(input_ids=ids).logits
    assert 0 < float((quant - ref).norm() / ref.norm()) < 0.2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert isinstance(loaded.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, quant)
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert any(r["module"] == "lm_head" for r in report["non_expert"])


def test_fallback_experts_are_recorded_as_stored(tmp_path):
    """Experts below min_tokens are stored as RTN: the bit map says so, and act-order (g_idx) applies only
    to the GPTQ ones, so the checkpoint reloads."""
    model = tiny_model("olmoe", seed=9)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32), act_order=True)
    g_idx = dict(gptq=GPTQOptions(act_order=True, static_groups=False))  # act-order with a stored g_idx
    first = api.quantize(
        model, plan, _data(), tmp_path / "probe", QuantizeConfig(progress=False, min_tokens=0, **g_idx)
    )
    tokens = sorted(r.tokens for r in first.report)
    threshold = tokens[len(tokens) // 2]  # about half the experts fall back
    model = tiny_model("olmoe", seed=9)
    cfg = QuantizeConfig(progress=False, batch_size=4, min_tokens=threshold, **g_idx)
    s = api.quantize(model, plan, _data(), tmp_path / "q", cfg, save_dtype=torch.float32)
    methods = {r.method for r in s.report}
    assert methods == {"gptq", "rtn"}
    bit_map = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["experts"]
    for r in s.report:
        assert bit_map[str(r.layer)][r.expert] == f"{r.method}:4"
        assert (r.method == "rtn") == (r.tokens < threshold)
    ids = torch.randint(0, 256, (1, 8))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
