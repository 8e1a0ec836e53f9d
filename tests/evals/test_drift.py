"""Drift of a quantized model from its original: zero for identical models, the routing figures recomputed here
from both models' router logits, for the bundled model at 3 bits (conftest.q3) and other families."""

import pytest
import torch

from moequant.calibration.corpus import load_documents
from moequant.calibration.data import CalibData
from moequant.checkpoint.loading import load_model, load_tokenizer
from moequant.evals.drift import measure_drift
from moequant.evals.sensitivity import ProbeConfig


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def calib(tok):
    """2 x 64 tokens of validation text (tokenizing a few documents, not the whole corpus)."""
    text = "\n\n".join(load_documents("validation", "english")[:20])
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:128]).view(2, 64)  # [2, 64]
    return CalibData(ids, ["english"] * 2, "2 x 64 tokens of english validation text")


def router_logits(model, ids) -> list[torch.Tensor]:
    """[T, E] router logits of every MoE layer on `ids` (forward hooks on the transformers router modules)."""
    routers = [
        m for layer in model.model.layers for m in layer.modules() if type(m).__name__.endswith("Router")
    ]
    got = []
    hooks = [
        r.register_forward_hook(lambda _m, _a, out: got.append(out[0].detach().float())) for r in routers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(got) == len(routers) == len(model.model.layers)
    return got


def reference_routing(original, quantized, ids, top_k: int) -> list[tuple[float, float]]:
    """Per layer (top-k agreement, mean KL(softmax(original) || softmax(quantized))) on one batch."""
    out = []
    for a, b in zip(router_logits(original, ids), router_logits(quantized, ids), strict=True):
        ia, ib = a.topk(top_k, -1).indices, b.topk(top_k, -1).indices  # [T, k]
        agree = (ia[:, :, None] == ib[:, None, :]).any(-1).float().mean().item()
        p, q = a.log_softmax(-1), b.log_softmax(-1)  # [T, E]
        out.append((agree, float((p.exp() * (p - q)).sum(-1).mean())))
    return out


def test_identical_models_have_zero_drift(calib):
    a, b = load_model(None), load_model(None)
    d = measure_drift(a, b, calib, progress=False)
    assert all(
        r.topk_agreement == 1.0 and r.exact_match == 1.0 and r.kl == pytest.approx(0, abs=1e-9)
        for r in d.routing
    )
    assert d.next_token_agreement == 1.0 and d.logits_kl == pytest.approx(0, abs=1e-9)
    routed = [e for e in d.experts if e.tokens]
    assert routed and all(e.rel_error == 0.0 for e in routed)
    assert sum(e.tokens for e in d.experts) == calib.tokens * 2 * len(d.routing)  # top-2, every layer


def test_quantized_model_drifts(q3, calib):
    d = measure_drift(load_model(None), load_model(str(q3)), calib, progress=False)
    routed = [e for e in d.experts if e.tokens]
    assert all(0 < e.rel_error < 1 for e in routed)
    by_width = {}
    for e in routed:
        by_width.setdefault(e.bits, []).append(e.rel_error)
    mean = {b: sum(v) / len(v) for b, v in by_width.items()}
    assert mean[2.0] > mean[4.0]  # fewer bits, larger output error
    assert d.routing[0].topk_agreement == 1.0  # nothing upstream of the first router is quantized
    assert any(r.topk_agreement < 1.0 and r.kl > 0 for r in d.routing[1:])  # upstream error reaches routers
    assert d.logits_kl > 0 and d.next_token_agreement < 1
    # the calibration is one batch: the same numbers from the router logits of both models, computed here
    ref = reference_routing(load_model(None), load_model(str(q3)), calib.input_ids, top_k=2)
    assert [r.tokens for r in d.routing] == [calib.tokens] * 4
    for r, (agree, kl) in zip(d.routing, ref, strict=True):
        assert r.topk_agreement == pytest.approx(agree, abs=1e-12) and r.kl == pytest.approx(
            kl, rel=1e-4, abs=1e-9
        )


@pytest.mark.parametrize("model_type", ["gpt_oss"])  # transposed, interleaved, biased experts; own routing
def test_drift_and_probes_across_families(model_type, tmp_path):
    from moequant import api
    from moequant.arch.tiny import byte_tokenizer, tiny_model
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.evals.sensitivity import run_probes

    data = CalibData(
        torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 2, "ids"
    )
    original, quant = tiny_model(model_type, seed=3), tiny_model(model_type, seed=3)
    plan = api.make_uniform_plan(quant, QuantSpec(Method.RTN, 2, 32))
    api.quantize(quant, plan, data, tmp_path / "q", QuantizeConfig(progress=False), save_dtype=torch.float32)
    same = measure_drift(original, tiny_model(model_type, seed=3), data, progress=False)  # an identical copy
    assert all(r.topk_agreement == 1.0 and r.kl == pytest.approx(0, abs=1e-9) for r in same.routing)
    d = measure_drift(original, quant, data, progress=False)
    assert len(d.routing) == 2 and d.routing[0].topk_agreement == 1.0  # nothing quantized before router 0
    assert d.routing[1].topk_agreement < 1.0 and d.routing[1].kl > 0
    # one batch: the same numbers from the router logits of both models, computed here
    ref = reference_routing(original, quant, data.input_ids, top_k=original.config.num_experts_per_tok)
    for r, (agree, kl) in zip(d.routing, ref, strict=True):
        assert r.topk_agreement == pytest.approx(agree, abs=1e-12) and r.kl == pytest.approx(
            kl, rel=1e-4, abs=1e-9
        )
    assert all(0 < e.rel_error < 2 for e in d.experts if e.tokens)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    tokens = {(e.layer, e.expert): e.tokens for e in d.experts}
    res = run_probes(
        original, byte_tokenizer(), tokens, ProbeConfig(max_probes=1, windows=1, seq_len=32, group_size=32)
    )
    assert len(res.probes) == 1
    assert all(
        p.ppl != res.baseline_ppl and p.delta == pytest.approx(p.ppl - res.baseline_ppl) for p in res.probes
    )
    after = original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every probe restored the weights


def test_llama4_router_kl_reads_the_logits():
    """Llama 4's router returns (masked sigmoid scores, logits): the drift's router KL is that of the logits'
    sigmoid distribution (the adapter names the logits' place), not of the scores, which are 0 off the top-k."""
    from moequant.arch import get_arch
    from moequant.arch.tiny import tiny_model

    original, moved = tiny_model("llama4_text", seed=3), tiny_model("llama4_text", seed=3)
    with torch.no_grad():
        moved.model.layers[0].self_attn.o_proj.weight.mul_(1.5)  # router 1 sees other inputs
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    d = measure_drift(original, moved, CalibData(ids, ["x"] * 2, "ids"), batch_size=2, progress=False)
    got = {}
    for name, model in (("a", original), ("b", moved)):
        router = model.model.layers[1].feed_forward.router
        h = router.register_forward_hook(lambda _m, _a, out, n=name: got.__setitem__(n, out))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        h.remove()
    p, q = (got[n][1].float().sigmoid() for n in "ab")  # [T, E] from the logits
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert kl > 1e-4 and d.routing[1].kl == pytest.approx(kl, rel=1e-4)
    assert get_arch(original).router_facts.logits_at == 1
