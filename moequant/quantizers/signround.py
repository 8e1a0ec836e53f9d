"""Sign-gradient rounding (SignRound: Cheng et al. 2023, arXiv:2309.05516; AutoRound's method) on the group-wise
integer grid, for a stack of experts' matrices W [E, N, K]. The loss is the caller's (quantize/signround.py):
this module knows the grid, the parameters and the step.

Each weight gets a rounding offset V in [-1/2, 1/2] and each row's group a clipping factor alpha on its max and
beta on its min, in [clip_min, 1]; the fake-quantized weight is the stored format's value (grid.py):

    xmax = alpha * max(w_g, 0)            xmin = beta * min(w_g, 0)        (sym: xmax = alpha max|w_g| = -xmin)
    s    = fp16((xmax - xmin) / maxq)                                       (as stored)
    z    = clamp(round(-xmin / s), 0, maxq)                                 (sym: 2**(bits-1))
    code = clamp(round(w / s + V) + z, 0, maxq)
    q    = (code - z) * s

Rounding (and the float16 cast of s) pass gradients straight through. A step moves every parameter by
-lr * sign(grad), then clamps it to its box: V = 0, alpha = beta = 1 is round-to-nearest on the min/max grid
(RTN, the start point). The sign makes an expert's update independent of every other expert's loss, so the
experts of a chunk learn as one batch. `Grid.result` gives codes, float16 scales and integer zeros that
dequantize (packing.py) to exactly the fake-quantized q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moequant.quantizers.grid import max_code, num_groups, sym_zero
from moequant.quantizers.result import QuantResult

_FP16_TINY = 2.0**-24  # smallest positive float16: a scale never rounds to zero


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` forward, identity backward (straight-through)."""
    return x + (value - x).detach()


@dataclass
class RoundingParams:
    """What SignRound learns for one stack W [E, N, K]: offsets V [E, N, K], clipping factors alpha (max) and
    beta (min) [E, N, G]; float32, requiring gradients."""

    V: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.V, self.alpha, self.beta


class Grid:
    """The fake quantizer of one stack W [E, N, K] at `bits`, `group_size`, `sym` (a partial last group is
    zero-padded, as the stored format pads it)."""

    def __init__(self, W: torch.Tensor, bits: int, group_size: int, sym: bool):
        E, N, K = W.shape
        self.shape, self.bits, self.gs, self.sym, self.maxq = (E, N, K), bits, group_size, sym, max_code(bits)
        self.G = num_groups(K, group_size)
        Wp = F.pad(W.to(torch.float32), (0, self.G * group_size - K))  # [E, N, G*gs]
        self.Wg = Wp.view(E, N, self.G, group_size)  # [E, N, G, gs]
        wmax = self.Wg.amax(-1).clamp(min=0.0)  # [E, N, G]
        wmin = self.Wg.amin(-1).clamp(max=0.0)  # [E, N, G]
        if sym:
            wmax = torch.maximum(wmax, -wmin)
            wmin = -wmax
        empty = (wmax == 0) & (wmin == 0)  # all-zero rows: any non-zero scale (grid.py)
        self.wmax = torch.where(empty, 1.0, wmax)  # [E, N, G]
        self.wmin = torch.where(empty, -1.0, wmin)  # [E, N, G]

    def start(self) -> RoundingParams:
        """Round-to-nearest on the min/max grid: V = 0, alpha = beta = 1."""
        E, N, K = self.shape
        return RoundingParams(
            torch.zeros(E, N, K, requires_grad=True),
            torch.ones(E, N, self.G, requires_grad=True),
            torch.ones(E, N, self.G, requires_grad=True),
        )

    def grid(self, p: RoundingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [E, N, G] each, differentiable in alpha and beta."""
        if self.sym:
            raw = (2 * self.wmax * p.alpha / self.maxq).clamp(min=_FP16_TINY)  # [E, N, G]
            s = _ste(raw, raw.to(torch.float16).to(torch.float32))
            return s, torch.full_like(s, float(sym_zero(self.bits)))
        xmax, xmin = self.wmax * p.alpha, self.wmin * p.beta  # [E, N, G]
        raw = ((xmax - xmin) / self.maxq).clamp(min=_FP16_TINY)  # [E, N, G]
        s = _ste(raw, raw.to(torch.float16).to(torch.float32))
        zr = -xmin / s
        z = _ste(zr, torch.round(zr)).clamp(0, self.maxq)  # [E, N, G]
        return s, z

    def _codes(self, p: RoundingParams, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Float codes [E, N, G, gs], straight-through."""
        E, N, K = self.shape
        V = F.pad(p.V, (0, self.G * self.gs - K)).view_as(self.Wg)  # [E, N, G, gs]
        t = self.Wg / s[..., None] + V
        return (_ste(t, torch.round(t)) + z[..., None]).clamp(0, self.maxq)

    def fake(self, p: RoundingParams) -> torch.Tensor:
        """The dequantized weights [E, N, K] of the parameters (differentiable)."""
        E, N, K = self.shape
        s, z = self.grid(p)
        q = (self._codes(p, s, z) - z[..., None]) * s[..., None]  # [E, N, G, gs]
        return q.reshape(E, N, -1)[:, :, :K]

    @torch.no_grad()
    def result(self, p: RoundingParams) -> QuantResult:
        """The stored form of the parameters: uint8 codes [E, N, K], float16 scales and uint8 zeros [E, N, G]."""
        E, N, K = self.shape
        s, z = self.grid(p)
        codes = self._codes(p, s, z).reshape(E, N, -1)[:, :, :K]  # [E, N, K]
        return QuantResult(
            codes=codes.to(torch.uint8),
            scales=s.to(torch.float16),
            zeros=None if self.sym else z.to(torch.uint8),
            g_idx=None,
            bits=self.bits,
            group_size=self.gs,
        )


@torch.no_grad()
def sign_step(params: list[RoundingParams], lr: float, clip_min: float) -> None:
    """One signed step on every parameter (gradients already there), the box constraints, gradients cleared."""
    for p in params:
        for t in p.tensors():
            t -= lr * t.grad.sign()
            t.grad = None
        p.V.clamp_(-0.5, 0.5)
        p.alpha.clamp_(clip_min, 1.0)
        p.beta.clamp_(clip_min, 1.0)
