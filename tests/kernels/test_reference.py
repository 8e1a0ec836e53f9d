"""The torch reference of the MoE kernels against a naive per-token loop: the definition."""

import pytest
import torch
from kernel_cases import GPT_OSS, H, I, make_inputs, make_layer

from moequant.arch.base import Activation, ExpertWeights, expert_forward
from moequant.kernels.reference import moe_reference


@pytest.mark.parametrize("activation", [Activation.SILU_GLU, Activation.GPT_OSS_SWIGLU, Activation.RELU2])
def test_reference_matches_naive_per_token_loop(activation):
    """RELU2 is non-gated: gate_up holds up alone ([E, I, H]) and carries a bias of I."""
    formats = [(4, 16, False, False), (3, 16, True, False), None, (2, 8, False, True), (8, 32, True, False)]
    bias = activation is not Activation.SILU_GLU
    params = GPT_OSS if activation is Activation.GPT_OSS_SWIGLU else None
    packed, gu, dn, b1, b2 = make_layer(formats, seed=0, bias=bias, gated=activation.gated)
    packed, b1, b2 = packed.to("cpu"), *(None if b is None else b.cpu() for b in (b1, b2))
    x, idx, w = (t.cpu() for t in make_inputs(9, len(formats), 3, seed=0, dtype=torch.float32))
    idx[0] = torch.tensor([1, 1, 2])  # duplicate expert and a non-packed one
    zeros_gu, zeros_dn = torch.zeros(activation.in_rows(I), H), torch.zeros(H, I)
    dense = ExpertWeights(
        gate_up=torch.stack([zeros_gu if m is None else m.dequantize() for m in gu]),  # [E, 2I or I, H]
        down=torch.stack([zeros_dn if m is None else m.dequantize() for m in dn]),  # [E, H, I]
        gate_up_bias=b1,
        down_bias=b2,
    )
    naive = torch.zeros(9, H)
    for t in range(9):
        for j in range(3):
            e = int(idx[t, j])
            if formats[e] is not None:
                naive[t] += w[t, j] * expert_forward(dense, e, x[t : t + 1], activation, params)[0]
    ref = moe_reference(x, idx, w, packed, activation, params, b1, b2)
    torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)
    if not activation.gated:  # relu(up)^2 by hand for a packed expert: the definition itself
        e = next(e for e, f in enumerate(formats) if f is not None)
        up = x[1] @ gu[e].dequantize().T + b1[e]  # [I]
        y = torch.relu(up).square() @ dn[e].dequantize().T + b2[e]  # [H]
        torch.testing.assert_close(expert_forward(dense, e, x[1:2], activation)[0], y, atol=1e-5, rtol=1e-5)


def test_token_groups_bound_bytes_and_never_split_a_set():
    from moequant.kernels.reference import token_groups

    assert token_groups([3, 3, 3], 1, budget=24) == [[0, 1], [2]]  # 12 bytes per set
    assert token_groups([10, 1, 1], 1, budget=8) == [[0], [1, 2]]  # an oversized set goes alone
    assert token_groups([], 5) == []
