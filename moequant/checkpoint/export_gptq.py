"""Export a moequant checkpoint to the GPTQ v1 format (GPTQModel-style `dynamic` config) for vLLM/SGLang.

Serving stacks run one scheme per fused MoE layer, so the export needs, in every MoE layer, all experts
integer-quantized (GPTQ or RTN) at one symmetric 4- or 8-bit width, and one group size throughout. Layers may
differ in width only when asked (`allow_mixed`: vLLM's Marlin MoE crashes on mixed-width GPTQ MoE models,
vllm-project/vllm#41955; compressed-tensors, export_ct.py, is the format for those): the `dynamic` map
(dynamic_rules) overrides `bits` per layer, and a negative rule keeps every module outside the routed experts
(attention, routers, shared experts, dense MLPs) unquantized.

Key names (`names`): "published" (default) writes the family's own on-disk names, as its per-expert
checkpoints and vLLM's loaders spell them (Mixtral: `...block_sparse_moe.experts.3.w1.qweight`);
"transformers" writes the names of transformers 5's modules with the experts unfused into per-expert
`gate_proj` / `up_proj` / `down_proj` (`...mlp.experts.3.gate_proj.qweight`), which is what GPTQModel 7.6
reads under transformers 5 (it checks for exactly those keys). Same tensors either way.

Experts without a gate projection (a non-gated activation, relu2: Nemotron-H) have an up and a down projection
and nothing else: the export writes those two (`backbone.layers.1.mixer.experts.3.up_proj.qweight`, as
Nemotron-H's checkpoints name them). vLLM's NemotronH model loads exactly these: its experts are a FusedMoE
with `ckpt_names=("up_proj", "down_proj", None)` and a `*_no_mul` activation (w13 holds up alone), and its GPTQ
and compressed-tensors MoE methods size w13 by `w13_num_shards` (1 when non-gated); the Marlin and Triton
WNA16 experts run relu2 without a gate on CUDA (vLLM refuses a non-gated MoE on CPU).

Tensors per expert projection:
    qweight [K*bits/32, N] int32   (K-packed, identical to moequant's packing for 4 and 8 bits)
    qzeros  [G, N*bits/32] int32   (N-packed, v1 convention: stored value = zero point - 1)
    scales  [G, N] float16
    g_idx   [K] int32
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from moequant.arch import get_arch
from moequant.checkpoint.conversion import expert_key_templates, renamer_for
from moequant.checkpoint.export_card import write_card
from moequant.checkpoint.export_common import ExportError, copy_other_files, read_moequant, write_shards
from moequant.checkpoint.writer import CheckpointWriter
from moequant.config import ExpertSpec, spec_label
from moequant.quantizers.packing import group_index, pack

logger = logging.getLogger(__name__)


def check_exportable(
    model_type: str, specs: dict[int, list], act_order: bool = False
) -> tuple[int, int, dict[int, int]]:
    """(base bits, group size, per-layer bits) or an ExportError saying why not."""
    if expert_key_templates(model_type) is None:
        raise ExportError(
            f"GPTQ export needs per-expert tensors on disk; {model_type} stores fused experts (keep the moequant format)"
        )
    layer_bits, group_sizes = {}, set()
    for i, layer in sorted(specs.items()):
        split = [e for e, s in enumerate(layer) if isinstance(s, ExpertSpec)]
        if split:
            raise ExportError(
                f"GPTQ export needs one scheme per expert; layer {i} expert {split[0]} stores gate/up and down at "
                f"different widths ({spec_label(layer[split[0]])}): plan without per-projection widths"
            )
        kinds = {(s.method, s.bits, s.sym) for s in layer}
        bad = [s for s in layer if not s.method.is_integer or not s.sym or s.bits not in (4, 8)]
        if bad:
            s = bad[0]
            why = f"{s.method.value}:{s.bits}{'' if s.sym else ' asymmetric'}"
            raise ExportError(
                f"GPTQ export needs every expert at symmetric 4 or 8 bits (what vLLM serves); layer {i} has {why}. "
                "Quantize with --sym --uniform --bits 4 (or 8), or a plan using only symmetric 4/8-bit widths"
            )
        if len({b for _, b, _ in kinds}) != 1:
            widths = sorted({s.bits for s in layer})
            raise ExportError(
                f"GPTQ export needs one width per MoE layer (a fused layer runs one scheme); layer {i} mixes {widths} bits"
            )
        layer_bits[i] = layer[0].bits
        group_sizes |= {s.group_size for s in layer}
    if len(group_sizes) != 1:
        raise ExportError(f"GPTQ export needs one group size throughout, found {sorted(group_sizes)}")
    base = Counter(layer_bits.values()).most_common(1)[0][0]
    return base, group_sizes.pop(), layer_bits


MIXED_GPTQ_REASON = (
    "vLLM's Marlin MoE kernels crash on GPTQ MoE layers of different widths (vllm-project/vllm#41955, unfixed); "
    "compressed-tensors int4 and int8 MoE layers load (vllm-project/vllm#47154)"
)


def refuse_mixed_widths(layer_bits: dict[int, int], flag: str = "--allow-mixed-gptq") -> None:
    """An ExportError when the MoE layers hold different widths: a GPTQ checkpoint vLLM would crash on."""
    widths = sorted(set(layer_bits.values()))
    if len(widths) > 1:
        counts = {b: sum(v == b for v in layer_bits.values()) for b in widths}
        by = ", ".join(f"{n} layer{'s' * (n > 1)} at {b} bits" for b, n in counts.items())
        raise ExportError(
            f"GPTQ with MoE layers of different widths ({by}): {MIXED_GPTQ_REASON}. Write compressed-tensors "
            f"instead (--format compressed-tensors, or export-compressed-tensors), or pass {flag} to write GPTQ anyway"
        )


def pack_zeros_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zero points [G, N] -> qzeros [G, N*bits/32] int32 (v1: zero - 1, packed along N)."""
    z = (zeros.to(torch.int64) - 1).T.contiguous()  # [N, G]: pack along N = the first axis of pack()
    return pack(z, bits).T.contiguous()  # [G, N*bits/32]


def _projection_tensors(storage, rows: slice, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """qweight/qzeros/scales/g_idx of output rows `rows` of one packed storage module."""
    k = storage.in_features
    n = rows.stop - rows.start
    if (n * bits) % 32:
        raise ExportError(f"GPTQ export needs out_features * bits divisible by 32, got {n} x {bits}")
    zero = 1 << (bits - 1)
    zeros = torch.full((storage.scales.shape[0], n), zero, dtype=torch.int64)  # [G, N] symmetric zero point
    g_idx = group_index(k, group_size, storage.g_idx).to(torch.int32)  # [K]
    return {
        "qweight": storage.qweight[:, rows].contiguous(),  # [K*bits/32, N]
        "qzeros": pack_zeros_v1(zeros, bits),  # [G, N*bits/32]
        "scales": storage.scales[:, rows].contiguous(),  # [G, N]
        "g_idx": g_idx,
    }


# A routed-experts name: vLLM's fused MoE layer (`model.layers.3.block_sparse_moe.experts`, no trailing dot:
# vLLM matches each layer's own name), or one expert's projection as GPTQModel names its modules
# (`model.layers.3.mlp.experts.5.gate_proj`). Shared experts (`shared_expert`, `shared_experts`, `shared_mlp`),
# routers (`gate`, `router`, also `experts.gate` under vLLM's Transformers backend) and attention never match.
EXPERTS_NAME = r"\.experts(?:\.\d+\.[^.]+)?$"


def dynamic_rules(layers: str, layer_bits: dict[int, int], base_bits: int) -> dict[str, dict]:
    """The GPTQ `dynamic` map of one width per MoE layer: a negative rule leaving every module that is not a
    routed expert unquantized, then a positive rule per layer whose width is not `base_bits`.

    vLLM (`gptq_utils.get_dynamic_override`) and GPTQModel (`dynamic_get`) both walk the rules in order with
    `re.match(pattern, name)`: a matching "-:" rule skips the module, the first matching "+:" rule overrides
    the base config. `layers` is the decoder layers' path ("model.layers"); anything may precede it (a
    multimodal wrapper's `language_model.`)."""
    rules: dict[str, dict] = {rf"-:^(?!.*{EXPERTS_NAME}).*$": {}}
    for i, b in sorted(layer_bits.items()):
        if b != base_bits:
            rules[rf"+:^(?:.*\.)?{re.escape(layers)}\.{i}\.(?:.+\.)?experts(?:\.\d+\.[^.]+)?$"] = {"bits": b}
    return rules


KEY_NAMES = ("published", "transformers")


def export_gptq(
    src: str | Path,
    out: str | Path,
    overwrite: bool = False,
    names: str = "published",
    allow_mixed: bool = False,
) -> Path:
    """Convert the moequant checkpoint folder `src` into a GPTQ v1 folder `out` (key names: see module doc).
    Layers of different widths are refused (refuse_mixed_widths) unless `allow_mixed`."""
    if names not in KEY_NAMES:
        raise ExportError(f"unknown key names {names!r}: choose one of {', '.join(KEY_NAMES)}")
    from moequant.checkpoint.format import build_quantized_experts

    src, cfg, qc = read_moequant(src, "GPTQ")
    model_type = cfg["model_type"]
    arch = get_arch(model_type)
    base_bits, group_size, layer_bits = check_exportable(model_type, qc.specs())
    if not allow_mixed:
        refuse_mixed_widths(layer_bits)
    modules = build_quantized_experts(qc, device="cpu")
    keys, to_disk = _key_names(names, cfg, arch)
    check_projection_keys(keys, modules, model_type)
    writer = CheckpointWriter(out, overwrite=overwrite)
    written, nbytes = write_shards(
        writer,
        src,
        arch,
        modules,
        to_disk,
        lambda i: _layer_tensors(modules[i], i, keys, layer_bits[i], group_size),
    )
    copy_other_files(src, writer)
    layers = published_layers(keys) if names == "published" else arch.layers
    write_card(writer, "gptq", src, cfg, layers, layer_bits, group_size, names, written, nbytes)
    dynamic = dynamic_rules(arch.layers, layer_bits, base_bits)
    cfg["quantization_config"] = _quantization_config(base_bits, group_size, qc.act_order, dynamic, names)
    return writer.finalize(cfg)


def _key_names(names: str, cfg: dict, arch) -> tuple[dict[str, str], Callable[[str], str]]:
    """The experts' key templates ({projection: a key with fields {i} and {e}}) and the renamer of every
    other key, for key names `names` (see module doc)."""
    if names == "transformers":
        prefix_of = f"{arch.layers}.{{i}}.{arch.experts_path}.{{e}}"
        keys = {p: f"{prefix_of}.{p}_proj.weight" for p in ("gate", "up", "down")}
        return keys, lambda n: n  # the model's own names
    return expert_key_templates(cfg["model_type"]), renamer_for(cfg)


def expert_projections(qe, e: int) -> dict[str, tuple[torch.nn.Module, slice]]:
    """{"gate" | "up" | "down": (storage, output rows)} of expert e of the experts module `qe`, named as
    expert_key_templates names the family's keys. Gated: the canonical gate_up rows split into the gate
    [0, I) and up [I, 2I); non-gated (`Activation.gated` False): gate_up is up alone, [0, I), and no gate."""
    slot, inter = qe.slot(e), qe.intermediate
    if qe.activation.gated:
        parts = {"gate": (slot.gate_up, slice(0, inter)), "up": (slot.gate_up, slice(inter, 2 * inter))}
    else:
        parts = {"up": (slot.gate_up, slice(0, inter))}
    return parts | {"down": (slot.down, slice(0, slot.down.out_features))}


def check_projection_keys(keys: dict[str, str], modules: dict, model_type: str) -> None:
    """An ExportError when the family's key templates lack a projection the experts hold (a gated family whose
    checkpoints name no gate, or templates learned for another layout)."""
    for qe in modules.values():
        missing = sorted(set(expert_projections(qe, 0)) - set(keys))
        if missing:
            raise ExportError(
                f"{model_type}: its experts hold {'gated' if qe.activation.gated else 'non-gated'} projections "
                f"{sorted(expert_projections(qe, 0))}, but its checkpoints' per-expert keys (transformers' "
                f"conversion mapping) name only {sorted(keys)}: no key for {missing}"
            )


def published_layers(keys: dict[str, str]) -> str:
    """The decoder layers' path in the family's own key names ("model.layers"; Nemotron-H: "backbone.layers")."""
    return keys["down"].split(".{i}.", 1)[0]


def _layer_tensors(qe, i: int, keys: dict[str, str], bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of every expert of layer i (packed experts module `qe`), under the templates `keys`."""
    out = {}
    for e in range(qe.num_experts):
        for proj, (storage, rows) in expert_projections(qe, e).items():
            stem = keys[proj].format(i=i, e=e).removesuffix(".weight")
            for suffix, t in _projection_tensors(storage, rows, bits, group_size).items():
                out[f"{stem}.{suffix}"] = t
    return out


def _quantization_config(base_bits: int, group_size: int, act_order: bool, dynamic: dict, names: str) -> dict:
    """The GPTQ v1 quantization_config of config.json (GPTQModel's fields, with the `dynamic` map)."""
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": base_bits,
        "group_size": group_size,
        "desc_act": bool(act_order),
        "sym": True,
        "lm_head": False,
        "dynamic": dynamic,
        "meta": {"quantizer": ["moequant:0.1.0"], "source": "moequant export_gptq", "key_names": names},
    }
