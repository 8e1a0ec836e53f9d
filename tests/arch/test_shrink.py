"""Shrinking a family's default config to a tiny model: sizes by the kind of each field, the layers that keep
every kind of layer the defaults interleave, the CausalLM model type of a multimodal family."""

from transformers import MixtralConfig

from moequant.arch.shrink import NUM_EXPERTS, TOP_K, _layer_choice, causal_lm_type, shrink_config


def test_mixtral_defaults_shrink_field_by_field():
    full = MixtralConfig()
    tiny = shrink_config(full)
    assert type(tiny) is MixtralConfig
    assert (full.hidden_size, full.num_hidden_layers) == (4096, 32)  # the defaults are left as they were
    got = {
        k: getattr(tiny, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
            "num_attention_heads",
            "num_key_value_heads",
            "num_hidden_layers",
            "bos_token_id",
            "eos_token_id",
        )
    }
    assert got == {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,  # a dense-style name: 128 (expert-named widths get 96)
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # 32 heads over 8 KV heads: grouped stays grouped
        "num_hidden_layers": 2,  # one kind of layer: the first two
        "bos_token_id": None,  # ids of the full vocabulary
        "eos_token_id": None,
    }
    assert (NUM_EXPERTS, TOP_K) == (8, 2)


def test_layer_choice_keeps_the_first_layer_of_every_kind():
    kinds = ["a", "b", "a", "b", "c", "a"]
    assert _layer_choice({"layer_types": kinds, "other": 1}, 6) == [0, 1, 4]
    assert _layer_choice({"layer_types": ["a"] * 6}, 6) == [0, 1]  # at least two
    assert _layer_choice({"layer_types": list("abcdef")}, 6) == [0, 1, 2, 3]  # at most four
    # a kind is the combination over every per-layer list
    assert _layer_choice({"x": [1, 1, 2, 2], "y": [0, 1, 0, 0]}, 4) == [0, 1, 2]


def test_causal_lm_type_of_a_multimodal_family_is_its_text_model():
    assert causal_lm_type("qwen3_5_moe") == "qwen3_5_moe_text"
    assert causal_lm_type("mixtral") == "mixtral"
