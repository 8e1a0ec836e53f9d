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


def test_extra_expert_classes_shrink_with_the_experts_and_layers_by_their_own_name():
    """LongCat-Flash: zero experts (256 beside 512 routed) shrink in proportion; its layer count is num_layers
    (each layer two sublayers: num_hidden_layers is twice it)."""
    from transformers import LongcatFlashConfig

    tiny = shrink_config(LongcatFlashConfig())
    assert (tiny.n_routed_experts, tiny.zero_expert_num, tiny.num_layers) == (NUM_EXPERTS, 4, 2)


def test_shrunk_configs_pass_their_familys_validator():
    """Zaya routes top-1 only: its default stays. Kolibri-1.1 lists layers by index (index_layers) and per layer
    the layer whose keys and values it reads (kv_source_layers): the kept layers' entries, re-indexed, with the
    layers they read kept; its indexer heads at most the query heads per key head."""
    from transformers import Kolibri1_1Config, ZayaConfig

    zaya = shrink_config(ZayaConfig())
    zaya.validate()
    assert zaya.num_experts_per_tok == 1 and zaya.num_experts == NUM_EXPERTS
    full = Kolibri1_1Config()
    assert full.index_layers == [4, 14, 19, 29] and full.kv_source_layers[9] == 4
    tiny = shrink_config(full)
    tiny.validate()
    assert tiny.layer_types == ["sliding_attention"] + ["indexed_attention"] * 3  # layers 0, 4, 9, 14
    assert (tiny.kv_source_layers, tiny.index_layers) == ([0, 1, 1, 1], [1, 3])
    assert tiny.index_num_heads == 2 == tiny.num_attention_heads // tiny.num_key_value_heads


def test_layer_choice_keeps_the_layers_a_kept_layer_reads():
    kinds = ["s", "i", "i", "i", "i"]
    refs = [0, 1, 1, 3, 1]  # layers 2 and 4 read layer 1's keys and values
    assert _layer_choice({"layer_types": kinds, "kv_source_layers": refs}, 5) == [0, 1, 2]
    # a per-layer list whose every layer names itself is an ordinary per-layer list (Llama 4's moe_layers)
    assert _layer_choice({"moe_layers": list(range(6))}, 6) == [0, 1, 2, 3]
    assert _layer_choice({"layer_types": ["a"] * 6, "index_layers": [3]}, 6) == [0, 3]
