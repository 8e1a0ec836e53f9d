"""The names vLLM gives each quantizable layer, per MoE family moequant exports GPTQ for: the table the GPTQ
`dynamic` rules are tested against (tests/checkpoint/vllm_layer_names.json).

Two steps, two environments:

    python -m moequant.evals.bench.vllm_layer_names configs DIR
        (moequant's environment) a tiny config.json per family whose experts transformers saves per expert
        (checkpoint/conversion.expert_key_templates: the families export_gptq writes), with the family's
        CausalLM architecture and a GPTQ quantization_config;
    /tmp/vllm-venv/bin/python evals/bench/vllm_layer_names.py record DIR OUT.json
        (vLLM's own venv; this step imports no moequant) builds each model on the meta device with vLLM's own
        classes and records every (layer class, name) vLLM asks its GPTQ config about
        (`AutoGPTQConfig.get_quant_method(layer, prefix)`, where the `dynamic` rules are applied), plus the
        Linear layers built without a quant config (routers). A family vLLM cannot build is recorded with
        vLLM's error.

The names come from vLLM's model code as it runs, not from reading it. Families vLLM has no class for, or
whose config its transformers cannot parse, carry the reason instead of names.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

GPTQ_CONFIG = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 32,
    "desc_act": False,
    "sym": True,
    "dynamic": {},
}


# ---- step 1, moequant's environment -------------------------------------------------------------------------


def write_configs(out: Path) -> list[str]:
    """A tiny config.json per family with per-expert checkpoint keys; returns the model types written."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from moequant.arch import get_arch
    from moequant.arch.families import describe, supported_model_types
    from moequant.arch.shrink import causal_lm_type
    from moequant.arch.tiny import tiny_config
    from moequant.checkpoint.conversion import expert_key_templates

    written = []
    for model_type in supported_model_types():
        if describe(model_type).status not in ("derived", "hand-written"):
            continue
        try:
            keys = expert_key_templates(model_type)
        except Exception:  # noqa: BLE001 - a family whose default config does not build (as `families` shows)
            keys = None
        if keys is None:
            continue
        cfg = tiny_config(model_type).to_dict()
        cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[causal_lm_type(model_type)]]
        cfg["quantization_config"] = dict(GPTQ_CONFIG)
        _published_fields(cfg)
        d = out / model_type
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        arch = get_arch(model_type)
        (d / "moequant.json").write_text(json.dumps({"layers": arch.layers, "expert_keys": keys}))
        written.append(model_type)
    return written


def _published_fields(cfg: dict) -> None:
    """Fields published checkpoints' config.json carry that transformers 5.25's configs no longer write (or
    name otherwise) and vLLM's model code reads, set to what the tiny config implies."""
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if "head_dim" not in cfg and heads and hidden:
        cfg["head_dim"] = hidden // heads
    kinds = cfg.get("mlp_layer_types")
    if "first_k_dense_replace" not in cfg and isinstance(kinds, list):
        cfg["first_k_dense_replace"] = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    if "first_k_dense_replace" not in cfg and "num_dense_layers" in cfg:
        cfg["first_k_dense_replace"] = cfg["num_dense_layers"]
    for key, value in _FIELDS.get(cfg.get("model_type"), {}).items():
        cfg.setdefault(key, value(cfg) if callable(value) else value)


_FIELDS = {  # per family: the published config.json's field names vLLM 0.32's model code reads
    "afmoe": {"score_func": "sigmoid", "route_norm": True, "n_group": 1, "topk_group": 1},
    "hy_v3": {"expert_hidden_dim": lambda c: c["moe_intermediate_size"], "route_norm": True},
    "minimax_m2": {"rotary_dim": lambda c: c["head_dim"], "scoring_func": "sigmoid"},
    "mimo_v2_flash": {
        "hybrid_layer_pattern": lambda c: [int(k == "sliding_attention") for k in c.get("layer_types", [])],
        "moe_layer_freq": lambda c: [int(k != "dense") for k in c.get("mlp_layer_types", [])],
        "layernorm_epsilon": lambda c: c["rms_norm_eps"],
        "sliding_window_size": lambda c: c.get("sliding_window") or 16,
        "swa_num_attention_heads": lambda c: c["num_attention_heads"],
        "swa_num_key_value_heads": lambda c: c["num_key_value_heads"],
        "swa_head_dim": lambda c: c["head_dim"],
    },
}


# ---- step 2, vLLM's environment (no moequant import) -------------------------------------------------------


def _record_family(folder: Path, port: int) -> dict:
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe import RoutedExperts, UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization import auto_gptq

    asked: list[tuple[str, str]] = []

    def get_quant_method(self, layer, prefix):  # records the name, then builds the layer unquantized
        asked.append((type(layer).__name__, prefix))
        if isinstance(layer, RoutedExperts):
            return UnquantizedFusedMoEMethod(layer.moe_config)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None

    original = auto_gptq.AutoGPTQConfig.get_quant_method
    auto_gptq.AutoGPTQConfig.get_quant_method = get_quant_method
    try:
        args = EngineArgs(
            model=str(folder), skip_tokenizer_init=True, enforce_eager=True, load_format="dummy",
            enable_prefix_caching=True,  # hybrid (Mamba) families set a mamba block size, which needs it
        )  # fmt: skip
        vc = args.create_engine_config()
        from vllm.config import set_current_vllm_config
        from vllm.distributed import parallel_state as ps
        from vllm.model_executor.model_loader.utils import initialize_model

        with set_current_vllm_config(vc):
            if not ps.model_parallel_is_initialized():
                ps.init_distributed_environment(
                    world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                    backend="gloo",
                )  # fmt: skip
                ps.initialize_model_parallel(1, 1)
        with set_current_vllm_config(vc), torch.device("meta"):
            model = initialize_model(vc)
    finally:
        auto_gptq.AutoGPTQConfig.get_quant_method = original
    seen = {name for _, name in asked}
    plain = [
        [type(m).__name__, n]
        for n, m in model.named_modules()
        if isinstance(m, LinearBase) and n not in seen and getattr(m, "quant_config", None) is None
    ]
    return {
        "vllm_class": f"{type(model).__module__}.{type(model).__name__}",
        "quant_layers": [[cls, name] for cls, name in asked],
        "unquantized_linears": plain,  # built without a quant config (e.g. routers): no rule reaches them
    }


def record(configs: Path, out: Path) -> dict:
    import transformers
    import vllm

    table = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "command": "python -m moequant.evals.bench.vllm_layer_names configs DIR && "
        "/tmp/vllm-venv/bin/python evals/bench/vllm_layer_names.py record DIR tests/checkpoint/vllm_layer_names.json",
        "what": "per family: every (layer class, name) vLLM's GPTQ config is asked about (the names `dynamic` rules "
        "are matched against), and the Linear layers built without a quant config",
        "families": {},
    }
    port = 29600
    for folder in sorted(p for p in configs.iterdir() if (p / "config.json").is_file()):
        cfg = json.loads((folder / "config.json").read_text())
        mq = json.loads((folder / "moequant.json").read_text())
        entry = {
            "architecture": cfg["architectures"][0],
            "moequant_layers": mq["layers"],
            "expert_keys": mq["expert_keys"],
        }
        try:
            entry |= _record_family(folder, port)
        except Exception as err:  # noqa: BLE001 - recorded: vLLM's own refusal of the family
            tb = traceback.extract_tb(err.__traceback__)
            where = next((f for f in reversed(tb) if "/vllm/" in f.filename), tb[-1] if tb else None)
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            why = (
                lines[1] if len(lines) > 1 and "validation error" in lines[0] else (lines[0] if lines else "")
            )
            entry["refused"] = f"{type(err).__name__}: {why.split(' [type=')[0][:300]}"
            if where is not None:
                entry["refused_at"] = (
                    f"{where.filename.split('site-packages/')[-1]}:{where.lineno} {where.name}"
                )
        table["families"][folder.name] = entry
        print(folder.name, "refused" if "refused" in entry else len(entry["quant_layers"]), flush=True)  # noqa: T201
    out.write_text(json.dumps(table, indent=1) + "\n")
    return table


def main(argv: list[str]) -> int:
    if argv[:1] == ["configs"] and len(argv) == 2:
        for t in write_configs(Path(argv[1])):
            print(t)  # noqa: T201
        return 0
    if argv[:1] == ["record"] and len(argv) == 3:
        record(Path(argv[1]), Path(argv[2]))
        return 0
    print(__doc__)  # noqa: T201
    return 2


if __name__ == "__main__":
    # run by path, this folder heads sys.path, and its kernels.py would shadow the `kernels` package vLLM imports
    # (and vLLM's subprocesses, started in this working directory, would find the repository's kernels/ there)
    import os

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    os.environ["PYTHONSAFEPATH"] = "1"
    sys.exit(main(sys.argv[1:]))
