"""Helpers several test files share (put on sys.path by pytest with tests/conftest.py; a child process
started by a test adds this folder itself)."""

from moequant.modules.qexperts import QuantizedExperts

# the families the arch tests run on: the six moequant once wrote adapters for, plus families that exercise the
# other layouts and activations (Aria: transposed, concatenated; Gemma 4: experts directly in the decoder layer
# and its own gate function; MiniMax-M3: GPT-OSS SwiGLU on concatenated experts; Jamba)
ARCH_FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
    "aria_text", "gemma4", "minimax_m3_vl_text", "jamba", "qwen3_5_moe",
]  # fmt: skip


def set_kernel(model, kernel: str | None) -> int:
    """Force every QuantizedExperts of `model` onto "triton" or "reference" (None: automatic). Returns the count."""
    if kernel not in (None, "triton", "reference"):
        raise ValueError(f"kernel must be 'triton', 'reference' or None, got {kernel!r}")
    mods = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in mods:
        m.kernel = kernel
    return len(mods)


def tiny_llama(vocab_size: int = 64):
    """A tiny dense (no Mixture-of-Experts) Llama with random weights: what moequant refuses."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(cfg)
