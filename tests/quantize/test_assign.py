"""Which rank quantizes which expert (moequant/quantize/assign.py)."""

from __future__ import annotations

from moequant.quantize.assign import assign_experts, expert_costs


def test_assignment_balances_cost_and_is_deterministic():
    tokens = [900, 10, 400, 400, 0, 2500, 60, 60]
    costs = expert_costs(tokens, 64, 32, 64, [True] * 7 + [False])
    for world in (1, 2, 3, 4):
        owner = assign_experts(costs, world)
        assert owner == assign_experts(list(costs), world)  # same answer on every rank
        loads = [sum(c for c, r in zip(costs, owner, strict=True) if r == k) for k in range(world)]
        # longest-processing-time first: within the largest single cost of the perfect split
        assert max(loads) <= sum(costs) / world + max(costs)
        assert set(owner) == set(range(min(world, len(costs))))
    assert costs[5] > costs[0] > costs[2] > costs[1]  # more tokens, more cost
    assert costs[7] < expert_costs([60], 64, 32, 64, [True])[0]  # no Hessian (RTN): no solve, no Hessian cost
