"""The output of the integer quantizers (GPTQ, RTN) for a stack of experts, before packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.quantizers.grid import dequant, sym_zero
from moequant.quantizers.packed import PackedLinear
from moequant.quantizers.packing import group_index


@dataclass
class QuantResult:
    """Integer codes with group-wise scales for E (out N, in K) matrices.

    A 2-D input to a quantizer gives E = 1: every tensor keeps its expert dimension.
    """

    codes: torch.Tensor  # [E, N, K] uint8 in [0, 2**bits)
    scales: torch.Tensor  # [E, N, G] float16, G = ceil(K / group_size)
    zeros: torch.Tensor | None  # [E, N, G] uint8; None when symmetric (zero = 2**(bits-1))
    g_idx: torch.Tensor | None  # [E, K] int32 group of every input channel; None: k // group_size
    bits: int
    group_size: int
    losses: torch.Tensor | None = None  # [E] float64 GPTQ loss sum per expert (GPTQ only)
    damp: torch.Tensor | None = None  # [E] float32 damping added to diag(H) (GPTQ only)
    err_sums: torch.Tensor | None = None  # [E, 2] float64 (sum (W - Q)^2, sum W^2) per expert (GPTQ only)

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    @property
    def sym(self) -> bool:
        return self.zeros is None

    def _group_of(self, e: int) -> torch.Tensor:
        k = self.codes.shape[-1]
        return group_index(k, self.group_size, None if self.g_idx is None else self.g_idx[e])  # [K]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> W_hat [E, N, K] in `dtype`, bit-identical to PackedLinear.dequantize of every expert."""
        out = []
        for e in range(self.num_experts):
            g = self._group_of(e)  # [K]
            s = self.scales[e].to(torch.float32).index_select(-1, g)  # [N, K]
            if self.zeros is None:
                z = torch.full_like(s, float(sym_zero(self.bits)))  # [N, K]
            else:
                z = self.zeros[e].to(torch.float32).index_select(-1, g)  # [N, K]
            out.append(dequant(self.codes[e].to(torch.float32), s, z).to(dtype))  # [N, K]
        return torch.stack(out)  # [E, N, K]

    def packed(self, e: int) -> PackedLinear:
        """Expert e in the stored format (packing.py)."""
        return PackedLinear.from_codes(
            self.codes[e],  # [N, K]
            self.scales[e],  # [N, G]
            None if self.zeros is None else self.zeros[e],  # [N, G]
            self.bits,
            self.group_size,
            None if self.g_idx is None else self.g_idx[e],  # [K]
        )

    def expert(self, e: int) -> QuantResult:
        """Expert e as a one-expert result (E = 1)."""
        sl = slice(e, e + 1)
        return QuantResult(
            codes=self.codes[sl],
            scales=self.scales[sl],
            zeros=None if self.zeros is None else self.zeros[sl],
            g_idx=None if self.g_idx is None else self.g_idx[sl],
            bits=self.bits,
            group_size=self.group_size,
            losses=None if self.losses is None else self.losses[sl],
            damp=None if self.damp is None else self.damp[sl],
        )
