"""The storage-method registry (moequant/quantize/methods.py): every Method has a handler, and each returns
what its quantizer computes."""

from __future__ import annotations

import torch

from moequant.config import GPTQOptions, Method, QuantSpec
from moequant.quantize.methods import HandlerOptions, needs_hessian, quantize_stack
from moequant.quantizers.rtn import rtn_quantize

OPTS = HandlerOptions(GPTQOptions(act_order=False, static_groups=False), torch.float32)


def test_only_gptq_needs_a_hessian_and_every_method_is_registered():
    assert {m for m in Method if needs_hessian(m)} == {Method.GPTQ, Method.SIGNROUND}  # SignRound: GPTQ first


def test_rtn_and_keep_handlers_return_the_quantizers_values():
    torch.manual_seed(0)
    W = torch.randn(3, 16, 64)  # [E, N, K]
    mods, diag = quantize_stack(W, None, QuantSpec(Method.RTN, 3, 32), OPTS)
    want = rtn_quantize(W, 3, 32, False)
    for e in range(3):
        assert torch.equal(mods[e].dequantize(torch.float32), want.packed(e).dequantize().float())
    assert diag == [{}, {}, {}]
    kept, _ = quantize_stack(
        W, None, QuantSpec(Method.KEEP, 16, 32), HandlerOptions(keep_dtype=torch.bfloat16)
    )
    assert torch.equal(kept[1].dequantize(torch.float32), W[1].bfloat16().float())


def test_gptq_handler_reports_loss_and_damping_and_beats_rtn_on_its_hessian():
    torch.manual_seed(1)
    W, X = (
        torch.randn(2, 16, 64),
        torch.randn(2, 512, 64) * torch.linspace(0.1, 3, 64),
    )  # [E, N, K], [E, T, K]
    H = 2 / 512 * X.transpose(1, 2) @ X  # [E, K, K]
    spec = QuantSpec(Method.GPTQ, 3, 32)
    mods, diag = quantize_stack(W, H.clone(), spec, OPTS)
    rtn, _ = quantize_stack(W, None, QuantSpec(Method.RTN, 3, 32), OPTS)
    for e in range(2):
        loss = lambda m, e=e: float(((X[e] @ (W[e] - m.dequantize(torch.float32)).T) ** 2).sum())
        assert loss(mods[e]) < loss(rtn[e])
        assert set(diag[e]) == {"gptq_loss", "damp"} and diag[e]["damp"] > 0
