"""Tiny random models of every registered family, built with the real transformers classes."""

from __future__ import annotations

import torch

from moequant.arch.registry import get_arch

# shared by every family: small enough for CPU tests, big enough for group size 32 on every matrix
COMMON = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    arch = get_arch(model_type)
    kwargs = {**COMMON, **dict(arch.tiny_config), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = None  # ids outside the tiny vocab
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised model of `model_type` (eval mode). Router weights get a larger scale so that
    routing is far from uniform, as in trained models."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    arch = get_arch(model_type)
    from moequant.arch.registry import moe_blocks

    with torch.no_grad():
        for ref in moe_blocks(model, arch, required=False):
            ref.router.weight.normal_(0.0, 0.5)
            if ref.experts.gate_up_proj.abs().sum() == 0:  # some families zero-init experts
                for p in ref.experts.parameters():
                    p.normal_(0.0, 0.05)
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


def save_tiny(model_type: str, path, seed: int = 0, **overrides):
    """Write a tiny random model of `model_type` plus a byte tokenizer to `path` (a from_pretrained folder)."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model
