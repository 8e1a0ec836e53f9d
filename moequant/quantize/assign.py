"""Which rank quantizes which expert of a layer: balanced by cost, the same answer on every rank.

An expert's cost counts the multiply-adds the quantize pass spends on it, per projection of N rows and input
width K seeing T routed tokens: its Hessian (T K^2), the forward that feeds the next Hessian and the layer's
outputs (T N K), and for a Hessian method the solve itself (N K^2, the lazy-batch updates and the
factorisation). Experts go, most costly first, to the rank with the least cost so far (longest-processing-
time first; ties: the lower expert id, then the lower rank), so every rank computes the same assignment
from the same routed-token counts.
"""

from __future__ import annotations

from moequant.runtime.ranks import balanced_owners


def expert_costs(
    tokens: list[int], hidden: int, intermediate: int, in_rows: int, hessian: list[bool]
) -> list[int]:
    """Multiply-adds per expert (see the module docstring): gate/up is N = in_rows rows (2I, or I for up alone)
    over K = H, down N = H over K = I."""
    costs = []
    for t, h in zip(tokens, hessian, strict=True):
        cost = 0
        for N, K in ((in_rows, hidden), (hidden, intermediate)):
            cost += t * N * K + (t * K * K + N * K * K if h else N * K)
        costs.append(cost)
    return costs


def assign_experts(costs: list[int], world: int) -> list[int]:
    """The rank of each expert: longest-processing-time first over `world` ranks (ranks.balanced_owners)."""
    return balanced_owners(costs, world)
