"""Tiny checkpoints in the layouts model makers publish, written from a 16-bit tiny model's folder.

- FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2): every projection weight `float8_e4m3fn` with a float32
  `<name>_scale_inv` of shape [ceil(N/b0), ceil(K/b1)], W = q * s block by block; routers, norms, embeddings
  and lm_head stay 16-bit; config `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
  "weight_block_size": [b0, b1]}.
- MXFP4 (GPT-OSS): `mlp.experts.{gate_up,down}_proj_blocks` [E, N, K/32, 16] uint8, two e2m1 codes a byte,
  low nibble first, and `_scales` [E, N, K/32] uint8 (e8m0, bias 127), of the matrix [E, N, K] that is the
  fused parameter transposed; biases 16-bit; config {"quant_method": "mxfp4", "modules_to_not_convert": [...]}.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
_FP8_WEIGHT = re.compile(r"\.(self_attn|mlp)\..*_proj\.weight$")


def _fp8_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    b0, b1 = block
    rows, cols = math.ceil(n / b0), math.ceil(k / b1)
    w = w.float()
    scale = torch.empty(rows, cols)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = blk.abs().amax().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def write_fp8(src: Path, dst: Path, block: tuple[int, int] = (8, 16)) -> None:
    """`src` (a 16-bit folder) as a block-scaled FP8 checkpoint in `dst`."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if _FP8_WEIGHT.search(k) and v.dim() == 2:
            q, s = _fp8_blockwise(v, block)
            out[k], out[k + "_scale_inv"] = q, s
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _mxfp4(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> blocks [..., K/32, 16] uint8 (low nibble first), scales [..., K/32] uint8 (e8m0)."""
    *lead, k = m.shape
    g = m.float().reshape(*lead, k // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # every |x| / 2^exp within e2m1's 6
    x = g / torch.exp2(exp)[..., None]
    idx = (x.abs()[..., None] - _E2M1).abs().argmin(-1)  # nearest magnitude code
    code = (idx | ((x < 0) & (idx > 0)).to(torch.long) << 3).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # element 2j in the low nibble
    return blocks, (exp + 127).to(torch.uint8)


def write_mxfp4(src: Path, dst: Path) -> None:
    """`src` (a 16-bit GPT-OSS folder) as an MXFP4 checkpoint in `dst`."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in tensors.items():
        if re.search(r"mlp\.experts\.(gate_up|down)_proj$", k):
            blocks, scales = _mxfp4(v.transpose(1, 2))  # the fused [E, K, N] stored as [E, N, K]
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }  # fmt: skip
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
