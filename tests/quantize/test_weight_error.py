"""The report's relative weight error (moequant/quantize/weight_error.py)."""

from __future__ import annotations

import pytest
import torch

from moequant.arch import ExpertWeights
from moequant.config import GPTQOptions, Method, QuantSpec
from moequant.modules import qlinear
from moequant.quantize.methods import HandlerOptions, quantize_stack
from moequant.quantize.weight_error import err_sums, rel_err

OPTS = HandlerOptions(GPTQOptions(act_order=False, static_groups=False), torch.float32)


@pytest.mark.parametrize("slice_rows", [None, 3])  # None: one row slice; 3: many
def test_rel_err_equals_the_direct_formula(monkeypatch, slice_rows):
    if slice_rows is not None:
        monkeypatch.setattr(qlinear, "ROW_SLICE_BYTES", 4 * 48 * slice_rows)
    torch.manual_seed(3)
    gu_w, dn_w = torch.randn(1, 64, 48), torch.randn(1, 48, 32)
    gu = quantize_stack(gu_w, None, QuantSpec(Method.RTN, 3, 16), OPTS)[0][0]
    dn = quantize_stack(dn_w, None, QuantSpec(Method.RTN, 2, 16), OPTS)[0][0]
    num = (gu_w[0] - gu.dequantize(torch.float32)).double().pow(2).sum() + (
        dn_w[0] - dn.dequantize(torch.float32)
    ).double().pow(2).sum()
    den = gu_w.double().pow(2).sum() + dn_w.double().pow(2).sum()
    want = float((num / den).sqrt())
    got = rel_err(*err_sums(dn_w[0], dn, *err_sums(gu_w[0], gu)))
    assert 0.1 < want and got == pytest.approx(want, abs=2e-6)


def test_relative_error_leaves_float32_weights_alone():
    """The report's error runs in place on temporaries only: float32 weights (in-memory models, .float() is
    no copy) and float32 dense storage (KEEP) come out unchanged."""
    torch.manual_seed(0)
    w = ExpertWeights(torch.randn(2, 64, 32), torch.randn(2, 32, 32))
    before = (w.gate_up.clone(), w.down.clone())
    for spec in (QuantSpec(Method.RTN, 4, 32), QuantSpec(Method.KEEP, 16, 32)):
        gu = quantize_stack(w.gate_up, None, spec, OPTS)[0][1]
        dn = quantize_stack(w.down, None, spec, OPTS)[0][1]
        kept = (gu.dequantize(torch.float32).clone(), dn.dequantize(torch.float32).clone())
        err = rel_err(*err_sums(w.down[1], dn, *err_sums(w.gate_up[1], gu)))
        assert (err == 0.0) == (spec.method is Method.KEEP)
        assert torch.equal(w.gate_up, before[0]) and torch.equal(w.down, before[1])
        assert torch.equal(gu.dequantize(torch.float32), kept[0]) and torch.equal(
            dn.dequantize(torch.float32), kept[1]
        )
