"""The exact multiple-choice knapsack behind `moequant plan`: one candidate per item (an expert's projection, a
whole expert, with --non-expert auto a layer's attention or shared expert), least total damage, total bytes
within the budget, solved as a mixed-integer linear program with scipy.optimize.milp (HiGHS)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from moequant.arch.base import input_rows
from moequant.config import QuantSpec, expert_spec
from moequant.errors import PlanError
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.damage import DamageTable
from moequant.plan.schema import Plan, PlannedLinear, expert_params, linear_nbytes

logger = logging.getLogger(__name__)


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


def budget_bytes(budget: Budget, n_expert_params: int, non_expert_bytes: int) -> float:
    """Bytes of expert weights the budget allows."""
    if budget.bits is not None:
        return budget.bits * n_expert_params / 8
    avail = budget.gb * 1e9 - non_expert_bytes
    if avail <= 0:
        raise PlanError(
            f"impossible budget: {budget.gb} GB is less than the non-expert weights alone "
            f"({non_expert_bytes / 1e9:.3f} GB)"
        )
    return avail


def item_costs(table: DamageTable, act_order: bool) -> np.ndarray:
    """Stored bytes of every (expert, projection, candidate): [n_experts, 2, n_cols] (gate/up, down)."""
    h, i = table.hidden, table.intermediate
    cols = table.config.columns()
    gu = [linear_nbytes(s, input_rows(i, table.gated), h, act_order) for s in cols]
    dn = [linear_nbytes(s, h, i, act_order) for s in cols]
    return np.broadcast_to(np.array([gu, dn], dtype=np.float64), (len(table.keys), 2, len(cols)))


def linear_item_costs(table: DamageTable, act_order: bool) -> np.ndarray:
    """Stored bytes of every --non-expert auto item at every candidate: [n_items, n_cols]."""
    cols = table.config.columns()
    return np.array(
        [
            [sum(linear_nbytes(s, o, i, act_order) for _, o, i in item.linears) for s in cols]
            for item in table.linear_items
        ],
        dtype=np.float64,
    ).reshape(len(table.linear_items), len(cols))


def solve(table: DamageTable, budget: Budget, act_order: bool = False) -> Plan:
    """The least-damage plan within `budget` for a damage table (whose columns are table.config.columns()):
    one candidate per knapsack item, an item being an expert's projection (config.per_projection, with a
    per-projection table) or a whole expert."""
    config = table.config
    keys, hidden, inter = table.keys, table.hidden, table.intermediate
    split = config.items_per_expert == 2 and table.per_projection
    cost3 = item_costs(table, act_order)  # [n, 2, c]
    items = table.linear_items
    if items and table.linear_damage is None:
        raise PlanError("the damage table lists non-expert items the layer probe has not priced")
    n_params = len(keys) * expert_params(hidden, inter, table.gated) + sum(
        it.params for it in items
    )  # planned
    fixed = table.non_expert_bytes - 2 * sum(it.params for it in items)  # 16-bit bytes outside the knapsack
    capacity = budget_bytes(budget, n_params, fixed)
    rows = _knapsack_rows(table, cost3, split, act_order)
    _check_fits(rows.cost, capacity, fixed, n_params, budget, config)
    if config.target.widths is not None:  # one width per layer: a layer is one knapsack item
        choice = _per_layer_choice(keys, rows.damage, rows.cost, capacity, config)
    else:
        choice = solve_mckp(rows.damage, rows.cost, capacity, config)
    damage = float(rows.damage[np.arange(len(choice)), choice].sum())  # of the chosen candidates
    plan = _plan_from_choice(table, choice, rows.expert_rows, split, act_order)
    plan.estimate = _estimate(plan, table, capacity, fixed, damage, split)
    logger.info(
        "plan: %.3f bits per %s weight, widths %s%s", plan.average_bits(), "planned" if plan.linears else "expert",
        plan.histogram(), f", non-expert Linears {plan.linear_histogram()}" if plan.linears else "",
    )  # fmt: skip
    return plan


@dataclass(frozen=True)
class _Rows:
    """The knapsack's rows: the experts' (per projection or per expert), then one per non-expert item."""

    damage: np.ndarray  # [rows, c]
    cost: np.ndarray  # [rows, c]
    expert_rows: int  # how many of the rows are the experts'


def _knapsack_rows(table: DamageTable, cost3: np.ndarray, split: bool, act_order: bool) -> _Rows:
    """Damage and bytes of every knapsack row at every candidate, from the table and the item costs [n, 2, c]."""
    if split:  # rows: every expert's gate/up, then every expert's down
        damage = np.concatenate([table.damage[:, 0], table.damage[:, 1]])  # [2n, c]
        cost = np.concatenate([cost3[:, 0], cost3[:, 1]])  # [2n, c]
    else:
        damage, cost = table.expert_damage(), cost3.sum(axis=1)  # [n, c]
    expert_rows = damage.shape[0]
    if table.linear_items:  # then one row per non-expert item
        damage = np.concatenate([damage, table.linear_damage])  # [rows + m, c]
        cost = np.concatenate([cost, linear_item_costs(table, act_order)])  # [rows + m, c]
    return _Rows(damage, cost, expert_rows)


def _check_fits(
    cost: np.ndarray, capacity: float, fixed: float, n_params: int, budget: Budget, config: PlanConfig
) -> None:
    """A PlanError when even the narrowest candidate of every row [rows, c] exceeds the budget's bytes."""
    lo = cost.min(axis=1).sum()
    if capacity < lo:
        asked = f"{budget.bits} bits" if budget.bits is not None else f"{budget.gb} GB"
        raise PlanError(
            f"impossible budget: even {min(config.widths)}-bit experts need {8 * lo / n_params:.3f} bits per expert "
            f"weight ({(lo + fixed) / 1e9:.4f} GB in all), more than the {asked} asked"
        )


def _plan_from_choice(
    table: DamageTable, choice: np.ndarray, expert_rows: int, split: bool, act_order: bool
) -> Plan:
    """The plan of the chosen column of every knapsack row [rows]: experts' specs per layer, planned Linears."""
    specs = table.config.columns()
    n = len(table.keys)
    expert_choice, item_choice = choice[:expert_rows], choice[expert_rows:]
    gu_choice, dn_choice = (expert_choice[:n], expert_choice[n:]) if split else (expert_choice, expert_choice)
    layers: dict[int, list] = {}
    for (i, _e), g, d in zip(table.keys, gu_choice, dn_choice, strict=True):
        layers.setdefault(i, []).append(expert_spec(specs[g], specs[d]))
    linears = {
        item.prefix + name: PlannedLinear(specs[c], o, i_)
        for item, c in zip(table.linear_items, item_choice, strict=True)
        for name, o, i_ in item.linears
    }
    return Plan(
        table.model_type,
        layers,
        table.hidden,
        table.intermediate,
        act_order=act_order,
        linears=linears,
        gated=table.gated,
    )


def _estimate(
    plan: Plan, table: DamageTable, capacity: float, fixed: float, damage: float, split: bool
) -> dict:
    """The plan's informational record: bytes, total damage, what the items were, how it was solved."""
    config, items = table.config, table.linear_items
    estimate = {
        "budget_bytes": int(capacity),
        "expert_bytes": plan.total_expert_bytes(),
        **({"linear_bytes": plan.total_linear_bytes()} if plan.linears else {}),
        "non_expert_bytes": int(fixed),
        "damage": damage,
        "items": ("per projection (gate/up, down)" if split else "per expert")
        + (f", and {len(items)} non-expert modules (--non-expert auto)" if items else ""),
        "solver": "scipy.optimize.milp (HiGHS), exact multiple-choice knapsack"
        + (f", one width per layer (--target {config.target.value})" if config.target.widths else ""),
    }
    if len(config.grid_sizes) > 1:
        estimate["group_sizes"] = list(config.grid_sizes)
    return estimate | table.probe


def _per_layer_choice(keys, damage, cost, capacity: float, config: PlanConfig) -> np.ndarray:
    """The exact knapsack over layers (each layer's experts all at one width): a layer's damage and bytes at a
    width are the sums over its experts. Returns the chosen column of every expert row [n]."""
    layer_ids = sorted({i for i, _ in keys})
    row_layer = np.array([layer_ids.index(i) for i, _ in keys])  # [n]
    ld = np.zeros((len(layer_ids), damage.shape[1]))  # [L, w]
    lc = np.zeros((len(layer_ids), damage.shape[1]))  # [L, w]
    np.add.at(ld, row_layer, damage)
    np.add.at(lc, row_layer, cost)
    return solve_mckp(ld, lc, capacity, config)[row_layer]


def uniform_plan(
    model_type: str,
    layer_experts: dict[int, int],
    hidden: int,
    intermediate: int,
    spec: QuantSpec,
    act_order=False,
    gated: bool = True,
) -> Plan:
    """Every expert at the same spec (the baseline a budgeted plan must beat)."""
    layers = {i: [spec] * n for i, n in layer_experts.items()}
    plan = Plan(model_type, layers, hidden, intermediate, act_order=act_order, gated=gated)
    plan.estimate = {"expert_bytes": plan.total_expert_bytes(), "uniform": True}
    return plan
