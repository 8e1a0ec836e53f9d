"""Resolve a model name (bundled, local folder, Hub id) and load model + tokenizer safely."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moequant.errors import CheckpointError, MoEQuantError

logger = logging.getLogger(__name__)


def resolve_model_path(name: str | None) -> str:
    """The bundled model for None/"bundled", a local folder as is, else a Hub id (returned unchanged)."""
    from moequant.checkpoint.bundled import bundled_model_path, is_bundled

    if is_bundled(name):
        return str(bundled_model_path())
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is not a model folder: config.json is missing")
        return str(path)
    return name


def check_model_code(path: str | Path | None, trust_remote_code: bool = False) -> None:
    """Refuse, in one line and before anything is loaded, a model folder whose config.json points at its
    own code (`auto_map`) for a model type this transformers does not know, unless `trust_remote_code`
    (transformers would refuse it later, in a message of several lines)."""
    import json

    from transformers import CONFIG_MAPPING

    config = Path(path) / "config.json" if path is not None else None
    if trust_remote_code or config is None or not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # an unreadable config is reported where it is read
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not auto_map or cfg.get("model_type") in CONFIG_MAPPING:
        return
    code = ", ".join(f"{k} -> {v}" for k, v in auto_map.items() if isinstance(v, str)) or str(auto_map)
    raise CheckpointError(
        f"{path} runs its own model code (model_type {cfg.get('model_type')!r}, auto_map {code}); pass "
        "--trust-remote-code only if you trust this repository's code"
    )


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are slow and lossy), bf16 on accelerators."""
    device = torch.device(device) if device is not None else None
    return torch.float32 if device is None or device.type == "cpu" else torch.bfloat16


def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError variously
        raise MoEQuantError(
            f"no usable tokenizer for {name or 'the bundled model'} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); the model folder needs tokenizer files "
            "(tokenizer.json or tokenizer_config.json + vocab)"
        ) from None


def load_model(
    name: str | None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode. Weights come from safetensors only (never pickle)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    dtype = dtype or default_dtype(device)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise CheckpointError(f"{path} has no .safetensors weights (moequant never loads pickled weights)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except MoEQuantError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err):
            msg += " (pass --trust-remote-code only if you trust this repository's code)"
        raise CheckpointError(f"could not load {name or 'the bundled model'}: {msg}") from None
    if device:
        model.to(device)
    return model.eval()
