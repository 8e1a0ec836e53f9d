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


def test_kept_down_inputs_write_the_same_bytes(tmp_path, monkeypatch):
    """The layer's outputs read the down inputs the down Hessians computed (QuantizeConfig.keep_down_inputs_mb)
    instead of running each expert's gate/up again: the bundled model quantized both ways writes the same
    shards (every later layer's Hessians read those outputs), and the kept experts skip expert_hidden."""
    from moequant import api
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.config import QuantizeConfig
    from moequant.modules.qexperts import QuantizedExperts

    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig(samples=8, seq_len=64))
    plan = api.make_uniform_plan(None, QuantSpec(Method.GPTQ, 3, 128))
    hidden_calls: list[int] = []
    first_half = QuantizedExperts.expert_hidden
    monkeypatch.setattr(
        QuantizedExperts,
        "expert_hidden",
        lambda self, e, xs: hidden_calls.append(e) or first_half(self, e, xs),
    )
    shards, calls = {}, {}
    for run, mb in (("kept", 1024), ("off", 0), ("no room", 1024)):
        if run == "no room":  # half the memory left is less than the down inputs take: not kept
            monkeypatch.setattr("moequant.quantize.experts.available_bytes", lambda device: 2**10)
        hidden_calls.clear()
        out = tmp_path / run.replace(" ", "_")
        config = QuantizeConfig(progress=False, keep_down_inputs_mb=mb, min_tokens=4)
        api.quantize(None, plan, calib, out, config, tokenizer=tok)
        shards[run] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
        calls[run] = len(hidden_calls)
    assert shards["kept"] and shards["kept"] == shards["off"] == shards["no room"]
    assert calls["off"] > 0 and calls["kept"] < calls["off"] // 4  # only RTN fallbacks (if any) run gate/up
    assert calls["no room"] == calls["off"]
