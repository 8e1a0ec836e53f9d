"""Storage modules of one projection (packed integer, 16-bit dense, bitsandbytes) and QuantLinear, the stored
non-expert Linear: buffers, row slices, the product one row slice at a time."""

import pytest
import torch
from torch import nn

import moequant.modules.qlinear as qlinear
from moequant.config import Method, QuantSpec
from moequant.modules.bnb_storage import BnbWeight
from moequant.modules.qlinear import DenseWeight, PackedWeight, QuantLinear, project, storage_for
from moequant.quantizers.packed import PackedLinear


def _packed(n=6, k=40, bits=3, gs=16, sym=False, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)  # [N, K]
    scales = torch.rand(n, 3, generator=g) + 0.1  # [N, G]
    zeros = None if sym else torch.randint(0, 1 << bits, (n, 3), generator=g)
    g_idx = torch.randint(0, 3, (k,), generator=g, dtype=torch.int32) if act_order else None
    spec = QuantSpec(Method.GPTQ, bits, gs, sym=sym)
    weight = PackedWeight.from_packed(PackedLinear.from_codes(codes, scales, zeros, bits, gs, g_idx), spec)
    group = g_idx.long() if act_order else torch.arange(k) // gs  # [K]
    zero = torch.full((n, 3), 1 << (bits - 1)) if sym else zeros
    direct = (codes - zero[:, group]) * scales.to(torch.float16).float()[:, group]  # [N, K]
    return weight, direct


@pytest.mark.parametrize("sym,act_order", [(False, False), (True, True)])
def test_packed_weight_buffers_and_rows(sym, act_order):
    w, direct = _packed(sym=sym, act_order=act_order)
    assert sorted(w.state_dict()) == sorted(
        ["qweight", "scales"] + ([] if sym else ["qzeros"]) + (["g_idx"] if act_order else [])
    )
    assert torch.equal(w.dequantize(), direct)
    assert torch.equal(w.dequantize_rows(2, 5), direct[2:5])
    empty = PackedWeight(6, 40, QuantSpec(Method.GPTQ, 3, 16, sym=sym), act_order=act_order)
    empty.load_state_dict(w.state_dict())  # the shapes from_pretrained builds from the bit map
    assert torch.equal(empty.dequantize(), direct)


def test_storage_for_each_method():
    def made(spec, act_order):
        return storage_for(spec, 8, 64, act_order, torch.bfloat16)

    assert made(QuantSpec(Method.GPTQ, 4, 32), True).g_idx is not None
    assert made(QuantSpec(Method.RTN, 4, 32), True).g_idx is None  # act-order is GPTQ's only
    keep = made(QuantSpec(Method.KEEP, 16), False)
    assert isinstance(keep, DenseWeight) and keep.dense.dtype == torch.bfloat16
    assert isinstance(made(QuantSpec(Method.BNB_NF4), False), BnbWeight)


def test_project_one_row_slice_at_a_time_equals_the_product(monkeypatch):
    w, direct = _packed(n=6, k=40)
    xs = [torch.randn(5, 40, generator=torch.Generator().manual_seed(1)), torch.randn(2, 40)]
    whole = project(w, xs)
    monkeypatch.setattr(qlinear, "ROW_SLICE_BYTES", 4 * 40 * 4)  # 4 rows a slice: rows 0-3, 4-5
    sliced = project(w, xs)
    for x, a, b in zip(xs, whole, sliced, strict=True):
        torch.testing.assert_close(a, x @ direct.T, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, x @ direct.T, rtol=1e-6, atol=1e-6)
    assert [(r1, r2) for r1, r2, _ in qlinear.dequantized_rows(w)] == [(0, 4), (4, 6)]


def test_quant_linear_forward_adds_the_bias_and_keeps_the_input_dtype():
    w, direct = _packed(n=6, k=40)
    bias = torch.arange(6, dtype=torch.float32)
    layer = QuantLinear(w, 40, 6, bias)
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 6) and y.dtype == torch.bfloat16
    assert torch.equal(y, (x.float() @ direct.T + bias).to(torch.bfloat16))
    empty = QuantLinear.empty(QuantSpec(Method.GPTQ, 3, 16), nn.Linear(40, 6), torch.float32)
    assert sorted(empty.state_dict()) == ["bias", "w.qweight", "w.qzeros", "w.scales"]


def test_row_slices_dequantize_exactly(monkeypatch):
    """PackedWeight.dequantize_rows equals rows of dequantize (act-order g_idx included); every storage
    module is covered by dequantized_rows; bitsandbytes storage comes whole."""
    from moequant.config import GPTQOptions
    from moequant.modules import qlinear
    from moequant.quantize.methods import HandlerOptions, quantize_stack

    torch.manual_seed(1)
    W = torch.randn(1, 50, 96)
    H = torch.eye(96)[None] + 0.1
    for spec, act_order in (
        (QuantSpec(Method.GPTQ, 3, 32), True),
        (QuantSpec(Method.RTN, 4, 32, sym=True), False),
    ):
        opts = HandlerOptions(GPTQOptions(act_order=act_order, static_groups=False), torch.float32)
        mod = quantize_stack(W, H if spec.method is Method.GPTQ else None, spec, opts)[0][0]
        full = mod.dequantize(torch.float32)  # [50, 96]
        assert torch.equal(mod.dequantize_rows(7, 31), full[7:31])
        got = torch.cat([d for _, _, d in qlinear.dequantized_rows(mod)])
        assert torch.equal(got, full)
        out = torch.full((24, 96), float("nan"))  # a given buffer: written whole, returned
        assert mod.dequantize_rows(7, 31, out=out) is out and torch.equal(out, full[7:31])
        monkeypatch.setattr(qlinear, "ROW_SLICE_BYTES", 7 * 96 * 4)  # slices of 7 rows, the last of 1
        slices = [(a, b, d.clone(), d.data_ptr()) for a, b, d in qlinear.dequantized_rows(mod, scratch=True)]
        assert torch.equal(torch.cat([d for _, _, d, _ in slices]), full)  # each right when it was yielded
        assert len({ptr for *_, ptr in slices}) == 1  # in one reused buffer
    bnb = quantize_stack(
        W,
        None,
        QuantSpec(Method.BNB_NF4, 4, 64),
        HandlerOptions(GPTQOptions(act_order=False, static_groups=False), torch.float32),
    )[0][0]
    assert [(a, b) for a, b, _ in qlinear.dequantized_rows(bnb)] == [(0, 50)]
