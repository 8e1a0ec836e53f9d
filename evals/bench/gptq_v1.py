"""GPTQ v1 checkpoints (GPTQModel's format) unpacked in float32: int32-packed qweight/qzeros, scales and g_idx
to nn.Linear weights, at 2, 3, 4 or 8 bits (the v1 bit stream is moequant's own packing, 3-bit straddles
included: moequant/quantizers/packing.py). Used by evals/bench/vs_gptqmodel.py and evals/bench/peers.py to
evaluate GPTQModel's checkpoints with float32 compute."""

from __future__ import annotations

from pathlib import Path


def dequantize_gptq_v1(t: dict, prefix: str, bits: int = 4):
    """nn.Linear weight [N, K] float32 from a GPTQ (v1) module: scale * (q - (qzero + 1))."""
    from moequant.quantizers.packing import unpack

    qweight = t[f"{prefix}.qweight"]  # [K*bits/32, N] int32
    scales = t[f"{prefix}.scales"].float()  # [G, N]
    k, n = qweight.shape[0] * 32 // bits, scales.shape[1]
    codes = unpack(qweight, bits, k).float()  # [K, N]
    zeros = unpack(t[f"{prefix}.qzeros"].T.contiguous(), bits, n).T.float() + 1  # [G, N] v1 stores zero - 1
    g = t[f"{prefix}.g_idx"].long()  # [K]
    W = scales[g] * (codes - zeros[g])  # [K, N]
    return W.T.contiguous()  # [N, K]


def gptq_v1_tensors(out: str | Path) -> dict:
    """Every tensor of a checkpoint folder's *.safetensors files."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def gptq_v1_weights(out: str | Path, bits: int) -> dict:
    """{module name: dequantized weight [N, K] float32} for every GPTQ module (every `.qweight`) of a folder."""
    tensors = gptq_v1_tensors(out)
    prefixes = [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]
    return {p: dequantize_gptq_v1(tensors, p, bits) for p in prefixes}


def dequantized_gptqmodel_into(original, out: str, bits: int = 4):
    """Copy GPTQModel's quantized experts (dequantized in float32) into the fused experts of `original`."""
    import torch

    weights = gptq_v1_weights(out, bits)
    n = 0
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                p = f"model.layers.{i}.mlp.experts.{e}"
                gate = weights[f"{p}.gate_proj"]  # [I, H]
                up = weights[f"{p}.up_proj"]  # [I, H]
                down = weights[f"{p}.down_proj"]  # [H, I]
                ex.gate_up_proj[e] = torch.cat([gate, up]).to(ex.gate_up_proj.dtype)  # [2I, H]
                ex.down_proj[e] = down.to(ex.down_proj.dtype)  # [H, I]
                n += 3
    untouched = [f"{k}.qweight" for k in weights if "self_attn" in k]
    return n, untouched
