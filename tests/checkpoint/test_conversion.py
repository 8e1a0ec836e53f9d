"""Checkpoint key names through transformers' own conversion mapping: a tiny Mixtral saved with its published
per-expert keys (w1 / w3 / w2) read back into the fused expert tensors, and the reverse names for exports."""

import json

import pytest
import torch
from safetensors import safe_open

from moequant.arch.tiny import save_tiny
from moequant.checkpoint.conversion import KeyRoutes, expert_key_templates, renamer_for
from moequant.errors import CheckpointError

EXPERTS = "model.layers.0.block_sparse_moe.experts"


def test_key_routes_build_fused_experts_from_the_published_keys(tmp_path):
    model = save_tiny("mixtral", tmp_path, seed=1)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        reads = []
        routes = KeyRoutes(model, list(f.keys()), lambda k: reads.append(k) or f.get_tensor(k))
        name = "model.layers.0.mlp.experts.gate_up_proj"
        assert routes.keys[name] == {
            ".experts.*.w1.weight": [f"{EXPERTS}.{e}.w1.weight" for e in range(8)],
            ".experts.*.w3.weight": [f"{EXPERTS}.{e}.w3.weight" for e in range(8)],
        }
        fused = routes.assemble(name)
        assert torch.equal(fused, model.model.layers[0].mlp.experts.gate_up_proj.data)
        # expert 3's rows: its gate (w1) then its up (w3) projection
        assert torch.equal(
            fused[3],
            torch.cat([f.get_tensor(f"{EXPERTS}.3.w1.weight"), f.get_tensor(f"{EXPERTS}.3.w3.weight")]),
        )
        reads.clear()
        assert torch.equal(routes.assemble_experts(name, [1, 3]), fused[[1, 3]])
        assert sorted(reads) == sorted(f"{EXPERTS}.{e}.{w}.weight" for e in (1, 3) for w in ("w1", "w3"))
        q = "model.layers.0.self_attn.q_proj.weight"  # renamed nowhere, converted by nothing: read as it is
        assert routes.keys[q] == {q: [q]} and torch.equal(routes.assemble(q), f.get_tensor(q))
        with pytest.raises(CheckpointError, match="no checkpoint key maps to model.layers.9"):
            routes.assemble("model.layers.9.self_attn.q_proj.weight")


def test_the_reverse_names_of_a_family(tmp_path):
    save_tiny("mixtral", tmp_path, seed=1)
    rename = renamer_for(json.loads((tmp_path / "config.json").read_text()))
    assert rename("model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"
    assert rename("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert expert_key_templates("mixtral") == {
        "gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        "down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    }
    assert expert_key_templates("qwen3_moe") == {
        "gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        "up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        "down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    }
    assert expert_key_templates("gpt_oss") is None  # its checkpoints store the experts fused
