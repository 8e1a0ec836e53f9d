"""moequant checkpoint keys -> the keys vLLM's model loads, and which MoE layer a vLLM experts layer is.

moequant writes transformers' in-memory names (`model.layers.0.mlp.gate.weight`) and each expert's tensors under
the experts module (`model.layers.0.mlp.experts.3.gate_up.qweight`, modules/qexperts.py). vLLM's models load the
family's published names (`model.layers.0.block_sparse_moe.gate.weight`), and its experts layer routes a
per-expert key `...experts.3.<gate name>.<tensor>` to its parameter `w13_<tensor>` with expert id 3 and shard
"w1", `...experts.3.<down name>.<tensor>` to `w2_<tensor>` with shard "w2" (vLLM 0.32:
vllm/model_executor/layers/fused_moe/routed_experts.py, RoutedExperts.load_weights and
build_expert_params_mapping). Both renames come from transformers' own conversion mapping
(checkpoint/conversion.py): no family's names are written here. Nothing here imports vLLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moequant.errors import CheckpointError

PROJECTIONS = ("gate_up", "down")  # QuantizedExperts' per-expert storage names, in vLLM's shard order w1, w2
SHARDS = {"gate_up": "w1", "down": "w2"}  # the shard id vLLM passes with each projection's tensors
PARAM_STEMS = {"gate_up": "w13", "down": "w2"}  # vLLM's experts parameter `<stem>_<tensor>` each lands in


@dataclass(frozen=True)
class Rename:
    pattern: str  # a regular expression searched in a full checkpoint key
    replacement: str  # re.sub's replacement


@dataclass(frozen=True)
class VllmNames:
    """How one model family's moequant checkpoint keys reach vLLM's modules."""

    renames: tuple[Rename, ...]  # applied in order, experts first (what vLLM's WeightsMapper does with them)
    experts_template: str  # vLLM's experts layer name, "model.layers.{i}.block_sparse_moe.experts"

    def rename(self, key: str) -> str:
        for r in self.renames:
            key = re.sub(r.pattern, r.replacement, key)
        return key

    def layer_index(self, prefix: str) -> int | None:
        """The MoE layer a vLLM experts layer named `prefix` is, or None when the name is not one."""
        head, _, tail = self.experts_template.partition("{i}")
        m = re.fullmatch(re.escape(head) + r"(\d+)" + re.escape(tail), prefix)
        return int(m.group(1)) if m else None


def _digits_pattern(name: str) -> tuple[str, int]:
    """A regex matching `name` with each dotted integer segment free (captured), and how many there are."""
    parts = re.split(r"(?<=\.)\d+(?=\.)", name)
    return r"(\d+)".join(re.escape(p) for p in parts), len(parts) - 1


def _digits_replacement(name: str, groups: int) -> str | None:
    """`name` with its dotted integer segments replaced by the groups \\1..\\n in order; None if the count differs."""
    parts = re.split(r"(?<=\.)\d+(?=\.)", name)
    if len(parts) - 1 != groups:
        return None
    out = parts[0]
    for k, p in enumerate(parts[1:], start=1):
        out += rf"\g<{k}>" + p.replace("\\", "\\\\")
    return out


def vllm_names(config: dict) -> VllmNames:
    """The renames for the model a moequant checkpoint's config.json describes (a meta-device skeleton)."""
    from moequant.arch import get_arch
    from moequant.checkpoint.conversion import expert_key_templates, meta_skeleton, reverse_renamer

    model_type = config["model_type"]
    skeleton = meta_skeleton(config)
    arch = get_arch(skeleton)
    templates = expert_key_templates(model_type)
    if templates is None:
        raise CheckpointError(
            f"{model_type}: its published checkpoints store fused experts, which vLLM loads without per-expert "
            "keys; the moequant vLLM plugin places per-expert tensors only"
        )
    published = {}
    for kind in ("gate", "down"):
        head, sep, tail = templates[kind].partition(".{e}.")
        if not sep or not tail.endswith(".weight"):
            raise CheckpointError(f"{model_type}: unexpected per-expert key template {templates[kind]}")
        published[kind] = (head, tail.removesuffix(".weight"))
    experts_template = published["gate"][0]
    if published["down"][0] != experts_template:
        raise CheckpointError(f"{model_type}: gate and down experts live under different modules")
    ours = f"{arch.layers}.{{i}}.{arch.experts_path}"
    renames = []
    for proj, kind in (("gate_up", "gate"), ("down", "down")):
        src = re.escape(ours).replace(re.escape("{i}"), r"(\d+)") + r"\.(\d+)\." + re.escape(proj) + r"\."
        dst = experts_template.replace("{i}", r"\g<1>") + r".\g<2>." + published[kind][1] + "."
        renames.append(Rename("^" + src, dst))
    rename = reverse_renamer(skeleton)
    experts_tag = f".{arch.experts_path}."
    seen = set()
    for name in skeleton.state_dict():
        if experts_tag in name:
            continue  # the experts' tensors: the rules above
        module = name.rpartition(".")[0]
        new_module = rename(name).rpartition(".")[0]
        if not module or module == new_module:
            continue
        pattern, groups = _digits_pattern(module + ".")
        replacement = _digits_replacement(new_module + ".", groups)
        if replacement is None:
            raise CheckpointError(
                f"{model_type}: cannot express the rename {module} -> {new_module} by pattern"
            )
        if pattern not in seen:
            seen.add(pattern)
            renames.append(Rename("^" + pattern, replacement))
    return VllmNames(tuple(renames), experts_template)
