"""`--method signround` (quantize/signround.py): a chunk of experts learns against the layer's output (block
target) or each expert's own output on its routed tokens (expert target), keeps per expert whichever of GPTQ's
result and its own does better there, and its storage is the integer format every runtime reads."""

from __future__ import annotations

import pytest
import torch

from moequant.arch import apply_activation
from moequant.checkpoint.loading import load_model
from moequant.config import (
    GPTQOptions,
    Method,
    QuantizeConfig,
    QuantSpec,
    SignRoundOptions,
    SignRoundTarget,
)
from moequant.quantize.methods import HandlerOptions, learns_experts, needs_tokens, quantize_stack
from moequant.quantize.signround import signround_chunk


@pytest.fixture(scope="module")
def block():
    """Layer 0's experts of the bundled model, and 8 batches of 64 tokens routed top-2 by a random router:
    (arch, ExpertWeights in float32, activation params, batches [(x [T, H], idx [T, 2], w [T, 2])])."""
    from moequant.arch import resolve

    model = load_model(None)
    arch, refs = resolve(model)
    w = arch.expert_weights(refs[0].experts)
    w = type(w)(w.gate_up.float(), w.down.float())
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        x = torch.randn(64, w.hidden, generator=gen)  # [T, H]
        logits = torch.randn(64, w.num_experts, generator=gen)  # [T, E]
        top, idx = logits.softmax(-1).topk(2, dim=-1)  # [T, 2]
        batches.append((x, idx, top / top.sum(-1, keepdim=True)))
    return arch, w, arch.activation_params(refs[0].experts), batches


def _output_errors(arch, w, act, batches, gu, dn) -> torch.Tensor:
    """[E] sum over each expert's routed tokens of w^2 ||f_q(x) - f(x)||^2 (f_q: the storage modules)."""
    out = torch.zeros(w.num_experts, dtype=torch.float64)
    for e in range(w.num_experts):
        for x, idx, wt in batches:
            rows, pos = torch.where(idx == e)
            xe = x[rows]
            f = apply_activation(arch.activation, xe @ w.gate_up[e].T, act) @ w.down[e].T
            Gq, Dq = gu[e].dequantize(torch.float32), dn[e].dequantize(torch.float32)
            fq = apply_activation(arch.activation, xe @ Gq.T, act) @ Dq.T
            out[e] += float((((fq - f) ** 2).sum(-1) * wt[rows, pos] ** 2).sum())
    return out


def test_signround_reads_tokens_and_is_learned_after_its_handler():
    assert learns_experts(Method.SIGNROUND) and needs_tokens(Method.SIGNROUND)
    assert not learns_experts(Method.GPTQ) and Method.SIGNROUND.is_integer


def test_learned_experts_beat_gptq_on_their_outputs_and_never_lose(block):
    arch, w, act, batches = block
    spec = QuantSpec(Method.SIGNROUND, 2, 128)
    config = QuantizeConfig(
        progress=False,
        signround=SignRoundOptions(steps=60, batch_tokens=64, target=SignRoundTarget.EXPERT),
    )
    from moequant.quantize import expert_hessians

    part = list(range(w.num_experts))
    opts = HandlerOptions(GPTQOptions(), torch.float32)
    gu0, _ = quantize_stack(
        w.gate_up, expert_hessians.gate_up_hessians(part, w.hidden, batches, config, "cpu"), spec, opts
    )
    dn0, _ = quantize_stack(
        w.down,
        expert_hessians.down_hessians(arch, w, part, dict(enumerate(gu0)), batches, config, act),
        spec,
        opts,
    )
    gu, dn, won = signround_chunk(
        arch, w, part, (spec, spec), (gu0, dn0), (True, True), batches, config, act, seed=0
    )
    before = _output_errors(arch, w, act, batches, gu0, dn0)
    after = _output_errors(arch, w, act, batches, gu, dn)
    assert torch.all(after <= before * (1 + 1e-6))  # GPTQ's result is every expert's first candidate
    assert after.sum() < 0.9 * before.sum(), (after, before)  # and 60 steps learn something better
    learned = [e for e in part if gu[e] is not gu0[e]]
    assert learned == [e for e in part if won[e]]
    assert learned and all(dn[e] is not dn0[e] for e in learned)  # an expert's projections go together
    again = signround_chunk(
        arch, w, part, (spec, spec), (gu0, dn0), (True, True), batches, config, act, seed=0
    )
    assert all(torch.equal(a.qweight, b.qweight) for a, b in zip(gu, again[0], strict=True))  # seeded


def test_a_projection_at_another_method_stays_as_stored(block):
    arch, w, act, batches = block
    learn, keep = QuantSpec(Method.SIGNROUND, 2, 128), QuantSpec(Method.RTN, 3, 128)
    config = QuantizeConfig(
        progress=False,
        signround=SignRoundOptions(steps=20, batch_tokens=64, target=SignRoundTarget.EXPERT),
    )
    opts = HandlerOptions(GPTQOptions(), torch.float32)
    gu0, _ = quantize_stack(w.gate_up, None, QuantSpec(Method.RTN, 2, 128), opts)
    dn0, _ = quantize_stack(w.down, None, keep, opts)
    part = list(range(w.num_experts))
    gu, dn, won = signround_chunk(
        arch, w, part, (learn, keep), (gu0, dn0), (True, False), batches, config, act, seed=1
    )
    assert all(a is b for a, b in zip(dn, dn0, strict=True))
    assert any(a is not b for a, b in zip(gu, gu0, strict=True))


def test_a_signround_checkpoint_reports_its_choices_and_loads_in_bf16(small_calib, tmp_path):
    """The whole pass at uniform signround:2 (few steps): every row names its stored candidate, and the checkpoint
    loads the way users load it (a fresh process, bf16) and gives finite logits close to the in-memory model's."""
    import json
    import subprocess
    import sys

    from moequant import api
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_tokenizer

    calib = build_calibration(load_tokenizer(None), CalibConfig(str(small_calib), samples=16, seq_len=64))
    plan = api.make_uniform_plan(None, QuantSpec(Method.SIGNROUND, 2, 128))
    cfg = QuantizeConfig(progress=False, signround=SignRoundOptions(steps=20, batch_tokens=64))
    api.quantize(None, plan, calib, tmp_path / "q", cfg)
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    rows = report["experts"] if "experts" in report else report["rows"]
    kept = [r.get("gate_up_signround") for r in rows if not r.get("note")]
    assert kept and set(kept) <= {"learned", "start"} and "learned" in kept
    assert report["config"]["signround"]["steps"] == 20  # non-default options are recorded
    assert report["config"]["signround"]["target"] == "block"  # the default target
    code = (
        "import sys, torch, moequant, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r}, dtype=torch.bfloat16)\n"
        "ids = torch.arange(1, 33)[None]\n"
        "out = m(ids).logits.float()\n"
        "assert torch.isfinite(out).all()\n"
        "print(float(out.std()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) > 0.1  # real logits, not zeros


def _routed_sum_error(arch, w, act, batches, gu, dn, drift) -> float:
    """sum over tokens of || sum_{e routed t} w_te (f_q,e(x_t) - f_e(x_t)) - drift_t ||^2, computed per token."""
    total = 0.0
    for (x, idx, wt), d in zip(batches, drift, strict=True):
        err = -d.clone()  # [T, H]
        for e in range(w.num_experts):
            rows, pos = torch.where(idx == e)
            xe = x[rows]
            f = apply_activation(arch.activation, xe @ w.gate_up[e].T, act) @ w.down[e].T
            Gq, Dq = gu[e].dequantize(torch.float32), dn[e].dequantize(torch.float32)
            fq = apply_activation(arch.activation, xe @ Gq.T, act) @ Dq.T
            err[rows] += wt[rows, pos][:, None] * (fq - f)
        total += float((err**2).sum())
    return total


@pytest.mark.parametrize("drifting", [False, True])
def test_block_target_learns_the_routed_sum_against_the_drift(block, drifting):
    """SignRoundTarget.BLOCK: the chunk's routed sum learns to reproduce the layer's drift (here zero, or the
    drift other weights would cause), measured per token from scratch; it never ends worse than its start."""
    arch, w, act, batches = block
    spec = QuantSpec(Method.SIGNROUND, 2, 128)
    config = QuantizeConfig(
        progress=False,
        signround=SignRoundOptions(steps=60, batch_tokens=64, target=SignRoundTarget.BLOCK),
    )
    opts = HandlerOptions(GPTQOptions(), torch.float32)
    gu0, _ = quantize_stack(w.gate_up, None, QuantSpec(Method.RTN, 2, 128), opts)
    dn0, _ = quantize_stack(w.down, None, QuantSpec(Method.RTN, 2, 128), opts)
    drift = []
    gen = torch.Generator().manual_seed(3)
    for x, idx, wt in batches:
        d = torch.zeros_like(x)  # [T, H]
        if drifting:  # what experts at W + noise would add to the routed sum
            for e in range(w.num_experts):
                rows, pos = torch.where(idx == e)
                G = w.gate_up[e] + 0.02 * torch.randn(w.gate_up[e].shape, generator=gen)
                f = apply_activation(arch.activation, x[rows] @ w.gate_up[e].T, act) @ w.down[e].T
                f2 = apply_activation(arch.activation, x[rows] @ G.T, act) @ w.down[e].T
                d[rows] += wt[rows, pos][:, None] * (f2 - f)
        drift.append(d)
    part = list(range(w.num_experts))
    gu, dn, won = signround_chunk(
        arch, w, part, (spec, spec), (gu0, dn0), (True, True), batches, config, act, seed=0, drift=drift
    )
    before = _routed_sum_error(arch, w, act, batches, gu0, dn0, drift)
    after = _routed_sum_error(arch, w, act, batches, gu, dn, drift)
    assert after < 0.8 * before, (after, before)
    assert any(won)
    with pytest.raises(ValueError, match="drift"):
        signround_chunk(arch, w, part, (spec, spec), (gu0, dn0), (True, True), batches, config, act, seed=0)


def test_a_resumed_block_target_run_writes_the_uninterrupted_bytes(tmp_path, monkeypatch):
    """The block target reads the unquantized model's stream: a run stopped after layer 0 and resumed rebuilds
    that stream at layer 1 (not the quantized one's), so it writes the bytes of an uninterrupted run."""
    from helpers import fail_shard_write, random_calib
    from safetensors.torch import load_file

    from moequant import api
    from moequant.arch.tiny import tiny_model

    data = random_calib(n=16)
    plan = api.make_uniform_plan(tiny_model("mixtral", seed=3), QuantSpec(Method.SIGNROUND, 2, 32))
    cfg = QuantizeConfig(
        progress=False, batch_size=4, min_tokens=4, signround=SignRoundOptions(steps=10, batch_tokens=32)
    )
    restore = fail_shard_write(monkeypatch, "model-layer-00001.safetensors")
    with pytest.raises(OSError, match="No space left"):
        api.quantize(tiny_model("mixtral", seed=3), plan, data, tmp_path / "r", cfg, save_dtype=torch.float32)
    restore()
    api.quantize(tiny_model("mixtral", seed=3), plan, data, tmp_path / "r", cfg, save_dtype=torch.float32,
                 resume=True)  # fmt: skip
    api.quantize(tiny_model("mixtral", seed=3), plan, data, tmp_path / "c", cfg, save_dtype=torch.float32)
    names = sorted(p.name for p in (tmp_path / "c").glob("model-layer-*.safetensors"))
    assert len(names) >= 2
    for name in names:
        a, b = load_file(tmp_path / "r" / name), load_file(tmp_path / "c" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
