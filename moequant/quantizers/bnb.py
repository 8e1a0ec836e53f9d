"""Per-expert bitsandbytes quantization (nf4 / fp4 / int8) of slices of fused expert tensors.

bitsandbytes, and transformers' integration of it, quantize only nn.Linear: fused [E, N, K]
experts would stay 16-bit. Here every expert slice W[e] goes through bitsandbytes' own functions
(calibration-free), and the stored tensors follow bitsandbytes' serialization (what
Linear4bit / Linear8bitLt write to a state dict), so they rebuild a bnb QuantState as is:

    4-bit:  weight [ceil(N*K/2), 1] uint8 (two codes per byte), weight.absmax [ceil(N*K/64)] float32,
            weight.quant_map [16] float32, weight.quant_state.bitsandbytes__{nf4,fp4} (packed JSON:
            shape, dtype, blocksize, quant type)
    int8:   weight [N, K] int8, SCB [N] float32 (row absmax; W ~= weight * SCB / 127)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.config import Method

BLOCKSIZE_4BIT = 64  # bitsandbytes' default: one float32 absmax per 64 weights (0.5 bit/weight)
_QUANT_TYPE = {Method.BNB_NF4: "nf4", Method.BNB_FP4: "fp4"}


def _bnb():
    import bitsandbytes.functional as F  # lazy: importing bitsandbytes takes seconds and logs backend notes

    return F


@dataclass
class BnbMatrix:
    """One (out N, in K) matrix quantized by bitsandbytes."""

    method: Method  # BNB_NF4, BNB_FP4 or BNB_INT8
    data: torch.Tensor  # 4-bit: [ceil(N*K/2), 1] uint8, two codes per byte; int8: [N, K] int8
    absmax: torch.Tensor  # 4-bit: [ceil(N*K/64)] float32 block absmax; int8: [N] float32 row absmax (SCB)
    shape: tuple[int, int]  # (N, K)
    dtype: torch.dtype  # what dequantize returns by default: the input's dtype (4-bit), float32 (int8)
    quant_map: torch.Tensor | None = None  # 4-bit: [16] float32 code values
    blocksize: int = BLOCKSIZE_4BIT  # 4-bit only

    @classmethod
    def quantize(cls, W: torch.Tensor, method: Method) -> BnbMatrix:
        """W [N, K] -> BnbMatrix with bitsandbytes' own quantize_4bit / int8_vectorwise_quant."""
        F = _bnb()
        if W.dim() != 2:
            raise ValueError(f"expected one matrix [N, K], got {tuple(W.shape)}")
        W = W.contiguous()  # [N, K]
        if method in _QUANT_TYPE:
            data, state = F.quantize_4bit(
                W,
                blocksize=BLOCKSIZE_4BIT,
                compress_statistics=False,  # no double quantization: absmax stays float32
                quant_type=_QUANT_TYPE[method],
                quant_storage=torch.uint8,
            )
            return cls(method, data, state.absmax, tuple(W.shape), W.dtype, state.code, state.blocksize)
        if method is Method.BNB_INT8:
            CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))  # fp16 in, as bnb's Int8Params does
            return cls(method, CB, SCB, tuple(W.shape), torch.float32)
        raise ValueError(f"{method} is not a bitsandbytes method")

    def quant_state(self):
        """The bitsandbytes QuantState of a 4-bit matrix."""
        if self.method is Method.BNB_INT8:
            raise ValueError("int8 matrices have no QuantState")
        return _bnb().QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type=_QUANT_TYPE[self.method],
            dtype=self.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """-> W_hat [N, K] in `dtype` (default self.dtype)."""
        F = _bnb()
        if self.method is Method.BNB_INT8:
            W = F.int8_vectorwise_dequant(self.data, self.absmax)  # [N, K] float32
        else:
            # Dequantized as one row [1, N*K]: the bitsandbytes 0.50 CPU kernel restarts the absmax
            # blocks at every row, which is wrong whenever K % 64 != 0 (relative error 0.25 instead
            # of 0.09 on gaussian weights); for a single row its blocks are quantize_4bit's.
            state = self.quant_state()
            state.shape = torch.Size((1, self.shape[0] * self.shape[1]))
            W = F.dequantize_4bit(self.data, state).reshape(self.shape)  # [N, K] self.dtype
        return W.to(dtype or self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as stored in safetensors (bitsandbytes' own state-dict names)."""
        if self.method is Method.BNB_INT8:
            return {"weight": self.data, "SCB": self.absmax}
        qs = self.quant_state().as_dict(packed=True)  # absmax, quant_map, packed JSON quant_state
        return {"weight": self.data, **{f"weight.{k}": v for k, v in qs.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BnbMatrix:
        """Rebuild from tensors() output (e.g. read back from safetensors)."""
        if "SCB" in tensors:
            CB = tensors["weight"]
            return cls(Method.BNB_INT8, CB, tensors["SCB"], tuple(CB.shape), torch.float32)
        qs = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        if not any(k.startswith("quant_state.bitsandbytes__") for k in qs):
            raise ValueError(f"not a bitsandbytes matrix: keys {sorted(tensors)}")
        state = _bnb().QuantState.from_dict(qs, device=tensors["weight"].device)
        method = {v: k for k, v in _QUANT_TYPE.items()}[state.quant_type]
        return cls(
            method,
            tensors["weight"],
            state.absmax,
            tuple(state.shape),
            state.dtype,
            state.code,
            state.blocksize,
        )

    def nbytes(self) -> int:
        """Stored bytes: data + absmax (+ quant map), the small packed JSON excluded."""
        extra = 0 if self.quant_map is None else self.quant_map.numel() * self.quant_map.element_size()
        return self.data.numel() * self.data.element_size() + self.absmax.numel() * 4 + extra


def bnb_quantize(W: torch.Tensor, method: Method | str) -> list[BnbMatrix]:
    """Fused W [E, N, K] (or one [N, K]) -> one BnbMatrix per expert, each from the slice W[e]."""
    method = Method.parse(method)
    if W.dim() == 2:
        W = W.unsqueeze(0)  # [1, N, K]
    if W.dim() != 3:
        raise ValueError(f"bnb_quantize expects W [E, N, K] or [N, K], got {tuple(W.shape)}")
    return [BnbMatrix.quantize(W[e], method) for e in range(W.shape[0])]


def bnb_nbytes(n: int, k: int, method: Method) -> int:
    """Stored bytes of an (N, K) matrix, the small packed quant-state JSON of 4-bit formats excluded."""
    if method is Method.BNB_INT8:
        return n * k + n * 4
    blocks = (n * k + BLOCKSIZE_4BIT - 1) // BLOCKSIZE_4BIT
    return (n * k + 1) // 2 + blocks * 4 + 16 * 4
