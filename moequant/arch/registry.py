"""A model's MoE blocks, located through an adapter (lookup.py derives the adapter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moequant.arch.base import MoEArch

_CONFORMERS: dict[str, Callable[[torch.nn.Module], None]] = {}  # model_type -> its family file's conform


def conform(model: torch.nn.Module) -> None:
    """Let a model whose family's MoE block does not call its experts through transformers' experts interface do
    so, in place (its family file's `conform`, registered with lookup.register): every entry point that is handed
    a model calls this first. Parameters and their names never change; a model that needs nothing is untouched."""
    fn = _CONFORMERS.get(getattr(getattr(model, "config", None), "model_type", None))
    if fn is not None:
        fn(model)


# ---- what a family file (llama4.py, ergo.py) uses to change its blocks' classes in place ------------------


def named_classes(module_name: str, *classes: type) -> tuple[type, ...]:
    """Classes a family file builds at run time (subclasses of transformers' own, whose modeling module is
    imported only then), named as attributes of `module_name` so that pickling (deep copies, torch.save) finds
    them through the module's `classes_getattr`."""
    for cls in classes:
        cls.__module__, cls.__qualname__ = module_name, cls.__name__
    return classes


def classes_getattr(module_name: str, build: Callable[[], tuple[type, ...]]):
    """A family file's module-level `__getattr__`: the classes `build()` returns, by name."""

    def __getattr__(name: str):  # noqa: N807
        found = {cls.__name__: cls for cls in build()}
        if name in found:
            return found[name]
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


def conform_blocks(
    model: torch.nn.Module,
    block_names: tuple[str, ...],
    experts_name: str,
    build: Callable[[], tuple[type, type]],
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> None:
    """Every MoE block of `model` whose class is named in `block_names` (transformers' and the conformed one:
    idempotent) to the block class of `build()` -> (experts class, block class), its experts, if still of
    class `experts_name`, to the experts class; `prepare(block)` first. In place: parameters and names stay."""
    blocks = [mod for mod in model.modules() if type(mod).__name__ in block_names]
    if not blocks:
        return  # `build` imports the family's modeling code: only for a model of the family
    experts_cls, block_cls = build()
    for block in blocks:
        if prepare is not None:
            prepare(block)
        block.__class__ = block_cls
        if type(block.experts).__name__ == experts_name:
            block.experts.__class__ = experts_cls


@dataclass
class MoEBlockRef:
    """One sparse MoE block of a model, resolved through its family's adapter."""

    layer_idx: int
    layer: torch.nn.Module  # the decoder layer
    block: torch.nn.Module  # the sparse MoE block
    router: torch.nn.Module
    experts: torch.nn.Module

    top_k: int | None = None  # from the derived router facts

    @property
    def num_experts(self) -> int:
        down = getattr(self.experts, "down_proj", None)
        return down.shape[0] if isinstance(down, torch.Tensor) else int(self.experts.num_experts)


def set_experts(arch: MoEArch, ref: MoEBlockRef, module: torch.nn.Module) -> None:
    """Let MoE block `ref` run `module` in place of its experts (a quantized module, precomputed outputs, a
    probe's chunked copy): the one way a stage swaps a block's experts; `ref.experts` keeps the original."""
    setattr(ref.block, arch.experts, module)


class experts_swapped:  # noqa: N801  (a context manager, like torch.no_grad)
    """Inside the `with`, the MoE block of `ref` runs `module` in place of its experts (set_experts); the original
    is back on exit. With `ref` None (a dense layer) nothing is swapped."""

    def __init__(self, arch: MoEArch, ref: MoEBlockRef | None, module):
        self.arch, self.ref, self.module = arch, ref, module

    def __enter__(self):
        if self.ref is not None:
            set_experts(self.arch, self.ref, self.module)

    def __exit__(self, *exc):
        if self.ref is not None:
            set_experts(self.arch, self.ref, self.ref.experts)


def _get_path(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: torch.nn.Module, arch: MoEArch) -> torch.nn.ModuleList:
    return _get_path(model, arch.layers)


def carried_input(layer: torch.nn.Module) -> str | None:
    """The keyword through which a decoder layer receives state from the layer before it, or None. Some families
    pass more than hidden states down the stack: GLM-5's and Hunyuan-V4's sparse-attention layers return
    `(hidden_states, topk_indices)` and take the previous layer's as `prev_topk_indices`; Kolibri-1.1's layers
    take `index_pool` (the candidate keys of the latest indexer) and return it, passed on or renewed, as
    `return hidden_states, index_pool`: a keyword the layer's code returns beside the hidden states."""
    import inspect
    import re

    try:
        params = inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        return None
    found = next((p for p in params if p.startswith("prev_")), None)
    if found is not None:
        return found
    try:
        source = inspect.getsource(type(layer).forward)
    except (OSError, TypeError):
        return None
    returned = re.findall(r"return\s+hidden_states\s*,\s*(\w+)\s*$", source, re.M)
    return returned[-1] if returned and returned[-1] in params else None


def is_moe_block(block: torch.nn.Module | None, arch: MoEArch) -> bool:
    experts = getattr(block, arch.experts, None)
    return experts is not None and hasattr(experts, "down_proj") and hasattr(block, arch.router)


def block_of(layer: torch.nn.Module, arch: MoEArch) -> torch.nn.Module | None:
    """The module of decoder layer `layer` that holds router and experts (the layer itself where block is "")."""
    return layer if not arch.block else getattr(layer, arch.block, None)


def block_ref(arch: MoEArch, i: int, layer: torch.nn.Module) -> MoEBlockRef | None:
    """The sparse MoE block of decoder layer i, or None when the layer has none (a dense layer)."""
    block = block_of(layer, arch)
    if not is_moe_block(block, arch):
        return None
    return MoEBlockRef(i, layer, block, getattr(block, arch.router), getattr(block, arch.experts), arch.top_k)


def non_expert_linears(layer: torch.nn.Module, arch: MoEArch) -> list[str]:
    """Names (relative to the decoder layer) of its nn.Linears outside the routed experts: attention, shared
    experts, dense MLPs. Routers and the family's gating Linears are not among them (never quantized)."""
    skip = [arch.experts_path, arch.router_path] + [arch.in_block(g) for g in arch.gates]
    out = []
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip):
            out.append(name)
    return out


def memoizable_children(layer: torch.nn.Module, arch: MoEArch) -> dict[str, torch.nn.Module]:
    """Direct children of a decoder layer whose output depends on the layer's input alone, not on its experts,
    and that cost a matrix product (a weight matrix among their parameters or buffers: quantized Linears keep
    theirs in buffers): attention (or a linear-attention / Mamba mixer), a dense MLP beside the MoE block. A pass that runs the layer twice on the same inputs, first up to its experts, then whole with their
    outputs in place (calibration/memo.py), can replay what these returned the first time. Norms (no weight
    matrix) are cheaper to run again than to keep; nothing when the layer itself is the MoE block."""
    if not arch.block:
        return {}
    block = arch.block.split(".")[0]
    return {
        name: child
        for name, child in layer.named_children()
        if name != block and any(t.dim() >= 2 for t in (*child.parameters(), *child.buffers()))
    }
