"""The exact knapsack over the damage table."""

import itertools

import numpy as np
import pytest

from moequant.plan.config import Budget, PlanConfig
from moequant.plan.knapsack import solve_mckp

CFG = PlanConfig(budget=Budget(bits=3.0), group_size=32)


def test_mckp_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, w = 6, 4
        cost = np.sort(rng.integers(1, 50, size=(n, w)), axis=1)[:, ::-1].astype(float)  # more bits cost more
        damage = np.sort(rng.random((n, w)), axis=1)  # and damage less
        capacity = float(rng.uniform(cost.min(1).sum(), cost.max(1).sum()))
        best = min(
            (sum(damage[i, c] for i, c in enumerate(combo)), combo)
            for combo in itertools.product(range(w), repeat=n)
            if sum(cost[i, c] for i, c in enumerate(combo)) <= capacity
        )
        choice = solve_mckp(damage, cost, capacity, CFG)
        assert cost[np.arange(n), choice].sum() <= capacity + 1e-9
        assert damage[np.arange(n), choice].sum() == pytest.approx(best[0], rel=1e-9, abs=1e-12), trial
