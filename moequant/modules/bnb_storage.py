"""Storage module for a bitsandbytes-quantized expert projection (nf4 / fp4 / int8), see bnb.py.

Buffers (fixed shapes, so from_pretrained can build them from the bit map alone):
    4-bit: data [ceil(N*K/2), 1] uint8, absmax [ceil(N*K/64)] float32, quant_map [16] float32
    int8:  data [N, K] int8, absmax [N] float32 (bitsandbytes' SCB)
The QuantState is rebuilt from these plus the known shape, quant type and block size.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.config import Method
from moequant.quantizers.bnb import BLOCKSIZE_4BIT, BnbMatrix


class BnbWeight(nn.Module):
    def __init__(self, out_features: int, in_features: int, method: Method, dtype=None, device=None):
        super().__init__()
        self.out_features, self.in_features, self.method = out_features, in_features, method
        n = out_features * in_features
        if method is Method.BNB_INT8:
            self.register_buffer(
                "data", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            )
            self.register_buffer("absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            blocks = (n + BLOCKSIZE_4BIT - 1) // BLOCKSIZE_4BIT
            self.register_buffer("data", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
            self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, device=device))

    @classmethod
    def quantize(cls, W: torch.Tensor, method: Method) -> BnbWeight:
        """W [N, K] -> storage module (bitsandbytes' own quantize functions)."""
        m = BnbMatrix.quantize(W.float(), method)
        mod = cls(W.shape[0], W.shape[1], method, device="meta")
        mod.data, mod.absmax = m.data, m.absmax
        if m.quant_map is not None:
            mod.quant_map = m.quant_map
        return mod

    def matrix(self) -> BnbMatrix:
        qmap = getattr(self, "quant_map", None)
        return BnbMatrix(
            self.method, self.data, self.absmax, (self.out_features, self.in_features), torch.float32, qmap
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix().dequantize(dtype)  # [N, K]

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.method.value}"
