"""Export a moequant checkpoint to compressed-tensors, the format llm-compressor writes and vLLM / SGLang read.

One config group per width ("W4A16" / "W8A16": pack-quantized int weights, symmetric, group strategy, 16-bit
activations), targeting the routed experts of the MoE layers at that width by name, so layers may differ
(the same plan `--target vllm` makes: one width per fused layer). Everything else (attention, routers, shared
experts, embeddings, lm_head) stays 16-bit and is matched by no group.

Tensors per expert projection (gate, up and down; up and down for experts without a gate, export_gptq.py), under
the family's published names (e.g. `...experts.3.w1`), written by the
compressed-tensors library itself (`PackedQuantizationCompressor.compress` on moequant's dequantized weight
and its scales, so the library's own rounding reproduces moequant's codes):
    weight_packed [N, ceil(K * bits / 32)] int32
    weight_scale  [N, G] float16   (moequant's scales, exactly; `scale_dtype=torch.float32` stores the same
                                    values in float32, so that the library's dequantization, which runs in
                                    the scale's dtype, reproduces moequant's float32 weights bit for bit;
                                    vLLM casts scales to its activation dtype either way)
    weight_shape  [2] int64
The config is the library's QuantizationConfig, serialised as its ModelCompressor writes it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from moequant.arch import get_arch
from moequant.checkpoint.conversion import expert_key_templates, renamer_for
from moequant.checkpoint.export_card import write_card
from moequant.checkpoint.export_common import ExportError, copy_other_files, read_moequant, write_shards
from moequant.checkpoint.export_gptq import (
    check_exportable,
    check_projection_keys,
    expert_projections,
    published_layers,
)
from moequant.checkpoint.writer import CheckpointWriter

logger = logging.getLogger(__name__)


def _scheme(bits: int, group_size: int, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size
    )
    return QuantizationScheme(targets=targets, weights=weights, format="pack-quantized")


def quantization_config(
    layer_bits: dict[int, int], group_size: int, arch, disk_layers: str | None = None
) -> dict:
    """The compressed-tensors quantization_config (as config.json holds it) for one width per layer.

    Each group's target matches the experts' projections under the model's layer path (`arch.layers`, what
    vLLM names its modules: it keeps `re:` targets as written) and, where the family's checkpoints spell the
    layers otherwise (`disk_layers`, Nemotron-H's "backbone.layers"), under the names the folder's tensors
    carry (what the compressed-tensors library matches when it decompresses them)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    roots = [arch.layers] + ([disk_layers] if disk_layers and disk_layers != arch.layers else [])
    root = re.escape(roots[0]) if len(roots) == 1 else "(?:" + "|".join(re.escape(r) for r in roots) + ")"
    groups = {}
    for bits in sorted(set(layer_bits.values())):
        layers = "|".join(str(i) for i, b in sorted(layer_bits.items()) if b == bits)
        target = rf"re:^{root}\.({layers})\..*\.experts\.\d+\.[^.]+$"
        groups[f"group_{bits}bit"] = _scheme(bits, group_size, [target])
    qc = QuantizationConfig(
        config_groups=groups,
        format="pack-quantized",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=["lm_head"],
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qc.model_dump(exclude=["quant_method"], mode="json"),
    }


def scheme_for(module: str, qconfig: dict, linear: bool = False):
    """The config group whose targets match `module` (compressed-tensors' own name matching), or None.
    linear=True: the module is an nn.Linear, so a class target "Linear" (llm-compressor's usual config group)
    matches it too, unless the config's `ignore` names it (by name or re: pattern)."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import match_name

    if linear and any(match_name(module, t) for t in qconfig.get("ignore") or []):
        return None
    for group in qconfig["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        if any(match_name(module, t) or (linear and t == "Linear") for t in scheme.targets):
            return scheme
    return None


def _compress(storage, rows: slice, scheme, scale_dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    weight = storage.dequantize_rows(rows.start, rows.stop, torch.float32)  # [n, K] moequant's weights
    scale = storage.scales[:, rows].T.to(scale_dtype).contiguous()  # [n, G] (float16 values)
    out = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def export_compressed_tensors(
    src: str | Path, out: str | Path, overwrite: bool = False, scale_dtype: torch.dtype = torch.float16
) -> Path:
    """Convert the moequant checkpoint folder `src` into a compressed-tensors folder `out`."""
    if scale_dtype not in (torch.float16, torch.float32):
        raise ExportError(
            f"scale_dtype must be float16 or float32 (moequant's scales are float16), got {scale_dtype}"
        )
    from moequant.checkpoint.format import build_quantized_experts

    src, cfg, qc = read_moequant(src, "compressed-tensors")
    if qc.act_order:
        logger.info("act-order with static groups: the groups are contiguous, no g_idx needed")
    model_type = cfg["model_type"]
    arch = get_arch(model_type)
    _, group_size, layer_bits = check_exportable(model_type, qc.specs())
    _refuse_g_idx(qc)
    keys = expert_key_templates(model_type)
    qconfig = quantization_config(layer_bits, group_size, arch, published_layers(keys))
    modules = build_quantized_experts(qc, device="cpu")
    check_projection_keys(keys, modules, model_type)
    writer = CheckpointWriter(out, overwrite=overwrite)
    written, nbytes = write_shards(
        writer, src, arch, modules, renamer_for(cfg),
        lambda i: _layer_tensors(modules[i], i, keys, layer_bits[i], qconfig, scale_dtype),
    )  # fmt: skip
    copy_other_files(src, writer)
    write_card(
        writer,
        "compressed-tensors",
        src,
        cfg,
        published_layers(keys),
        layer_bits,
        group_size,
        "published",
        written,
        nbytes,
    )
    cfg["quantization_config"] = qconfig
    return writer.finalize(cfg)


def _refuse_g_idx(qc) -> None:
    """An ExportError when the experts store a g_idx (--g-idx): compressed-tensors has no place for it."""
    from moequant.checkpoint.format import build_quantized_experts

    if any(
        getattr(m.slot(0).gate_up, "g_idx", None) is not None
        for m in build_quantized_experts(qc, "meta").values()
    ):
        raise ExportError("experts with a stored g_idx (--g-idx) are not exported to compressed-tensors")


def _layer_tensors(
    qe, i: int, keys: dict[str, str], bits: int, qconfig: dict, scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The compressed tensors of every expert of layer i (packed experts module `qe`, all at `bits`), each
    projection compressed with the config group its published name matches."""
    out = {}
    for e in range(qe.num_experts):
        for proj, (storage, rows) in expert_projections(qe, e).items():
            module = keys[proj].format(i=i, e=e).removesuffix(".weight")
            scheme = scheme_for(module, qconfig)
            if scheme is None or scheme.weights.num_bits != bits:
                raise ExportError(f"internal: {module} matched no {bits}-bit config group")
            for suffix, t in _compress(storage, rows, scheme, scale_dtype).items():
                out[f"{module}.{suffix}"] = t
    return out


def decompressed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors folder with each quantized module's weight decompressed by the
    library (`PackedQuantizationCompressor.decompress`, the scheme found by its own name matching; a packed
    weight is an nn.Linear's, so a class target "Linear" matches it), in float32, under the folder's key names.
    What the check of an export reads, and how an llm-compressor checkpoint is read; independent of
    moequant's packing."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file

    path = Path(path)
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        raw |= load_file(str(f))
    out = {}
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            continue
        if not name.endswith(".weight_packed"):
            out[name] = t
            continue
        module = name.removesuffix(".weight_packed")
        scheme = scheme_for(module, qconfig, linear=True)
        if scheme is None:
            raise ExportError(f"{module} is packed but matches no config group")
        state = {k: raw[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        out[f"{module}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
    return out
