"""Damage table and the exact multiple-choice knapsack behind `moequant plan` (see plan.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from moequant.arch import ExpertWeights
from moequant.calibration.profiler import Profile
from moequant.config import KEEP_BITS, Method, QuantSpec
from moequant.errors import PlanError
from moequant.plan.schema import Importance, Plan, PlanConfig, expert_nbytes
from moequant.quantizers.rtn import rtn_quantize

logger = logging.getLogger(__name__)


def importance(profile: Profile, layer: int, kind: Importance, floor: float) -> torch.Tensor:
    """[E] float64 importance of each expert of one layer, per calibration token."""
    s = profile.layers[layer]
    if kind is Importance.UNIFORM:
        return torch.ones(s.num_experts, dtype=torch.float64)
    raw = s.weight_mass if kind is Importance.MASS else s.counts.double()
    raw = raw / max(s.tokens, 1)  # [E]
    return raw.clamp(min=floor * float(raw.mean()))


def weighted_error(W: torch.Tensor, moments: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """sum_{n,k} (W - Q(W))^2 m[k] per expert: W [E, N, K], moments [E, K] -> [E] float64."""
    if spec.bits >= KEEP_BITS:
        return torch.zeros(W.shape[0], dtype=torch.float64)
    out = torch.empty(W.shape[0], dtype=torch.float64)
    for e in range(W.shape[0]):  # one expert at a time bounds the memory to one dequantized copy
        w = W[e].float()  # [N, K]
        q = rtn_quantize(w, spec.bits, spec.group_size, spec.sym).dequantize(torch.float32)[0]  # [N, K]
        out[e] = float((((w - q) ** 2) * moments[e].float()[None, :]).sum())
    return out


def damage_table(
    layer_weights: Iterable[tuple[int, ExpertWeights]],
    profile: Profile,
    config: PlanConfig,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(experts as (layer, e), damage [n_experts, n_widths]) for the candidate widths of `config`."""
    keys, rows = [], []
    for i, w in layer_weights:
        if i not in profile.layers:
            raise PlanError(f"the profile has no statistics for MoE layer {i}; profile this model first")
        s = profile.layers[i]
        imp = importance(profile, i, config.importance, config.importance_floor)  # [E]
        m_in, m_mid = s.moments_in(), s.moments_mid()  # [E, H], [E, I]
        unseen = s.counts == 0
        if unseen.any():  # no down-proj moments for unseen experts: use the layer's mean over seen experts
            m_mid[unseen] = m_mid[~unseen].mean(0) if (~unseen).any() else 1.0
        cols = []
        for b in config.widths:
            spec = _spec(config, b)
            err = weighted_error(w.gate_up, m_in, spec) + weighted_error(w.down, m_mid, spec)  # [E]
            cols.append(imp * err)
        rows.append(torch.stack(cols, dim=1))  # [E, n_widths]
        keys += [(i, e) for e in range(w.num_experts)]
        logger.debug("damage table: layer %d done", i)
    return keys, torch.cat(rows).numpy()


def _spec(config: PlanConfig, bits: int) -> QuantSpec:
    if bits >= KEEP_BITS:
        return QuantSpec(Method.KEEP, KEEP_BITS, config.group_size, config.sym)
    return QuantSpec(config.method, bits, config.group_size, config.sym)


def solve_mckp(damage: np.ndarray, cost: np.ndarray, capacity: float, config: PlanConfig) -> np.ndarray:
    """Exact multiple-choice knapsack: pick one column per row minimising sum damage with sum cost <= capacity.

    damage, cost [n, w]; returns the chosen column per row [n]."""
    n, w = damage.shape
    lo = cost.min(axis=1).sum()
    hi = cost.max(axis=1).sum()
    if capacity < lo:
        raise PlanError(
            f"impossible budget: needs at least {lo:.0f} bytes of expert weights, {capacity:.0f} given"
        )
    if capacity >= hi:  # everything fits: the least damaging width everywhere
        return damage.argmin(axis=1)
    scale = damage.max() or 1.0
    c = (damage / scale).reshape(-1)  # objective, well conditioned
    rows = np.repeat(np.arange(n), w)
    one_each = csr_array((np.ones(n * w), (rows, np.arange(n * w))), shape=(n, n * w))
    constraints = [
        LinearConstraint(one_each, lb=np.ones(n), ub=np.ones(n)),
        LinearConstraint(cost.reshape(1, -1).astype(np.float64), lb=-np.inf, ub=capacity),
    ]
    res = milp(
        c,
        constraints=constraints,
        integrality=np.ones(n * w),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": config.mip_rel_gap, "time_limit": config.time_limit},
    )
    if res.x is None:
        raise PlanError(f"the bit-allocation solver found no solution: {res.message}")
    if res.status != 0:
        logger.warning("bit allocation stopped early (%s); using the best plan found", res.message)
    return res.x.reshape(n, w).argmax(axis=1)


def budget_bytes(config: PlanConfig, n_expert_params: int, non_expert_bytes: int) -> float:
    if config.budget.bits is not None:
        return config.budget.bits * n_expert_params / 8
    avail = config.budget.gb * 1e9 - non_expert_bytes
    if avail <= 0:
        raise PlanError(
            f"impossible budget: {config.budget.gb} GB is less than the non-expert weights alone "
            f"({non_expert_bytes / 1e9:.3f} GB)"
        )
    return avail


def make_plan(
    model_type: str,
    layer_weights: Iterable[tuple[int, ExpertWeights]],
    profile: Profile,
    config: PlanConfig,
    non_expert_bytes: int = 0,
    act_order: bool = False,
) -> Plan:
    """The damage-minimising plan under the budget (exact MILP), from in-memory expert weights."""
    layer_weights = list(layer_weights)
    hidden, inter = layer_weights[0][1].hidden, layer_weights[0][1].intermediate
    keys, damage = damage_table(layer_weights, profile, config)
    return plan_from_damage(model_type, keys, damage, hidden, inter, config, non_expert_bytes, act_order)


def plan_from_damage(
    model_type: str,
    keys: list[tuple[int, int]],
    damage: np.ndarray,
    hidden: int,
    inter: int,
    config: PlanConfig,
    non_expert_bytes: int = 0,
    act_order: bool = False,
) -> Plan:
    """Solve the knapsack for a damage table whose columns are `config.widths`."""
    specs = [_spec(config, b) for b in config.widths]
    cost = np.array(
        [[expert_nbytes(s, hidden, inter, act_order) for s in specs]] * len(keys), dtype=np.float64
    )
    n_params = len(keys) * 3 * hidden * inter
    capacity = budget_bytes(config, n_params, non_expert_bytes)
    lo = cost.min(axis=1).sum()
    if capacity < lo:
        asked = f"{config.budget.bits} bits" if config.budget.bits is not None else f"{config.budget.gb} GB"
        raise PlanError(
            f"impossible budget: even {min(config.widths)}-bit experts need {8 * lo / n_params:.3f} bits per expert "
            f"weight ({(lo + non_expert_bytes) / 1e9:.4f} GB in all), more than the {asked} asked"
        )
    choice = solve_mckp(damage, cost, capacity, config)
    layers: dict[int, list[QuantSpec]] = {}
    for (i, _e), c in zip(keys, choice, strict=True):
        layers.setdefault(i, []).append(specs[c])
    plan = Plan(model_type, layers, hidden, inter, act_order=act_order)
    plan.estimate = {
        "budget_bytes": int(capacity),
        "expert_bytes": plan.total_expert_bytes(),
        "non_expert_bytes": int(non_expert_bytes),
        "damage": float(damage[np.arange(len(keys)), choice].sum()),
        "solver": "scipy.optimize.milp (HiGHS), exact multiple-choice knapsack",
    }
    logger.info("plan: %.3f bits per expert weight, widths %s", plan.average_bits(), plan.histogram())
    return plan


def uniform_plan(
    model_type: str,
    layer_experts: dict[int, int],
    hidden: int,
    intermediate: int,
    spec: QuantSpec,
    act_order=False,
) -> Plan:
    """Every expert at the same spec (the baseline a budgeted plan must beat)."""
    layers = {i: [spec] * n for i, n in layer_experts.items()}
    plan = Plan(model_type, layers, hidden, intermediate, act_order=act_order)
    plan.estimate = {"expert_bytes": plan.total_expert_bytes(), "uniform": True}
    return plan
