"""GPTQ v1 checkpoints (GPTQModel's format) unpacked in float32: int32-packed qweight/qzeros, scales and g_idx
to nn.Linear weights, and GPTQModel's quantized experts copied into a model's fused experts. Used by
evals/bench/vs_gptqmodel.py to evaluate GPTQModel's checkpoint with float32 compute."""

from __future__ import annotations

from pathlib import Path


def _unpack_rows(q, bits: int = 4):
    """[K / (32/bits), N] int32 -> [K, N] codes (GPTQ packs along the input dimension)."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [32/bits]
    return ((q.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, q.shape[1])


def _unpack_cols(q, bits: int = 4):
    """[G, N / (32/bits)] int32 -> [G, N] zero points."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((q.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(q.shape[0], -1)


def dequantize_gptq_v1(t: dict, prefix: str, bits: int = 4):
    """nn.Linear weight [N, K] float32 from a GPTQ (v1) module: scale * (q - (qzero + 1))."""
    codes = _unpack_rows(t[f"{prefix}.qweight"], bits).float()  # [K, N]
    zeros = _unpack_cols(t[f"{prefix}.qzeros"], bits).float() + 1  # [G, N] v1 stores zero - 1
    scales = t[f"{prefix}.scales"].float()  # [G, N]
    g = t[f"{prefix}.g_idx"].long()  # [K]
    W = scales[g] * (codes - zeros[g])  # [K, N]
    return W.T.contiguous()  # [N, K]


def dequantized_gptqmodel_into(original, out: str):
    """Copy GPTQModel's quantized experts (dequantized in float32) into the fused experts of `original`."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    n = 0
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                p = f"model.layers.{i}.mlp.experts.{e}"
                gate = dequantize_gptq_v1(tensors, f"{p}.gate_proj")  # [I, H]
                up = dequantize_gptq_v1(tensors, f"{p}.up_proj")  # [I, H]
                down = dequantize_gptq_v1(tensors, f"{p}.down_proj")  # [H, I]
                ex.gate_up_proj[e] = torch.cat([gate, up]).to(ex.gate_up_proj.dtype)  # [2I, H]
                ex.down_proj[e] = down.to(ex.down_proj.dtype)  # [H, I]
                n += 3
    untouched = [k for k in tensors if "self_attn" in k and k.endswith(".qweight")]
    return n, untouched
