"""The memory benchmark's inputs: a random Mixtral checkpoint written one decoder layer at a time (bf16
safetensors, one shard per layer plus an index, per-expert `w1/w3/w2` keys as Mixtral checkpoints store them,
the byte tokenizer) and the calibration .txt (the bundled corpus's train split). See evals/bench/memory.py."""

from __future__ import annotations

import json
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
    """A Mixtral checkpoint with random bf16 weights, written one decoder layer at a time. Returns sizes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moequant.arch import resolve
    from moequant.arch.tiny import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    arch, _ = resolve(skeleton)
    disk = arch.disk
    keys = dict(disk.expert_keys)
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
    base = {disk.to_disk(n): _init(n, s, gen, H) for n, s in shapes.items() if not n.startswith(layer_prefix)}
    sizes["base_bytes"] = flush("model-base.safetensors", base)
    del base
    for i in range(config.num_hidden_layers):
        prefix = f"{arch.layers}.{i}."
        tensors, expert_bytes = {}, 0
        for name, shape in shapes.items():
            if not name.startswith(prefix):
                continue
            if experts_tag in name:  # fused [E, 2I, H] / [E, H, I] -> per-expert keys as on disk
                mod, _, param = name.rpartition(".")
                base_key = disk.to_disk(mod)
                E = shape[0]
                for e in range(E):
                    if param == "gate_up_proj":
                        inter = shape[1] // 2
                        for part in ("gate", "up"):
                            t = _init(name, (inter, shape[2]), gen, H)
                            tensors[f"{base_key}.{keys[part].format(e=e)}"] = t
                            expert_bytes += t.numel() * 2
                    elif param == "down_proj":
                        t = _init(name, (shape[1], shape[2]), gen, H)
                        tensors[f"{base_key}.{keys['down'].format(e=e)}"] = t
                        expert_bytes += t.numel() * 2
                    else:
                        raise ValueError(f"unexpected expert parameter {name}")
            else:
                tensors[disk.to_disk(name)] = _init(name, shape, gen, H)
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
