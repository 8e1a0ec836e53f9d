"""The bundled, trained tiny MoE (`moequant/assets/tiny-moe`): the model the CLI, demos and tests use offline.

It is a MixtralForCausalLM (4 layers, 8 experts, top-2, ~3.9M parameters, bf16 safetensors) with its
byte-level BPE tokenizer, trained by `tools/train_tiny_moe.py` on the bundled corpus
(`moequant.calibration.corpus`). Load it with the plain transformers API:

    AutoModelForCausalLM.from_pretrained(bundled_model_path())
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODEL_ID = "moequant/tiny-moe"  # a pseudo hub id users can type; it never reaches the hub
_ALIASES = frozenset({"bundled", "tiny-moe", BUNDLED_MODEL_ID})


def bundled_model_path() -> Path:
    """The folder of the bundled model (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-moe"


def is_bundled(name_or_path: str | os.PathLike | None) -> bool:
    """True for None (the default model), "bundled", "tiny-moe", BUNDLED_MODEL_ID, or the folder itself."""
    if name_or_path is None:
        return True
    if isinstance(name_or_path, str) and name_or_path.strip() in _ALIASES:
        return True
    try:
        return Path(name_or_path).resolve() == bundled_model_path()
    except (TypeError, OSError):
        return False
