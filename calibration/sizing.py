"""How much calibration text a model gets by default: GPTQ's usual 128 sequences x 2048 tokens for a real
checkpoint, 128 x 256 for the bundled tiny model.

Why 128 x 2048: every expert's GPTQ Hessian needs at least as many routed tokens as its input width (hidden
size for gate/up, the expert intermediate size for down), or it is rank-deficient and GPTQ leans on its
damping. A layer with E experts and top-k routing gives an expert about N * L * k / E tokens: 262,144 x 8 /
128 = 16,384 for Qwen3-30B-A3B, several times its 2048 hidden size; 128 x 256 gives 2,048, its width exactly,
and the rarely routed experts far fewer. The bundled model (hidden 128, expert width 256, 8 experts, top-2)
already gives its median expert thousands of tokens at 128 x 256, and its demo stays a few seconds. The
sequence length is capped at the model's `max_position_embeddings`. `calibration/coverage.py` reports what
each layer's experts actually saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moequant.checkpoint.bundled import is_bundled

SAMPLES = 128  # sequences, every model
SEQ_LEN = 2048  # tokens per sequence, a real checkpoint (capped at its max_position_embeddings)
BUNDLED_SEQ_LEN = 256  # tokens per sequence, the bundled tiny model


def default_size(model) -> tuple[int, int]:
    """(samples, seq_len) for `model`: an nn.Module, a checkpoint folder, or None / an alias of the bundled model."""
    if not isinstance(model, torch.nn.Module) and is_bundled(model):
        return SAMPLES, BUNDLED_SEQ_LEN
    longest = max_positions(model)
    return SAMPLES, min(SEQ_LEN, longest) if longest else SEQ_LEN


def max_positions(model) -> int | None:
    """The model's `max_position_embeddings` (or its text config's), read without running its code; None
    when the config does not say or cannot be read."""
    if isinstance(model, torch.nn.Module):
        config = model.config.to_dict()
    else:
        try:
            config = json.loads((Path(model) / "config.json").read_text())
        except (OSError, TypeError, ValueError):
            return None
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_size(model, samples: int | None, seq_len: int | None) -> tuple[int, int]:
    """The given samples and seq_len, each None replaced by `default_size(model)`'s."""
    d_samples, d_seq_len = default_size(model)
    return (d_samples if samples is None else samples, d_seq_len if seq_len is None else seq_len)
