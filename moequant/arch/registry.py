"""Registry of MoE families by `model_type`, and lookup of a model's MoE blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.arch.base import MoEArch
from moequant.errors import NoMoEError, UnsupportedModelError

_REGISTRY: dict[str, MoEArch] = {}


def register(arch: MoEArch) -> MoEArch:
    if arch.model_type in _REGISTRY:
        raise ValueError(f"MoE family {arch.model_type!r} is already registered")
    _REGISTRY[arch.model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_or_config) -> MoEArch:
    """The adapter for a model, a config, or a model_type string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(supported_model_types())}"
    )


@dataclass
class MoEBlockRef:
    """One sparse MoE block of a model, resolved through its family's adapter."""

    layer_idx: int
    layer: torch.nn.Module  # the decoder layer
    block: torch.nn.Module  # the sparse MoE block
    router: torch.nn.Module
    experts: torch.nn.Module

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def _get_path(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: torch.nn.Module, arch: MoEArch) -> torch.nn.ModuleList:
    return _get_path(model, arch.layers)


def is_moe_block(block: torch.nn.Module | None, arch: MoEArch) -> bool:
    experts = getattr(block, arch.experts, None)
    return experts is not None and hasattr(experts, "gate_up_proj") and hasattr(block, arch.router)


def block_ref(arch: MoEArch, i: int, layer: torch.nn.Module) -> MoEBlockRef | None:
    """The sparse MoE block of decoder layer i, or None when the layer has none (a dense layer)."""
    block = getattr(layer, arch.block, None)
    if not is_moe_block(block, arch):
        return None
    return MoEBlockRef(i, layer, block, getattr(block, arch.router), getattr(block, arch.experts))


def moe_blocks(model: torch.nn.Module, arch: MoEArch | None = None, required: bool = True) -> list[MoEBlockRef]:
    """Every sparse MoE block of `model`, in layer order. Raises when there is none (if `required`)."""
    arch = arch or get_arch(model)
    refs = [r for i, layer in enumerate(decoder_layers(model, arch)) if (r := block_ref(arch, i, layer))]
    if not refs and required:
        raise NoMoEError(f"{type(model).__name__} ({arch.model_type}) has no sparse MoE block")
    return refs


def resolve(model: torch.nn.Module) -> tuple[MoEArch, list[MoEBlockRef]]:
    """Adapter and MoE blocks of a model; clear errors for dense or unsupported models."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        # a dense model of a family we do not know is better reported as "no MoE" when it clearly has none
        has_experts = any(
            name.endswith(".experts") or name.endswith("experts") for name, _ in model.named_modules()
        )
        if not has_experts:
            raise NoMoEError(
                f"{type(model).__name__} (model_type {model_type!r}) has no Mixture-of-Experts blocks; "
                f"moequant quantizes MoE models: {', '.join(supported_model_types())}"
            )
    arch = get_arch(model)
    return arch, moe_blocks(model, arch)
