"""Runtime layout of one MoE layer's integer-format experts, as the kernels read it.

Layout chosen: the storage format of `moequant.quantizers.packing`, unchanged, stacked per *format*.

    format key   (bits, group_size, sym, act_order)       one `WidthGroup` per key and projection
    qweight      [E_w, ceil(K*bits/32), N] int32          K-packed bit stream of packing.py, one expert per slot
    scales       [E_w, G, N] float16
    qzeros       [E_w, G, N] uint8                        asymmetric formats only
    g_idx        [E_w, K] int32                           act-order formats only

gate_up is one (N = 2I, K = H) matrix per expert whose columns 0..I-1 are the gate and I..2I-1 the
up projection (the canonical [gate; up] rows of `moequant.arch.base`); for a non-gated activation
(`Activation.gated` False: relu2) it is the up projection alone, (N = I, K = H). down is (N = H, K = I).

Why no repack: the kernels read whole 32-bit words once and unpack them in registers (2/4/8 bits: a
word holds 32/bits codes; 3 bits: 32 codes span exactly 3 words, the two straddling codes are
stitched from neighbouring words), so the checkpoint's own bytes are already kernel-friendly: N is the
contiguous axis (coalesced loads, 16-byte vectors), K tiles are whole words. Keeping the bytes
identical means the reference path calls `moequant.quantizers.packing.dequantize` on exactly what the kernel
reads, and a checkpoint loads with no conversion. Act-order experts keep their g_idx: the kernels
gather each input channel's scale and zero by g_idx[k] (no permutation of K, no activation gather).

Expert numbering: every packed expert gets a *global id*; experts are numbered format group by
format group (gate_up's formats), so the token sort puts each gate_up launch's experts in one
contiguous range of blocks. `expert_to_global[e]` is -1 for experts not in the integer format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from moequant.quantizers.packed import PackedLinear
from moequant.quantizers.packing import packed_rows

logger = logging.getLogger(__name__)

FormatKey = tuple[int, int, bool, bool]  # (bits, group_size, sym, act_order)


@dataclass(frozen=True)
class WidthGroup:
    """The experts of one projection that share one integer format, stacked (see module docstring)."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool
    in_features: int  # K
    out_features: int  # N
    experts: tuple[int, ...]  # original expert id of each slot
    qweight: torch.Tensor  # [E_w, Kw, N] int32
    scales: torch.Tensor  # [E_w, G, N] float16
    qzeros: torch.Tensor | None  # [E_w, G, N] uint8, None when symmetric
    g_idx: torch.Tensor | None  # [E_w, K] int32, None without act-order
    expert_ids: torch.Tensor  # [E_w] int32 original expert id of each slot (bias lookup in kernels)
    slot_of_global: torch.Tensor  # [num_global] int32 slot of each global id in this group, -1 if absent
    gid_lo: int  # global ids of this group's experts lie in [gid_lo, gid_hi)
    gid_hi: int

    @property
    def key(self) -> FormatKey:
        return (self.bits, self.group_size, self.sym, self.act_order)

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def packed_rows(self) -> int:
        return self.qweight.shape[1]

    def slot(self, expert: int) -> int:
        return self.experts.index(expert)

    def dequantize(self, slot: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] of one slot, by the definition in moequant.quantizers.packing."""
        from moequant.quantizers.packing import dequantize

        return dequantize(
            self.qweight[slot],
            self.scales[slot],
            None if self.qzeros is None else self.qzeros[slot],
            self.bits,
            self.in_features,
            self.group_size,
            None if self.g_idx is None else self.g_idx[slot],
            dtype,
        )  # [N, K]

    def nbytes_per_expert(self) -> int:
        """Bytes one expert of this group occupies (codes + scales + zeros + g_idx)."""
        tensors = [self.qweight, self.scales, self.qzeros, self.g_idx]
        return sum(t[0].numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> WidthGroup:
        def mv(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            qweight=mv(self.qweight),
            scales=mv(self.scales),
            qzeros=mv(self.qzeros),
            g_idx=mv(self.g_idx),
            expert_ids=mv(self.expert_ids),
            slot_of_global=mv(self.slot_of_global),
        )


@dataclass(frozen=True)
class PackedMoE:
    """The integer-format experts of one MoE layer (gate_up and down), grouped by format."""

    num_experts: int
    hidden: int  # H
    intermediate: int  # I
    expert_to_global: torch.Tensor  # [num_experts] int32 global id, -1 for experts not packed here
    global_to_expert: tuple[int, ...]  # original expert id of each global id
    gate_up: tuple[WidthGroup, ...]  # N = 2I (gated) or I (non-gated), K = H
    down: tuple[WidthGroup, ...]  # N = H, K = I
    gated: bool = True  # gate_up holds [gate; up]; False: up alone

    @property
    def num_global(self) -> int:
        return len(self.global_to_expert)

    @property
    def device(self) -> torch.device:
        return self.expert_to_global.device

    def to(self, device) -> PackedMoE:
        return replace(
            self,
            expert_to_global=self.expert_to_global.to(device),
            gate_up=tuple(g.to(device) for g in self.gate_up),
            down=tuple(g.to(device) for g in self.down),
        )

    def is_packed(self, expert: int) -> bool:
        return int(self.expert_to_global[expert]) >= 0

    def expert_nbytes(self, expert: int) -> int:
        """Bytes the kernels read for one packed expert's weights (both projections)."""
        return sum(g.nbytes_per_expert() for g in self.gate_up + self.down if expert in g.experts)

    def nbytes(self) -> int:
        return sum(g.nbytes_per_expert() * len(g.experts) for g in self.gate_up + self.down)

    @classmethod
    def from_experts(
        cls,
        gate_up: list[PackedLinear | None],
        down: list[PackedLinear | None],
        num_experts: int,
        device=None,
        gated: bool = True,
    ) -> PackedMoE:
        """Stack per-expert PackedLinears (None: expert not in the integer format) into format groups.
        gated: each gate_up holds [gate; up] (N = 2I); False: up alone (N = I), a non-gated activation's."""
        if len(gate_up) != num_experts or len(down) != num_experts:
            raise ValueError(
                f"expected {num_experts} gate_up and down entries, got {len(gate_up)}, {len(down)}"
            )
        packed = []
        for e, (gu, dn) in enumerate(zip(gate_up, down, strict=True)):
            if (gu is None) != (dn is None):
                raise ValueError(f"expert {e}: gate_up and down must both be packed or both be None")
            if gu is not None:
                packed.append(e)
        hidden, inter = _check_shapes(gate_up, down, packed, gated)

        # global ids: experts ordered by (gate_up format, down format, expert id)
        order = sorted(packed, key=lambda e: (_key(gate_up[e]), _key(down[e]), e))
        gid_of = {e: i for i, e in enumerate(order)}
        expert_to_global = torch.full((num_experts,), -1, dtype=torch.int32)
        for e, g in gid_of.items():
            expert_to_global[e] = g
        groups_gu = _stack_groups(gate_up, order, gid_of)
        groups_dn = _stack_groups(down, order, gid_of)
        logger.debug(
            "PackedMoE: %d/%d experts packed, gate_up formats %s, down formats %s",
            len(order),
            num_experts,
            [g.key for g in groups_gu],
            [g.key for g in groups_dn],
        )
        out = cls(
            num_experts=num_experts,
            hidden=hidden,
            intermediate=inter,
            expert_to_global=expert_to_global,
            global_to_expert=tuple(order),
            gate_up=groups_gu,
            down=groups_dn,
            gated=gated,
        )
        return out if device is None else out.to(device)


def _key(p: PackedLinear) -> FormatKey:
    return (p.bits, p.group_size, p.sym, p.g_idx is not None)


def _check_shapes(gate_up, down, packed, gated: bool) -> tuple[int, int]:
    """(H, I) of the packed experts; every expert must have gate_up [2I or I, H] and down [H, I]."""
    if not packed:
        return 0, 0
    first = gate_up[packed[0]]
    rows_per_i = 2 if gated else 1  # gate_up rows per intermediate channel
    hidden, inter = first.in_features, first.out_features // rows_per_i
    rows = f"2I={2 * inter}" if gated else f"I={inter}"
    for e in packed:
        gu, dn = gate_up[e], down[e]
        if (gu.out_features, gu.in_features) != (rows_per_i * inter, hidden) or (
            dn.out_features,
            dn.in_features,
        ) != (hidden, inter):
            raise ValueError(
                f"expert {e}: gate_up {gu.out_features}x{gu.in_features} / down {dn.out_features}x"
                f"{dn.in_features} do not match [{rows}, H={hidden}] / [H, I] "
                f"({'gated' if gated else 'non-gated'} experts)"
            )
        for p in (gu, dn):
            if p.qweight.shape[0] != packed_rows(p.in_features, p.bits):
                raise ValueError(f"expert {e}: qweight rows do not match {p.bits}-bit packing of K")
    return hidden, inter


def _stack_groups(mats: list, order: list[int], gid_of: dict[int, int]) -> tuple[WidthGroup, ...]:
    """One WidthGroup per format key, slots in global-id order."""
    num_global = len(order)
    keys = sorted({_key(mats[e]) for e in order})
    groups = []
    for key in keys:
        experts = [e for e in order if _key(mats[e]) == key]  # ascending global id
        ms = [mats[e] for e in experts]
        bits, group_size, sym, act_order = key
        slot_of_global = torch.full((num_global,), -1, dtype=torch.int32)
        for s, e in enumerate(experts):
            slot_of_global[gid_of[e]] = s
        gids = [gid_of[e] for e in experts]
        groups.append(
            WidthGroup(
                bits=bits,
                group_size=group_size,
                sym=sym,
                act_order=act_order,
                in_features=ms[0].in_features,
                out_features=ms[0].out_features,
                experts=tuple(experts),
                qweight=torch.stack([m.qweight for m in ms]).contiguous(),  # [E_w, Kw, N]
                scales=torch.stack([m.scales.to(torch.float16) for m in ms]).contiguous(),  # [E_w, G, N]
                qzeros=None if sym else torch.stack([m.qzeros for m in ms]).contiguous(),  # [E_w, G, N]
                g_idx=torch.stack([m.g_idx.to(torch.int32) for m in ms]).contiguous() if act_order else None,
                expert_ids=torch.tensor(experts, dtype=torch.int32),  # [E_w]
                slot_of_global=slot_of_global,  # [num_global]
                gid_lo=min(gids),
                gid_hi=max(gids) + 1,
            )
        )
    return tuple(groups)
