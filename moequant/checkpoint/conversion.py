"""Checkpoint key names from transformers' own weight-conversion mapping (no name table of ours).

transformers 5 loads published checkpoints through a per-family list of transforms (conversion_mapping.py):
renamings (`block_sparse_moe` -> `mlp`) and converters that fuse per-expert keys into the 3-D expert
parameters (`experts.*.w1.weight` + `experts.*.w3.weight` -> `experts.gate_up_proj`, by MergeModulelist then
Concatenate). `save_pretrained` writes the reverse. This module applies the same transforms layer by layer:

- `KeyRoutes(model, checkpoint_keys)`: for every model tensor, the checkpoint keys it is built from and the
  converter that builds it, found by renaming each checkpoint key the way from_pretrained does;
  `assemble(name)` builds one tensor, `assemble_experts(name, experts)` only some experts' rows of a fused
  expert parameter (reading only those experts' keys, or slicing fused keys), with the converter's own ops;
- `renamer_for(config)` and `expert_key_templates(model_type)`: the reverse, for exports that write the
  family's own names (per-expert gate / up / down keys).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from moequant.errors import CheckpointError


def _transforms(model, add_legacy: bool = True):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    convs = get_model_conversion_mapping(model, add_legacy=add_legacy)
    renamings = [c for c in convs if isinstance(c, WeightRenaming)]
    converters = [c for c in convs if isinstance(c, WeightConverter)]
    return renamings, converters


class KeyRoutes:
    """How each model tensor is read from a checkpoint's keys (see module docstring)."""

    def __init__(self, model, checkpoint_keys, read: Callable[[str], torch.Tensor], read_rows=None):
        """`read(key)` loads one checkpoint tensor; `read_rows(key, rows)` rows of its first axis."""
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.model, self.read, self.read_rows = model, read, read_rows
        renamings, converters = _transforms(model)
        meta = model.state_dict()
        self.keys: dict[str, dict[str, list[str]]] = {}  # model name -> {source pattern: [checkpoint keys]}
        self.converter: dict[str, object] = {}
        for key in sorted(checkpoint_keys, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if (
                target not in meta and key in meta
            ):  # renamed though it already was a model name: as transformers
                target, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta)
            if target not in meta:
                continue  # a key the model has no use for (e.g. rotary caches)
            conv = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
            targets = [target]
            if conv is not None and len(conv.target_patterns) > 1:  # one key split into several tensors
                first = conv.target_patterns[0]
                targets += [
                    target.replace(first, other) for other in conv.target_patterns[1:] if first in target
                ]
            for t in targets:
                self.keys.setdefault(t, {}).setdefault(pattern or key, []).append(key)
                if conv is not None:
                    self.converter[t] = conv

    def has(self, name: str) -> bool:
        return name in self.keys

    def assemble(self, name: str) -> torch.Tensor:
        """Model tensor `name`, built from its checkpoint keys."""
        if name not in self.keys:
            raise CheckpointError(f"no checkpoint key maps to {name}")
        groups = self.keys[name]
        conv = self.converter.get(name)
        if conv is None:
            ((key,),) = groups.values()
            return self.read(key)
        return self._convert(name, conv, {p: [self.read(k) for k in ks] for p, ks in groups.items()})

    def assemble_experts(self, name: str, experts: list[int]) -> torch.Tensor:
        """[len(experts), ...] of fused expert parameter `name`: the chunk's own per-expert keys through the
        converter, or rows of fused keys (then the converter's ops must act on later axes only)."""
        if name not in self.keys:
            raise CheckpointError(f"no checkpoint key maps to {name}")
        groups = self.keys[name]
        conv = self.converter.get(name)
        per_expert = conv is not None and any(
            type(op).__name__ == "MergeModulelist" for op in conv.operations
        )
        if per_expert:
            chunk = {}
            for pattern, keys in groups.items():
                by_index = {_expert_index(pattern, k): k for k in keys}
                missing = [e for e in experts if e not in by_index]
                if missing:
                    raise CheckpointError(
                        f"{name}: the checkpoint has no keys for experts {missing} ({pattern})"
                    )
                chunk[pattern] = [self.read(by_index[e]) for e in experts]
            return self._convert(name, conv, chunk)
        if self.read_rows is None:
            return self.assemble(name)[experts]
        if conv is not None and any(_touches_first_axis(op) for op in conv.operations):
            return self.assemble(name)[experts]
        rows = {p: [self.read_rows(k, experts) for k in ks] for p, ks in groups.items()}
        if conv is None:
            ((t,),) = rows.values()
            return t
        return self._convert(name, conv, rows)

    def _convert(self, name: str, conv, collected: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        # transformers names a one-to-many conversion by its first target (ops such as Split size the pieces
        # from it), whichever of the targets is being built here
        first = next(
            (name.replace(t, conv.target_patterns[0]) for t in conv.target_patterns if t in name), name
        )
        for op in conv.operations:
            collected = op.convert(
                collected,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=first,
                model=self.model,
                config=self.model.config,
            )
        if len(collected) == 1:
            (v,) = collected.values()
            return v[0] if isinstance(v, list) else v
        named = {}
        for k, v in collected.items():  # outputs are named by target pattern: back to full model names
            for t in conv.target_patterns:
                if t in name:
                    named[name.replace(t, k)] = v
        if name in named:
            v = named[name]
            return v[0] if isinstance(v, list) else v
        raise CheckpointError(f"the conversion of {name} produced {sorted(collected)}")


def _expert_index(pattern: str, key: str) -> int:
    regex = pattern.replace("*.", r"(\d+)\.").replace("*", r"(\d+)")
    m = re.search(regex, key)
    if m is None:
        raise CheckpointError(f"checkpoint key {key} does not match its pattern {pattern}")
    return int(m.group(1))


def _touches_first_axis(op) -> bool:
    dims = [getattr(op, a, None) for a in ("dim", "dim0", "dim1")]
    return any(d == 0 for d in dims if d is not None) or type(op).__name__ not in (
        "Concatenate",
        "Chunk",
        "Transpose",
        "Interleave",
    )


# ---- the reverse: the family's own names, for exports -------------------------------------------------------


def renamer_for(config: dict) -> Callable[[str], str]:
    """model tensor name -> what save_pretrained calls it when no converter fuses it (renamings only), for the
    model a config.json describes (its skeleton built on the meta device)."""
    return reverse_renamer(meta_skeleton(config))


def meta_skeleton(config: dict):
    """The causal LM a config.json describes (its quantization_config left out), built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg)


def reverse_renamer(model) -> Callable[[str], str]:
    """model tensor name -> the name save_pretrained writes for `model` (transformers' renamings reversed)."""
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    renamings, converters = _transforms(model, add_legacy=False)
    convs = [c for c in renamings + converters if not isinstance(c, PrefixChange)]
    rev = [c.reverse_transform() for c in convs[::-1]]
    rev_renamings = [r for r in rev if isinstance(r, WeightRenaming)]

    def rename(name: str) -> str:  # transformers' apply_renamings (5.25), which 5.19 (vLLM 0.32's pin) lacks
        for r in rev_renamings:
            name = r.rename_source_key(name)[0]
        return name

    return rename


@functools.cache
def expert_key_templates(model_type: str) -> dict[str, str] | None:
    """{"gate" | "up" | "down": "<layers>.{i}.<...>.experts.{e}.<...>.weight"}: the per-expert keys
    save_pretrained writes for the family (learned by reverting index-coded weights of a tiny twin through
    transformers' conversion), or None when it writes fused experts. Experts without a gate (a non-gated
    activation) have "up" and "down" only."""
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion

    from moequant.arch import ExpertWeights, get_arch, moe_blocks
    from moequant.arch.derive import tiny_twin
    from moequant.arch.shrink import causal_lm_type

    twin = tiny_twin(AutoConfig.for_model(causal_lm_type(model_type)))
    arch = get_arch(twin)
    ref = moe_blocks(twin, arch)[-1]
    w0 = arch.expert_weights(ref.experts)
    num, rows_in, hidden = w0.gate_up.shape  # rows_in: 2I ([gate; up]), or I (up alone)
    inter = w0.intermediate
    rows = torch.arange(rows_in, dtype=torch.float64)
    code = lambda e, r: e * 4096 + r + 1  # noqa: E731  distinct per (expert, canonical row)
    gate_up = code(torch.arange(num, dtype=torch.float64)[:, None, None], rows[None, :, None]).expand(
        -1, -1, hidden
    )
    down = -code(torch.arange(num, dtype=torch.float64)[:, None, None], torch.arange(hidden)[None, :, None])
    w = ExpertWeights(gate_up.contiguous(), down.expand(-1, -1, inter).contiguous())
    if arch.has_bias:
        w.gate_up_bias, w.down_bias = torch.zeros(num, rows_in), torch.zeros(num, hidden)
    prefix = f"{arch.layers}.{ref.layer_idx}.{arch.experts_path}"
    fused = {f"{prefix}.{k}": v for k, v in arch.fused_from_canonical(w).items()}
    disk = revert_weight_conversion(twin, fused)
    if set(disk) == set(fused):
        return None  # stored fused
    out = {}
    e = num - 1
    for key, t in disk.items():
        if t.dim() != 2 or key.endswith("bias"):
            continue
        first = t[:, 0]
        vals = first.abs().long() - 1
        if (
            not torch.equal(first, t[:, -1])
            or (vals // 4096).unique().numel() != 1
            or int(vals[0] // 4096) != e
        ):
            continue
        r0 = int(vals[0] % 4096)
        up_row = inter if arch.activation.gated else 0  # canonical row where up starts
        kind = "down" if float(first[0]) < 0 else ("up" if r0 == up_row else "gate" if r0 == 0 else None)
        if kind is None or t.shape[0] != (hidden if kind == "down" else inter):
            continue
        layers = arch.layers.rpartition(".")[2]  # the list's own name: the prefix may be renamed on disk
        tmpl = key.replace(f"{layers}.{ref.layer_idx}.", f"{layers}.{{i}}.", 1)
        head, sep, tail = tmpl.rpartition(f".{e}.")
        out[kind] = f"{head}.{{e}}.{tail}" if sep else tmpl
    wanted = {"gate", "up", "down"} if arch.activation.gated else {"up", "down"}
    return out if set(out) == wanted else None
