"""Tiny random models of any MoE family in the installed transformers, built with its real classes.

`tiny_config(model_type)` takes the family's config class with its defaults (a full-size model) and shrinks
it generically, by the kind of each field rather than by family: widths to 64, expert widths to 96, 8 experts
routed top-2, two to four decoder layers chosen so that every kind of layer the defaults interleave (dense /
MoE, attention / linear attention / Mamba, ...) is kept, and the low-rank and head sizes to a few dozen. The
derived adapters (derive.py) probe such a twin for the facts a family's code decides; tests and the families
table build one of every family.
"""

from __future__ import annotations

import torch

# field name -> value, for every family that has the field
_FIXED = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "topk_group": 1,
    "sliding_window": 16,
    "max_window_layers": 4,
    "moe_layer_freq": 1,
    "decoder_sparse_step": 1,
}
_EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
# switches that turn a family's MoE blocks on (Gemma 4 ships dense and MoE variants of one config class)
_MOE_ON = ("enable_moe_block",)
NUM_EXPERTS, TOP_K = 8, 2


def _shrunk_value(key: str, value, config: dict):
    """The tiny value of one config field, or `value` when the field is not a size."""
    if key in _MOE_ON:
        return True
    if key == "vocab_size_per_layer_input" and value:
        return 256
    if key == "moe_intermediate_size" and value is None and "enable_moe_block" in config:
        return 96
    if isinstance(value, bool) or key.endswith("token_id") or key.endswith("token_ids"):
        return value
    if key in _FIXED:
        if key == "head_dim" and config.get("qk_rope_head_dim"):
            return _FIXED["qk_rope_head_dim"]  # MLA families: head_dim is the rope part
        return _FIXED[key] if value is not None else value
    if key in _EXPERT_COUNT:
        return NUM_EXPERTS
    if key in _TOP_K:
        return TOP_K
    if not isinstance(value, int) or value <= 0:
        return value
    if "intermediate" in key or key.endswith("ffn_hidden_size") or key in ("ffn_dim", "expert_dim"):
        return 96 if any(s in key for s in ("moe", "expert", "shared")) else 128
    if key.endswith("head_dim") or key.endswith("d_head"):
        return 16
    if key.endswith("n_heads") or key.endswith("num_heads"):
        return 4
    if key.endswith("_rank"):
        return 32
    if key in ("n_group", "num_expert_group"):
        return min(value, 2)
    if key.endswith("topk") or key.endswith("top_k"):
        return min(value, 8)
    if key in ("first_k_dense_replace", "num_dense_layers"):
        return min(value, 1)
    if key.endswith("layer_period"):
        return min(value, 2)
    if key.endswith("layer_offset"):
        return value % min(config.get(key.replace("offset", "period"), 2) or 2, 2)
    return value


def _layer_choice(config: dict, num_layers: int) -> list[int]:
    """Indices of the decoder layers to keep: the first layer of every combination of per-layer kinds the
    defaults list (at most four), at least two."""
    lists = [v for v in config.values() if isinstance(v, list) and len(v) == num_layers]
    seen, keep = set(), []
    for i in range(num_layers):
        kind = tuple(repr(v[i]) for v in lists)
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    keep = keep[:4]
    for i in range(num_layers):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def shrink_config(config):
    """A copy of `config` shrunk to a tiny model of the same family (sub-configs shrunk likewise)."""
    import copy

    config = copy.deepcopy(config)
    d = config.to_dict()
    num_layers = d.get("num_hidden_layers")
    for key, value in d.items():
        new = _shrunk_value(key, value, d)
        if new is not value:
            _set(config, key, new)
    if isinstance(num_layers, int) and num_layers > 0:
        keep = _layer_choice(d, num_layers)
        _set(config, "num_hidden_layers", len(keep))
        for key, value in d.items():
            if isinstance(value, list) and len(value) == num_layers and key != "architectures":
                _set(config, key, [value[i] for i in keep])
            elif key == "mlp_only_layers" and isinstance(value, list):
                _set(config, key, [])
    for key in ("text_config",):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _set(config, key, shrink_config(sub))
    return config


def _set(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, ValueError, TypeError):
        pass


def causal_lm_type(model_type: str) -> str:
    """The model_type whose AutoModelForCausalLM is the text model of `model_type` (e.g. "qwen3_5_moe_text"
    for the multimodal "qwen3_5_moe"): the model a text-only MoE checkpoint of the family loads as."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = f"{model_type}_text"
    return text if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else model_type


def tiny_config(model_type: str, **overrides):
    """The family's default config, shrunk (see module docstring), then `overrides`."""
    from transformers import AutoConfig

    config = shrink_config(AutoConfig.for_model(causal_lm_type(model_type)))
    for k, v in overrides.items():
        setattr(config, k, v)
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        _set(config, k, None)  # ids outside the tiny vocabulary
    return config


def init_tiny_weights(model, seed: int = 0) -> None:
    """Give a tiny model weights like a trained one where the families' inits leave them degenerate: routers
    far from uniform, experts that some families zero-initialise, and correction biases at zero."""
    from moequant.arch.registry import moe_blocks
    from moequant.errors import NoMoEError

    g = torch.Generator().manual_seed(seed)
    try:
        blocks = moe_blocks(model, required=False)
    except NoMoEError:
        return
    with torch.no_grad():
        for ref in blocks:
            for p in ref.router.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for p in ref.experts.parameters():
                if p.abs().sum() == 0 or not torch.isfinite(p).all():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny model of `model_type` (eval mode). Router weights get a larger scale so that
    routing is far from uniform, as in trained models."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    init_tiny_weights(model, seed)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (no merges), for tiny random models without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny(model_type: str, path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Write a tiny random model of `model_type` plus a byte tokenizer to `path` (a from_pretrained folder)."""
    model = tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
