"""The quantized experts' outputs the next layer reads (moequant/quantize/expert_outputs.py)."""

from __future__ import annotations

import pytest
import torch

from moequant.arch import Activation
from moequant.config import Method, QuantSpec


@pytest.mark.parametrize("slice_rows", [None, 5])  # None: one slice per projection; 5: multi-slice products
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_expert_outputs_equal_the_quantized_forward(monkeypatch, slice_rows, in_dtype):
    """The next layer's inputs come from expert_outputs; they must be what the quantized experts compute,
    also when the weights are read in row slices and the experts' inputs are 16-bit."""
    from moequant.calibration.expert_io import ExpertInputs
    from moequant.config import GPTQOptions
    from moequant.modules import qlinear
    from moequant.modules.qexperts import QuantizedExperts
    from moequant.quantize.expert_outputs import expert_outputs
    from moequant.quantize.methods import HandlerOptions, quantize_stack

    torch.manual_seed(0)
    E, H, I, k = 6, 64, 96, 2
    if slice_rows is not None:
        monkeypatch.setattr(qlinear, "ROW_SLICE_BYTES", 4 * max(H, I) * slice_rows)
    specs = [QuantSpec(Method.RTN, b, 32) for b in (2, 3, 4, 8, 4)] + [QuantSpec(Method.KEEP, 16, 32)]
    opts = HandlerOptions(GPTQOptions(act_order=False, static_groups=False), torch.float32)
    qe = QuantizedExperts(
        specs, H, I, Activation.SILU_GLU, {}, has_bias=False, act_order=False, dtype=torch.float32
    )
    plain = QuantizedExperts(
        specs, H, I, Activation.SILU_GLU, {}, has_bias=False, act_order=False, dtype=torch.float32
    )
    for e, s in enumerate(specs):
        gu = quantize_stack(torch.randn(1, 2 * I, H), None, s, opts)[0][0]
        dn = quantize_stack(torch.randn(1, H, I), None, s, opts)[0][0]
        qe.set_expert(e, gu, dn, s)
        plain.set_expert(e, gu, dn, s)
    feats = ExpertInputs([], [], [], dtype=in_dtype)
    for T in (1, 37, 200):
        x = torch.randn(T, H).to(in_dtype)
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
        idx[idx == 4] = 5  # expert 4 never routed
        w = torch.softmax(torch.randn(T, k), -1)
        feats.x.append(x), feats.idx.append(idx), feats.w.append(w), feats.shapes.append(x.shape)
    got = expert_outputs(qe, feats)
    for b in range(3):
        want = qe(feats.x[b], feats.idx[b], feats.w[b])
        assert got[b].dtype == in_dtype and torch.equal(got[b], want)
    if slice_rows is not None:  # the products were sliced, and agree with whole ones to rounding
        assert len(list(qlinear.dequantized_rows(qe.slot(0).down))) == -(-H // slice_rows)
        monkeypatch.setattr(qlinear, "ROW_SLICE_BYTES", 2**40)
        whole = plain(feats.x[2], feats.idx[2], feats.w[2])
        rel = (got[2].float() - whole.float()).norm() / whole.float().norm()
        assert rel < (1e-2 if in_dtype == torch.bfloat16 else 1e-6)
