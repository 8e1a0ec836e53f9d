"""moequant checkpoint keys -> the keys vLLM's Mixtral loads (the family's published names), from transformers'
conversion mapping; no vLLM needed."""

import json

import pytest
from safetensors import safe_open

from moequant.checkpoint.bundled import bundled_model_path
from moequant.errors import CheckpointError
from moequant.vllm.names import vllm_names


@pytest.fixture(scope="module")
def names():
    return vllm_names(json.loads((bundled_model_path() / "config.json").read_text()))


def _published_keys() -> set[str]:
    keys = set()
    for f in bundled_model_path().glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            keys |= set(fh.keys())
    return keys


def test_expert_tensors_take_the_published_per_expert_names(names):
    assert names.rename("model.layers.2.mlp.experts.7.gate_up.qweight") == (
        "model.layers.2.block_sparse_moe.experts.7.w1.qweight"
    )
    assert names.rename("model.layers.11.mlp.experts.13.down.scales") == (
        "model.layers.11.block_sparse_moe.experts.13.w2.scales"
    )
    published = _published_keys()  # the bundled model is stored with the published names
    for i in range(4):
        for e in range(8):
            gate = names.rename(f"model.layers.{i}.mlp.experts.{e}.gate_up.dense")
            down = names.rename(f"model.layers.{i}.mlp.experts.{e}.down.dense")
            assert gate.replace(".dense", ".weight") in published
            assert down.replace(".dense", ".weight") in published


def test_every_non_expert_tensor_takes_its_published_name(names):
    from moequant.checkpoint.loading import load_model

    model = load_model(None)  # transformers' in-memory names: what moequant writes
    published = _published_keys()
    for name in model.state_dict():
        if ".experts." not in name and name != "lm_head.weight":  # lm_head: tied or absent on disk
            assert names.rename(name) in published, name


def test_renames_are_idempotent(names):
    """vLLM applies the quantization config's mapper at the model and again at its inner model."""
    for key in ["model.layers.0.mlp.experts.3.gate_up.qzeros", "model.layers.3.mlp.gate.weight",
                "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"]:  # fmt: skip
        once = names.rename(key)
        assert names.rename(once) == once


def test_layer_index_reads_vllm_experts_layer_names(names):
    assert names.experts_template == "model.layers.{i}.block_sparse_moe.experts"
    assert names.layer_index("model.layers.3.block_sparse_moe.experts") == 3
    assert names.layer_index("model.layers.3.block_sparse_moe.experts.w13") is None
    assert names.layer_index("model.layers.3.self_attn.qkv_proj") is None


def test_fused_expert_families_are_refused():
    from transformers import AutoConfig

    from moequant.arch.derive import tiny_twin
    from moequant.arch.shrink import causal_lm_type

    cfg = tiny_twin(AutoConfig.for_model(causal_lm_type("gpt_oss"))).config.to_dict()
    with pytest.raises(CheckpointError, match="fused experts"):
        vllm_names(cfg)
