"""The "moequant" config inside vLLM's Python: built from config.json's quantization_config, refusing what the
plugin cannot run, and mapping checkpoint keys to vLLM's names (no engine started)."""

import json

from vllm_runner import run_vllm

from moequant.checkpoint.bundled import bundled_model_path

CODE = """
import json, sys
from transformers import AutoConfig
from moequant.errors import CheckpointError
from moequant.vllm.quant_config import MoEQuantVllmConfig
qc, folder = json.loads(sys.argv[1]), sys.argv[2]
out = {}
cfg = MoEQuantVllmConfig.from_config(qc)
out["name"] = cfg.get_name()
try:
    cfg.get_checkpoint_weight_mapper()
except CheckpointError as err:
    out["before_update"] = str(err)
cfg.maybe_update_config(folder, hf_config=AutoConfig.from_pretrained(folder))
m = cfg.get_checkpoint_weight_mapper()
keys = ["model.layers.1.mlp.experts.6.gate_up.qweight", "model.layers.1.mlp.experts.6.down.g_idx",
        "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.o_proj.weight"]
out["mapped"] = [m.map_name(k) for k in keys]
for field, value in [("non_expert", {"spec": "rtn:8", "modules": ["lm_head"]}), ("has_bias", True),
                     ("status", "partial"), ("format_version", 99)]:
    try:
        MoEQuantVllmConfig.from_config({**qc, field: value})
        out[field] = "accepted"
    except CheckpointError as err:
        out[field] = str(err)
print(json.dumps(out))
"""


def test_config_maps_names_and_refuses_what_it_cannot_run(vllm_python):
    qc = {"quant_method": "moequant", "format_version": 1, "status": "complete", "group_size": 128, "sym": False,
          "hidden": 128, "intermediate": 256, "activation": "silu_glu",
          "experts": {str(i): ["gptq:2", "gptq:3/gptq:4"] * 4 for i in range(4)}}  # fmt: skip
    proc = run_vllm("-c", CODE, json.dumps(qc), str(bundled_model_path()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "moequant"
    assert "maybe_update_config was not called" in out["before_update"]
    assert out["mapped"] == [
        "model.layers.1.block_sparse_moe.experts.6.w1.qweight",
        "model.layers.1.block_sparse_moe.experts.6.w2.g_idx",  # kept: vLLM's default mapper drops .g_idx
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    assert "--non-expert" in out["non_expert"]
    assert "biases" in out["has_bias"]
    assert "incomplete" in out["status"]
    assert "format version 99" in out["format_version"]
