"""The damage table: estimated cost of every expert projection at every candidate spec.

damage(e, p, c) = importance(e) * sum_{n,k} (W_ep - Q_c(W_ep))[n, k]^2 * m_ep[k]     p in (gate/up, down)

where m_ep are the per-channel second moments of the projection's inputs (from the profile), Q_c is
round-to-nearest at candidate c's width and group size (config.columns()), and importance(e) is e's routing
importance per calibration token (importance.py). This is E ||(W - Q) x||^2 under a diagonal approximation of
the input covariance. The layer probe (probe.py) then rescales each layer's rows by a measured loss increase;
knapsack.py picks one candidate per item (a projection, or a whole expert).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from moequant.arch import ExpertWeights, block_ref, decoder_layers, non_expert_linears
from moequant.calibration.profiler import Profile
from moequant.checkpoint.source import Source, expert_dims, non_expert_nbytes
from moequant.config import KEEP_BITS, QuantSpec
from moequant.errors import PlanError
from moequant.plan.config import PlanConfig
from moequant.plan.importance import importance
from moequant.plan.schema import expert_params
from moequant.quantizers.rtn import rtn_roundtrip
from moequant.runtime.ranks import current

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearItem:
    """A knapsack item of --non-expert auto: the non-expert Linears of one module of a decoder layer (its
    attention, its shared expert, its dense MLP), all at one candidate spec."""

    name: str  # full name of the module holding them, e.g. model.layers.0.self_attn
    layer: int
    prefix: str  # the decoder layer's full name and a dot, e.g. model.layers.0.
    linears: tuple[tuple[str, int, int], ...]  # (name relative to the decoder layer, out, in) of each Linear

    @property
    def params(self) -> int:
        return sum(o * i for _, o, i in self.linears)


def linear_items(source: Source) -> list[LinearItem]:
    """The --non-expert auto items of a model: per decoder layer, its non-expert Linears grouped by the module
    holding them (a Linear directly in the layer is an item alone). Shapes only: nothing is read."""
    arch = source.arch
    items = []
    for i, layer in enumerate(decoder_layers(source.model, arch)):
        groups: dict[str, list] = {}
        for n in non_expert_linears(layer, arch):
            lin = layer.get_submodule(n)
            groups.setdefault(n.rpartition(".")[0] or n, []).append((n, lin.out_features, lin.in_features))
        prefix = f"{arch.layers}.{i}."
        items += [LinearItem(prefix + g, i, prefix, tuple(v)) for g, v in groups.items()]
    return items


@dataclass(frozen=True)
class DamageTable:
    """Estimated damage of every expert at every candidate width, and what solving for a budget needs.
    It does not depend on the budget: one table serves every budget (a sweep solves it once per point)."""

    model_type: str
    keys: list[tuple[int, int]]  # (layer, expert) of every row
    # [n_experts, 2, n_cols] float64 per projection (gate/up, down), columns config.columns(); or
    # [n_experts, n_cols] for whole experts only (a table measured per expert, e.g. bench plan_oracle)
    damage: np.ndarray
    config: PlanConfig  # the widths, method and grids the columns were computed for (budget: not used)
    hidden: int
    intermediate: int
    non_expert_bytes: int  # 16-bit bytes of everything else (for budgets in GB)
    probe: dict = field(default_factory=dict)  # the layer probe's record (into plan.estimate); {} without
    # --non-expert auto: the non-expert items, and their damage [n_items, n_cols] (expected KL per token at
    # each candidate, from the streamed probe; None until the probe has priced them)
    linear_items: tuple[LinearItem, ...] = ()
    linear_damage: np.ndarray | None = None
    gated: bool = True  # the experts' input projection is [gate; up] (2I rows); False: up alone (I rows)

    @property
    def per_projection(self) -> bool:
        return self.damage.ndim == 3

    def expert_damage(self) -> np.ndarray:
        """[n_experts, n_cols]: both projections at the same candidate."""
        return self.damage.sum(axis=1) if self.per_projection else self.damage


def damage_from_source(
    source: Source, profile: Profile, config: PlanConfig, chunk_mb: float = 256
) -> DamageTable:
    """The (uncalibrated) damage table of the model behind `source`, reading one MoE layer's experts at a time,
    a chunk of experts at a time (about `chunk_mb` of 16-bit weights) where the source reads experts lazily
    (no forward pass: the profile holds every statistic it needs)."""
    arch = source.arch
    layers = decoder_layers(source.model, arch)
    keys: list[tuple[int, int]] = []
    tables = []
    for ref in source.blocks:
        i = ref.layer_idx
        source.load_layer(i)
        experts = block_ref(arch, i, layers[i]).experts
        if source.lazy_experts:  # experts as stored (16-bit), a chunk at a time
            hidden, inter = arch.expert_dims(experts)
            size = max(1, int(chunk_mb * 2**20 // (2 * expert_params(hidden, inter, arch.activation.gated))))
            ranks = current()  # under torchrun each rank prices a contiguous share of the experts
            share = -(-ref.num_experts // ranks.world)
            mine = list(range(ranks.rank * share, min((ranks.rank + 1) * share, ref.num_experts)))
            rows: list = []
            with ranks.guard(f"pricing the experts of layer {i}"):
                for c in range(0, len(mine), size):
                    part = mine[c : c + size]
                    fused = source.read_experts(i, part)
                    for name in (f"{arch.in_proj}_bias", "down_proj_bias") if arch.has_bias else ():
                        fused[name] = getattr(experts, name)[part]
                    rows.append(
                        damage_table([(i, arch.canonical_from_fused(fused))], profile, config, experts=part)
                    )
                    del fused
            for got in ranks.all_gather(rows):  # rank order is expert order: the table one process builds
                for k, d in got:
                    keys += k
                    tables.append(d)
        else:
            k, d = damage_table([(i, arch.expert_weights(experts))], profile, config)
            keys += k
            tables.append(d)
        source.release_layer(i)
    hidden, inter = expert_dims(source)
    return DamageTable(
        arch.model_type, keys, np.concatenate(tables), config, hidden, inter, non_expert_nbytes(source),
        linear_items=tuple(linear_items(source)) if config.non_expert_auto else (),
        gated=arch.activation.gated,
    )  # fmt: skip


def weighted_error(W: torch.Tensor, moments: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """sum_{n,k} (W - Q(W))^2 m[k] per expert: W [E, N, K], moments [E, K] -> [E] float64."""
    if spec.bits >= KEEP_BITS:
        return torch.zeros(W.shape[0], dtype=torch.float64)
    out = torch.empty(W.shape[0], dtype=torch.float64)
    for e in range(W.shape[0]):  # one expert at a time bounds the memory to one dequantized copy
        w = W[e].float()  # [N, K]
        q = rtn_roundtrip(w, spec.bits, spec.group_size, spec.sym)  # [N, K] float32
        out[e] = float((((w - q) ** 2) * moments[e].float().to(w.device)[None, :]).sum())
    return out


def damage_table(
    layer_weights: Iterable[tuple[int, ExpertWeights]],
    profile: Profile,
    config: PlanConfig,
    experts: list[int] | None = None,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(experts as (layer, e), damage [n_experts, 2, n_cols]) for the candidates of `config`; `experts`:
    which experts of the layer the weights hold (default all, in order)."""
    keys, rows = [], []
    for i, w in layer_weights:
        if i not in profile.layers:
            raise PlanError(f"the profile has no statistics for MoE layer {i}; profile this model first")
        s = profile.layers[i]
        imp = importance(profile, i, config)  # [E]
        m_in, m_mid = s.moments_in(), s.moments_mid()  # [E, H], [E, I]
        unseen = s.counts == 0
        if unseen.any():  # no down-proj moments for unseen experts: use the layer's mean over seen experts
            m_mid[unseen] = m_mid[~unseen].mean(0) if (~unseen).any() else 1.0
        ids = list(range(w.num_experts)) if experts is None else experts
        imp, m_in, m_mid = imp[ids], m_in[ids], m_mid[ids]  # the experts `w` holds
        cols = []
        for spec in config.columns():
            gu = weighted_error(w.gate_up, m_in, spec)  # [E]
            dn = weighted_error(w.down, m_mid, spec)  # [E]
            cols.append(imp[:, None] * torch.stack([gu, dn], dim=1))  # [E, 2]
        rows.append(torch.stack(cols, dim=2))  # [E, 2, n_cols]
        keys += [(i, e) for e in ids]
        logger.debug("damage table: layer %d done", i)
    return keys, torch.cat(rows).numpy()
