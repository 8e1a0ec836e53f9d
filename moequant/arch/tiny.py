"""Tiny random models of any MoE family in the installed transformers, built with its real classes.

`tiny_config(model_type)` is the family's default config shrunk by shrink.py; tests and the families table
(evals/families.py) build one of every family.
"""

from __future__ import annotations

import torch

from moequant.arch.shrink import default_config, shrink_config


def tiny_config(model_type: str, **overrides):
    """The family's default config (sizes it leaves unset filled in), shrunk (see module docstring), then
    `overrides`."""
    config = shrink_config(default_config(model_type))
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def init_tiny_weights(model, seed: int = 0) -> None:
    """Give a tiny model weights like a trained one where the families' inits leave them degenerate: routers
    far from uniform, experts that some families zero-initialise, and correction biases at zero."""
    from moequant.arch.lookup import moe_blocks
    from moequant.errors import NoMoEError, UnsupportedModelError

    g = torch.Generator().manual_seed(seed)
    try:
        blocks = moe_blocks(model, required=False)
    except (NoMoEError, UnsupportedModelError):  # nothing of ours to initialise
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
