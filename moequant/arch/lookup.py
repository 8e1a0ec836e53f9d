"""The adapter of a model (derived, cached per config) and its MoE blocks."""

from __future__ import annotations

import dataclasses
import json

import torch

from moequant.arch.base import MoEArch
from moequant.arch.derive import derive_arch, find_structure, tiny_twin
from moequant.arch.registry import _CONFORMERS, MoEBlockRef, block_ref, conform, decoder_layers
from moequant.arch.shrink import default_config
from moequant.errors import NoMoEError, UnsupportedModelError

_OVERRIDES: dict[str, dict] = {}  # model_type -> fields a hand-written file corrects in the derived adapter
_FIELDS_OF: dict[str, object] = {}  # model_type -> config -> fields that depend on the config
_CACHE: dict[tuple[str, str], MoEArch] = {}


def register(model_type: str, conform=None, fields_of=None, **fields) -> None:
    """For a family whose code the derivation cannot read (one small file in moequant/arch/ calling this):
    `conform(model)` makes its MoE blocks call their experts through transformers' experts interface, in place,
    before anything is derived (registry.conform); `fields` are fields of its MoEArch to set by hand after, and
    `fields_of(config)` those that depend on the model's config."""
    if model_type in _OVERRIDES:
        raise ValueError(f"MoE family {model_type!r} already has hand-written fields")
    _OVERRIDES[model_type] = fields
    if fields_of is not None:
        _FIELDS_OF[model_type] = fields_of
    if conform is not None:
        _CONFORMERS[model_type] = conform


def _key(config) -> tuple[str, str]:
    d = config.to_dict()
    for k in ("quantization_config", "dtype", "torch_dtype", "_name_or_path"):
        d.pop(k, None)  # a quantized model shares its original's adapter
    return type(config).__name__, json.dumps(d, sort_keys=True, default=str)


def get_arch(model_or_config) -> MoEArch:
    """The adapter for a model, a config, or a model_type string, derived from the model (derive.py) and
    cached per config."""
    from transformers import PretrainedConfig

    if isinstance(model_or_config, str):
        try:
            config = default_config(model_or_config)
        except ValueError:
            raise UnsupportedModelError(
                f"model_type {model_or_config!r} is not a model type of the installed transformers"
            ) from None
        model = None
    elif isinstance(model_or_config, PretrainedConfig):
        config, model = model_or_config, None
    else:
        model = model_or_config
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformers config")
        conform(model)
    key = (type(model).__name__ if model is not None else "", *_key(config))
    if key not in _CACHE:
        if model is None:
            model = tiny_twin(config)
            arch = derive_arch(model, twin=model)
        else:
            arch = derive_arch(model)
        if arch.model_type in _OVERRIDES:
            arch = dataclasses.replace(arch, **_OVERRIDES[arch.model_type])
        if arch.model_type in _FIELDS_OF:
            arch = dataclasses.replace(arch, **_FIELDS_OF[arch.model_type](config))
        _CACHE[key] = arch
    return _CACHE[key]


def forget_adapters() -> None:
    """Drop every cached adapter, so the next get_arch derives again (as the first load of a process does)."""
    _CACHE.clear()


def moe_blocks(
    model: torch.nn.Module, arch: MoEArch | None = None, required: bool = True
) -> list[MoEBlockRef]:
    """Every sparse MoE block of `model`, in layer order. Raises when there is none (if `required`)."""
    conform(model)
    arch = arch or get_arch(model)
    refs = [r for i, layer in enumerate(decoder_layers(model, arch)) if (r := block_ref(arch, i, layer))]
    if not refs and required:
        raise NoMoEError(f"{type(model).__name__} ({arch.model_type}) has no sparse MoE block")
    return refs


def resolve(model: torch.nn.Module) -> tuple[MoEArch, list[MoEBlockRef]]:
    """Adapter and MoE blocks of a model; clear errors for dense or unsupported models."""
    find_structure(model)  # NoMoEError / UnsupportedModelError before any probing
    arch = get_arch(model)
    return arch, moe_blocks(model, arch)
