"""The memory benchmarks' inputs: a random checkpoint written one decoder layer at a time (bf16 safetensors,
one shard per layer plus an index, per-expert keys as the family's checkpoints store them, the byte
tokenizer) and the calibration .txt (the bundled corpus's train split). See evals/bench/memory.py and
evals/bench/real_shapes.py."""

from __future__ import annotations

import json
import math
from pathlib import Path


def synthetic_config(hidden: int, intermediate: int, layers: int, experts: int, top_k: int, heads: int):
    from transformers import MixtralConfig

    kv_heads = max(heads // 4, 1)
    config = MixtralConfig(
        vocab_size=256,  # the byte tokenizer
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # ids outside the byte vocab
    config.dtype = "bfloat16"
    config.architectures = ["MixtralForCausalLM"]
    return config


def _init(name: str, shape, gen, hidden: int):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 4.0 / hidden**0.5 if name.endswith(".gate.weight") else 0.02  # router logits std ~4: uneven routing
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def write_synthetic_checkpoint(path: Path, config, seed: int = 0) -> dict:
    """A checkpoint of `config`'s family with random bf16 weights, in the family's published key layout
    (per-expert keys where save_pretrained writes them: checkpoint/conversion.py), written one decoder layer
    at a time. Returns sizes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moequant.arch import resolve
    from moequant.arch.tiny import byte_tokenizer
    from moequant.checkpoint.conversion import expert_key_templates, renamer_for

    path.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch, _ = resolve(skeleton)
    templates = expert_key_templates(config.model_type)
    to_disk = renamer_for(config.to_dict())
    experts_tag = f".{arch.experts_path}."
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    del skeleton
    gen = torch.Generator().manual_seed(seed)
    H = config.hidden_size
    weight_map: dict[str, str] = {}
    sizes = {"expert_bytes": 0, "layer_bytes": [], "base_bytes": 0, "total_bytes": 0}

    def flush(shard: str, tensors: dict) -> int:
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    layer_prefix = f"{arch.layers}."
    base = {to_disk(n): _init(n, s, gen, H) for n, s in shapes.items() if not n.startswith(layer_prefix)}
    sizes["base_bytes"] = flush("model-base.safetensors", base)
    del base
    for i in range(config.num_hidden_layers):
        prefix = f"{arch.layers}.{i}."
        tensors, expert_bytes = {}, 0
        for name, shape in shapes.items():
            if not name.startswith(prefix):
                continue
            param = name.rpartition(".")[2]
            if experts_tag in name and templates is not None and param in ("gate_up_proj", "down_proj"):
                E = shape[
                    0
                ]  # fused [E, 2I, H] / [E, H, I] (not transposed: checked below) -> per-expert keys
                for e in range(E):
                    parts = ("gate", "up") if param == "gate_up_proj" else ("down",)
                    rows = shape[1] // len(parts)
                    for part in parts:
                        t = _init(name, (rows, shape[2]), gen, H)
                        tensors[templates[part].format(i=i, e=e)] = t
                        expert_bytes += t.numel() * 2
            else:
                if experts_tag in name:
                    expert_bytes += math.prod(shape) * 2
                tensors[to_disk(name)] = _init(name, shape, gen, H)
        if arch.layout.transposed and templates is not None:
            raise ValueError(f"{config.model_type}: transposed fused experts with per-expert keys")
        sizes["layer_bytes"].append(flush(f"model-layer-{i:05d}.safetensors", tensors))
        sizes["expert_bytes"] += expert_bytes
        del tensors
    sizes["total_bytes"] = sizes["base_bytes"] + sum(sizes["layer_bytes"])
    index = {"metadata": {"total_size": sizes["total_bytes"]}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return sizes


def write_calibration_text(path: Path) -> int:
    from moequant.calibration.corpus import load_split

    text = "\n\n".join(load_split("train").values())
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))
