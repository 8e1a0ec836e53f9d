"""The MoE families of the installed transformers, read from its modeling code."""

from moequant.arch import supported_model_types


def test_families_of_this_transformers():
    types = supported_model_types()
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_5_moe"} <= set(
        types
    )
    assert "llama4_text" in types  # its experts follow the interface through arch/llama4.py
    assert len(types) >= 40  # read from the installed modeling code, not a list of ours
