"""Non-expert Linears quantized one by one (moequant/quantize/linears.py)."""

from __future__ import annotations

import torch
from torch import nn

from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.modules.qlinear import QuantLinear
from moequant.quantize.linears import quantize_linears
from moequant.quantize.methods import HandlerOptions, quantize_stack


def test_each_linear_is_replaced_at_its_spec_and_gptq_uses_the_fed_activations():
    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    scale = torch.linspace(0.05, 4, 64)
    X = torch.randn(256, 64) * scale  # [T, 64], uneven input scales: GPTQ's Hessian matters
    original = [root[0].weight.detach().clone(), root[2].weight.detach().clone()]
    specs = {"0": QuantSpec(Method.GPTQ, 3, 32), "2": QuantSpec(Method.RTN, 4, 32)}
    rows = quantize_linears(root, specs, lambda: root(X), QuantizeConfig(progress=False), torch.float32)
    assert [(r.module, r.method, r.bits) for r in rows] == [("0", "gptq", 3), ("2", "rtn", 4)]
    assert isinstance(root[0], QuantLinear) and isinstance(root[2], QuantLinear)
    for r, W, q in zip(rows, original, (root[0], root[2]), strict=True):
        deq = q.w.dequantize(torch.float32)
        assert abs(r.rel_weight_error - float((W - deq).norm() / W.norm())) < 1e-6
    assert set(rows[0].diag) == {"gptq_loss", "damp"} and rows[1].diag == {}
    # the GPTQ Linear read the fed activations: on them it loses less than RTN at the same width
    r3 = quantize_stack(original[0][None], None, QuantSpec(Method.RTN, 3, 32), HandlerOptions())[0][0]
    out_err = lambda deq: float(((X @ (original[0] - deq).T) ** 2).sum())  # [T, 32] output error
    assert out_err(root[0].w.dequantize(torch.float32)) < out_err(r3.dequantize(torch.float32))
