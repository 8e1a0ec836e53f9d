"""One quantized matrix in the group-wise integer format (see packing.py for the layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.quantizers.packing import dequantize, pack, packed_rows


@dataclass
class PackedLinear:
    """An (out_features N, in_features K) weight stored as packed integer codes with group scales."""

    qweight: torch.Tensor  # [ceil(K*bits/32), N] int32
    scales: torch.Tensor  # [G, N] float16
    qzeros: torch.Tensor | None  # [G, N] uint8, None when symmetric
    g_idx: torch.Tensor | None  # [K] int32, only with act-order
    bits: int
    group_size: int
    in_features: int
    out_features: int

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,  # [N, K] integer codes
        scales: torch.Tensor,  # [N, G]
        zeros: torch.Tensor | None,  # [N, G] integer zero points (None: symmetric)
        bits: int,
        group_size: int,
        g_idx: torch.Tensor | None = None,  # [K]
    ) -> PackedLinear:
        n, k = codes.shape
        return cls(
            qweight=pack(codes.T.contiguous(), bits),  # [Kw, N]
            scales=scales.T.contiguous().to(torch.float16),  # [G, N]
            qzeros=None if zeros is None else zeros.T.contiguous().to(torch.uint8),  # [G, N]
            g_idx=None if g_idx is None else g_idx.to(torch.int32),
            bits=bits,
            group_size=group_size,
            in_features=k,
            out_features=n,
        )

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> W [N, K]."""
        return dequantize(
            self.qweight,
            self.scales,
            self.qzeros,
            self.bits,
            self.in_features,
            self.group_size,
            self.g_idx,
            dtype,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as stored in safetensors (absent ones omitted)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def packed_nbytes(n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool = False) -> int:
    """Stored bytes of an (N, K) matrix in the integer format, scales/zeros/g_idx included."""
    groups = (k + group_size - 1) // group_size
    total = packed_rows(k, bits) * n * 4 + groups * n * 2
    if not sym:
        total += groups * n
    if act_order:
        total += k * 4
    return total
