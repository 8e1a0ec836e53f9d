"""Shrinking any family's config to a tiny model of the same family, generically.

`shrink_config(config)` keeps the family's config class and every switch of its defaults (a full-size
model) and shrinks the sizes by the kind of each field rather than by family: widths to 64, expert widths to
96, 8 experts routed top-2, two to four decoder layers chosen so that every kind of layer the defaults
interleave (dense / MoE, attention / linear attention / Mamba, ...) is kept, and the low-rank and head
sizes to a few dozen. The derived adapters (derive.py) probe such a twin; tiny.py builds test models.
"""

from __future__ import annotations

import re

# field name -> value, for every family that has the field
_FIXED = {
    "vocab_size": 256,
    "hidden_size": 64,
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
_EXPERT_COUNT = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
)
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
# the decoder-layer count, by the name the config stores (LongCat-Flash stores num_layers, each of two sublayers)
_LAYER_COUNT = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")
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
    if key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        return None  # ids outside the tiny vocabulary
    if isinstance(value, bool) or key.endswith("token_id") or key.endswith("token_ids"):
        return value
    if isinstance(value, int) and key.endswith("key_value_heads"):
        # multi-head attention stays multi-head (MLA families need it), grouped stays grouped
        return 4 if value == config.get(key.replace("key_value", "attention")) else 2
    if isinstance(value, int) and key.endswith("attention_heads"):
        return 4
    if key.endswith("vocab_size") and isinstance(value, int) and value > 0:  # padded / unpadded vocabularies
        return _FIXED["vocab_size"]
    if key in _FIXED:
        if key == "head_dim" and value is not None and value == config.get("qk_rope_head_dim"):
            return _FIXED["qk_rope_head_dim"]  # MLA families whose head_dim is the rope part
        return _FIXED[key] if value is not None else value
    if key in _EXPERT_COUNT:
        return NUM_EXPERTS
    if _other_expert_count(key, value):  # in proportion to the routed experts, at least one
        routed = next((config[k] for k in _EXPERT_COUNT if isinstance(config.get(k), int)), NUM_EXPERTS)
        return max(1, value * NUM_EXPERTS // max(routed, 1))
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
    if key.endswith("n_groups"):  # state-space groups: at most the (shrunk) number of heads
        return min(value, 2)
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


def _other_expert_count(key: str, value) -> bool:
    """A count of expert-like router classes besides the routed experts (LongCat-Flash's zero experts): not the
    routed count, top-k, shared experts or expert groups."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= NUM_EXPERTS:
        return False
    if key in _EXPERT_COUNT or key in _TOP_K or any(s in key for s in ("shared", "group", "per_tok", "size")):
        return False
    return "expert" in key and "num" in key


def _layer_refs(key: str, value, num_layers: int) -> bool:
    """A per-layer list naming, for each layer, a layer at or before it, some naming another (Kolibri-1.1's
    kv_source_layers: the layer whose keys and values each layer reads)."""
    return (
        key.endswith("_layers")
        and isinstance(value, list)
        and len(value) == num_layers
        and all(type(v) is int and 0 <= v <= i for i, v in enumerate(value))
        and any(v != i for i, v in enumerate(value))
    )


def _layer_set(key: str, value, num_layers: int) -> bool:
    """A list of some layers' indices (Kolibri-1.1's index_layers); mlp_only_layers is emptied instead."""
    return (
        key.endswith("_layers")
        and key != "mlp_only_layers"
        and isinstance(value, list)
        and 0 < len(value) < num_layers
        and all(type(v) is int and 0 <= v < num_layers for v in value)
    )


def _layer_choice(config: dict, num_layers: int) -> list[int]:
    """Indices of the decoder layers to keep: the first layer of every combination of per-layer kinds the
    defaults list (at most four), at least two, and every layer a kept one reads from (_layer_refs). A layer's
    kind in a list of layer references is whether it names itself, in a list of layer indices whether it is in
    it."""
    refs = {k for k, v in config.items() if _layer_refs(k, v, num_layers)}
    sets = [set(v) for k, v in config.items() if _layer_set(k, v, num_layers)]
    lists = [v for k, v in config.items() if isinstance(v, list) and len(v) == num_layers and k not in refs]
    seen, keep = set(), []
    for i in range(num_layers):
        kind = tuple(repr(v[i]) for v in lists)
        kind += tuple(config[k][i] == i for k in sorted(refs)) + tuple(i in s for s in sets)
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    keep = keep[:4]
    for i in range(num_layers):
        if len(keep) >= 2:
            break
        if i not in keep:
            keep.append(i)
    keep += [config[k][i] for k in sorted(refs) for i in keep if config[k][i] not in keep]
    return sorted(set(keep))


def shrink_config(config):
    """A copy of `config` shrunk to a tiny model of the same family (sub-configs shrunk likewise)."""
    import copy

    config = copy.deepcopy(config)
    d = config.to_dict()
    layers_key = next((k for k in _LAYER_COUNT if k in d), "num_hidden_layers")
    num_layers = d.get(layers_key)
    for key, value in d.items():
        new = _shrunk_value(key, value, d)
        if new is not value:
            set_field(config, key, new)
    if isinstance(num_layers, int) and num_layers > 0:
        keep = _layer_choice(d, num_layers)
        set_field(config, layers_key, len(keep))
        for key, value in d.items():
            if _layer_refs(key, value, num_layers):  # the kept layers' references, re-indexed
                set_field(config, key, [keep.index(value[i]) for i in keep])
            elif _layer_set(key, value, num_layers):  # the kept layers among them, re-indexed
                set_field(config, key, [keep.index(i) for i in value if i in keep])
            elif isinstance(value, list) and len(value) == num_layers and key != "architectures":
                set_field(config, key, [value[i] for i in keep])
            elif key == "mlp_only_layers" and isinstance(value, list):
                set_field(config, key, [])
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                # per-layer settings keyed by layer index: those of the kept layers, re-indexed
                kept = {j: value.get(i, value.get(str(i))) for j, i in enumerate(keep)}
                set_field(config, key, {j: v for j, v in kept.items() if v is not None})
    _keep_mamba_width(config, d)
    for key in ("text_config",):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            set_field(config, key, shrink_config(sub))
    return _validated(_rebuilt(config), d)


def _validation_error(config) -> str | None:
    """The message of the config class's own validation failing (transformers' strict configs), or None."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as err:  # noqa: BLE001 - strict dataclasses wrap the validator's ValueError
        return str(getattr(err, "__cause__", None) or err)
    return None


def _validated(config, defaults: dict, rounds: int = 4):
    """`config`, with the sizes its family's validator refuses changed until it accepts them: each field the
    validator's message names (in backticks, as transformers' validators quote them) that the shrink set is
    tried at its default where that is no larger (Zaya routes top-1 only), else halved down to 1 (Kolibri-1.1's
    indexer heads, at most the query heads per key head). Returned as it is when nothing helps: the family's
    own error then names the field."""
    for _ in range(rounds):
        message = _validation_error(config)
        if message is None:
            return config
        names = [n.split("=")[0].strip() for n in re.findall(r"`([^`]+)`", message)]
        fixed = False
        for name in dict.fromkeys(names):
            value, default = getattr(config, name, None), defaults.get(name)
            if type(value) is not int or value == default:
                continue
            tries = [default] if type(default) is int and default < value else []
            tries += [value >> n for n in range(1, value.bit_length()) if value >> n >= 1]
            for candidate in tries:
                set_field(config, name, candidate)
                if _validation_error(config) != message:
                    fixed = True
                    break
                set_field(config, name, value)
            if fixed:
                break
        if not fixed:
            return config
    return config


def _rebuilt(config):
    """The shrunk config built again from its fields, so that what the config class derives from the sizes at
    construction (e.g. Dots-3's partial rotary factor, rope head / head width) follows the new sizes; the config
    as set when rebuilding fails."""
    try:
        return type(config).from_dict(config.to_dict())
    except Exception:  # noqa: BLE001 - a class that does not round-trip its own dict keeps the fields as set
        return config


_MAMBA_HEADS = (("mamba_num_heads", "mamba_head_dim"), ("mamba_n_heads", "mamba_d_head"))


def _keep_mamba_width(config, d: dict) -> None:
    """Where the defaults' Mamba heads x head width is the expanded hidden size, keep it so in the shrunk
    config (the heads get the slack)."""
    expand, hidden = d.get("mamba_expand", d.get("expand")), d.get("hidden_size")
    for heads, width in _MAMBA_HEADS:
        if not all(isinstance(v, int) for v in (d.get(heads), d.get(width), expand, hidden)):
            continue
        if d[heads] * d[width] == expand * hidden:
            set_field(config, heads, expand * config.hidden_size // getattr(config, width))


def set_field(config, key: str, value) -> None:
    try:
        setattr(config, key, value)
    except (AttributeError, ValueError, TypeError):
        pass


# Sizes some families' default configs leave unset (None) though their code needs them; published checkpoints
# set them. default_config() fills them in with values fit for the shrunk model (the shrinker keeps them).
_UNSET = {
    "head_dim": 16,  # shrunk: hidden 64 / 4 heads
    "n_shared_experts": 1,
    "indexer_n_heads": 4,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}


def _fill_unset(config) -> None:
    d = config.to_dict()
    for key, value in _UNSET.items():
        if key in d and d[key] is None:
            set_field(config, key, value)
    kinds = getattr(config, "layer_types", "absent")
    n = getattr(config, "num_hidden_layers", 0)
    if kinds is None:  # unset: attention everywhere
        set_field(config, "layer_types", ["full_attention"] * n)
    elif isinstance(kinds, list) and n > 1 and len(kinds) == n and set(kinds) == {"linear_attention"}:
        # all-linear defaults (Granite-4.0-H): real checkpoints mix in attention, and the code needs one
        set_field(config, "layer_types", kinds[:-1] + ["full_attention"])


def default_config(model_type: str):
    """The default config of `model_type`'s CausalLM, with the sizes the defaults leave unset filled in (a
    full-size model of the family, as the tiny twins and test models start from)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(causal_lm_type(model_type))
    _fill_unset(config)
    return config


def causal_lm_type(model_type: str) -> str:
    """The model_type whose AutoModelForCausalLM is the text model of `model_type` (e.g. "qwen3_5_moe_text"
    for the multimodal "qwen3_5_moe"): the model a text-only MoE checkpoint of the family loads as."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = f"{model_type}_text"
    return text if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else model_type
