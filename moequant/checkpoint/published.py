"""Pre-quantized checkpoints as model makers publish them, read as if they were 16-bit.

Two formats are dequantized on read, tensor by tensor (an expert chunk's keys or rows only), in float32,
never a whole layer and never to disk:

- **FP8 block-scaled** (DeepSeek-V3/R1, Kimi-K2): `quantization_config` {"quant_method": "fp8", "fmt":
  "e4m3", "weight_block_size": [b0, b1]}; a projection weight `W` [N, K] is stored as `float8_e4m3fn` `q`
  with a float32 `<key>_scale_inv` `s` [ceil(N/b0), ceil(K/b1)], and W[i, j] = q[i, j] * s[i // b0, j // b1].
- **MXFP4** (GPT-OSS): {"quant_method": "mxfp4"}; the fused expert parameter `X` of the model ([E, K, N] for
  GPT-OSS) is stored as `X_blocks` [E, N, K/32, 16] uint8 (two e2m1 codes a byte, element 2j in the low
  nibble) and `X_scales` [E, N, K/32] uint8 (an e8m0 exponent, bias 127) of the transposed matrix [E, N, K]:
  value = e2m1(code) * 2^(scale - 127).

`source_format(config)` picks the reader for a checkpoint's config (the 16-bit identity when it has no
`quantization_config`) and refuses every other pre-quantized method by name. The reader rewrites the key
list (scale keys hidden, `X_blocks` + `X_scales` shown as `X`), so the family's conversion mapping
(conversion.py) sees the names of a 16-bit checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from moequant.errors import CheckpointError

Read = Callable[[str], torch.Tensor]
ReadRows = Callable[[str, list[int]], torch.Tensor]


class Plain:
    """A 16-bit checkpoint: keys and tensors as stored. `keys(raw)` is called first, with every stored key."""

    method = ""

    def __init__(self):
        self.raw: set[str] = set()

    def keys(self, raw: list[str]) -> list[str]:
        self.raw = set(raw)
        return list(raw)

    def read(self, key: str, read: Read) -> torch.Tensor:
        return read(key)

    def read_rows(self, key: str, rows: list[int], read_rows: ReadRows, read: Read) -> torch.Tensor:
        return read_rows(key, rows)


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = q * s block by block; the last block of a dimension may be partial (s has ceil(N/b0) rows)."""
    n, k = q.shape[-2:]
    b0, b1 = block
    want = (math.ceil(n / b0), math.ceil(k / b1))
    if tuple(scale_inv.shape[-2:]) != want:
        raise CheckpointError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} for a weight of shape {tuple(q.shape)} with blocks "
            f"{list(block)}: expected {list(want)}"
        )
    s = scale_inv.float().repeat_interleave(b0, dim=-2)[..., :n, :]  # [.., N, ceil(K/b1)]
    s = s.repeat_interleave(b1, dim=-1)[..., :k]  # [.., N, K]
    return q.float() * s  # [.., N, K]


class Fp8Blocks(Plain):
    method = "fp8"
    SCALE = "_scale_inv"

    def __init__(self, block: tuple[int, int]):
        super().__init__()
        self.block = block

    def keys(self, raw: list[str]) -> list[str]:
        self.raw = set(raw)
        return [k for k in raw if not (k.endswith(self.SCALE) and k[: -len(self.SCALE)] in self.raw)]

    def read(self, key: str, read: Read) -> torch.Tensor:
        t = read(key)
        if t.dtype != torch.float8_e4m3fn:
            return t  # a 16-bit tensor (router, norm, embedding, lm_head)
        if key + self.SCALE not in self.raw:
            raise CheckpointError(f"FP8 weight {key} has no {key + self.SCALE} in the checkpoint")
        return dequantize_fp8_blocks(t, read(key + self.SCALE), self.block)

    def read_rows(self, key: str, rows: list[int], read_rows: ReadRows, read: Read) -> torch.Tensor:
        return self.read(key, read)[rows]  # FP8 experts are per-expert keys: rows of a fused FP8 key are rare


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] uint8 codes and [..., G] uint8 exponents -> [..., G * 32] float32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} {scales.dtype} "
            "do not match (expected uint8 [..., G, 16] and uint8 [..., G])"
        )
    lut = torch.tensor(_E2M1, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # [..., G, 16] each
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]: element 2j from the low nibble
    values = values * torch.exp2(scales.float() - 127.0)[..., None]  # [..., G, 32]
    return values.flatten(-2)  # [..., G * 32]


class Mxfp4(Plain):
    method = "mxfp4"
    BLOCKS, SCALES = "_blocks", "_scales"

    def keys(self, raw: list[str]) -> list[str]:
        self.raw = set(raw)
        out = []
        for k in raw:
            if k.endswith(self.BLOCKS) and k[: -len(self.BLOCKS)] + self.SCALES in self.raw:
                out.append(k[: -len(self.BLOCKS)])
            elif not (k.endswith(self.SCALES) and k[: -len(self.SCALES)] + self.BLOCKS in self.raw):
                out.append(k)
        return out

    def _packed(self, key: str) -> bool:
        return key not in self.raw and key + self.BLOCKS in self.raw and key + self.SCALES in self.raw

    def read(self, key: str, read: Read) -> torch.Tensor:
        if not self._packed(key):
            return read(key)
        w = dequantize_mxfp4(read(key + self.BLOCKS), read(key + self.SCALES))  # [E, N, K]
        return w.transpose(-1, -2).contiguous()  # [E, K, N]: the fused parameter's layout

    def read_rows(self, key: str, rows: list[int], read_rows: ReadRows, read: Read) -> torch.Tensor:
        if not self._packed(key):
            return read_rows(key, rows)
        w = dequantize_mxfp4(read_rows(key + self.BLOCKS, rows), read_rows(key + self.SCALES, rows))
        return w.transpose(-1, -2).contiguous()  # [len(rows), K, N]


def source_format(config) -> Plain:
    """The reader for a checkpoint with `config` (see module docstring)."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return Plain()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        block = qc.get("weight_block_size")
        if fmt != "e4m3" or not block or len(block) != 2:
            raise CheckpointError(
                f"FP8 checkpoint with fmt={fmt!r}, weight_block_size={block!r}: moequant reads block-scaled "
                "e4m3 (DeepSeek-V3 / Kimi-K2 layout: fmt 'e4m3', weight_block_size [128, 128])"
            )
        return Fp8Blocks((int(block[0]), int(block[1])))
    if method == "mxfp4":
        return Mxfp4()
    raise CheckpointError(
        f"the checkpoint is already quantized with {method or 'an unnamed method'!r}; moequant starts from a "
        "16-bit checkpoint, or from the published FP8 (block-scaled e4m3) and MXFP4 (GPT-OSS) ones"
    )
