"""`moequant eval` on a 3-bit bundled-model checkpoint (offline, --limit), drift metrics, offline lm-eval tasks."""

import json
import math
import re
import socket

import pytest
import torch
import yaml

import moequant  # noqa: F401
from moequant.calibration.corpus import DOMAINS, load_documents, load_split
from moequant.calibration.data import CalibData
from moequant.checkpoint.loading import load_model, load_tokenizer
from moequant.cli.main import main
from moequant.evals.drift import measure_drift
from moequant.evals.lm_eval_tasks import CONT_CHOICES, CONT_WORDS, PPL_TASKS, continuation_items, materialize
from moequant.evals.sensitivity import ProbeConfig, choose_probes


@pytest.fixture
def no_network(monkeypatch):
    """Any connection to a non-loopback address fails the test (records the attempt)."""
    attempts = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
            return real(self, address)
        attempts.append(address)
        raise OSError(f"network access attempted in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def q3(tmp_path_factory, cache, tok):
    """The bundled model at 3 bits (budget planner + GPTQ), calibrated on 6 x 128 tokens of every domain."""
    from moequant import api
    from moequant.calibration.corpus import load_split
    from moequant.config import QuantizeConfig
    from moequant.plan.config import Budget, PlanConfig

    windows = []
    for text in load_split("train").values():
        ids = tok(text[:5_000], add_special_tokens=False)["input_ids"]
        windows.append(torch.tensor(ids[:128]))
    data = CalibData(torch.stack(windows), ["train"] * len(windows), "6 x 128 tokens, one window per domain")
    plan, prof = api.make_plan_for(None, data, PlanConfig(Budget(bits=3.0)), progress=False)
    out = tmp_path_factory.mktemp("eval") / "tiny-moe-3b"
    api.quantize(None, plan, data, out, QuantizeConfig(progress=False), tokenizer=tok, profile_result=prof)
    return out


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def calib(tok):
    """2 x 64 tokens of validation text (tokenizing a few documents, not the whole corpus)."""
    text = "\n\n".join(load_documents("validation", "english")[:20])
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:128]).view(2, 64)  # [2, 64]
    return CalibData(ids, ["english"] * 2, "2 x 64 tokens of english validation text")


@pytest.fixture(scope="module")
def test_ids(tok):
    """{domain: token ids of the whole test split} (what the perplexity windows are cut from)."""
    return {
        d: torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for d, t in load_split("test").items()
    }


# ---- independent references: computed here from a model's logits, not by the code under test ------------


@torch.no_grad()
def reference_ppl(model, test_ids, seq_len: int, windows: int) -> dict[str, float]:
    """exp(mean next-token NLL) over the first `windows` non-overlapping seq_len windows of each domain's
    test split, and over all of them pooled ("overall")."""
    out, total, n = {}, 0.0, 0
    for domain, ids in test_ids.items():
        x = ids[: windows * seq_len].view(windows, seq_len)  # [W, L]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [W, L, V]
        nll = float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"
            )
        )
        out[domain] = math.exp(nll / x[:, 1:].numel())
        total, n = total + nll, n + x[:, 1:].numel()
    out["overall"] = math.exp(total / n)
    return out


@torch.no_grad()
def reference_cont(model, tok, limit: int) -> dict[str, float]:
    """acc and acc_norm of the offline moequant_cont task over its first `limit` documents, by lm-eval's rule:
    the choice with the largest summed log-probability of its tokens after the context (acc_norm: per
    character of the choice) is the answer."""
    from moequant.evals.lm_eval_tasks import materialize

    docs = [json.loads(line) for line in (materialize() / "cont.jsonl").read_text().splitlines()[:limit]]
    acc = acc_norm = 0
    for doc in docs:
        ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
        seqs = [tok(doc["context"] + c, add_special_tokens=False)["input_ids"] for c in doc["choices"]]
        assert all(s[: len(ctx)] == ctx and len(s) > len(ctx) for s in seqs)
        width = max(map(len, seqs))
        x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # [C, T], right-padded (causal)
        logp = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1)  # [C, T, V]
        ll = [
            float(logp[i, len(ctx) - 1 : len(s) - 1].gather(-1, x[i, len(ctx) : len(s), None]).sum())
            for i, s in enumerate(seqs)
        ]
        acc += max(range(len(ll)), key=lambda i: ll[i]) == doc["label"]
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(doc["choices"][i])) == doc["label"]
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


@torch.no_grad()
def reference_bits_per_byte(model, tok, domain: str) -> float:
    """bits_per_byte of the first document of moequant_ppl_<domain>: every token scored after the BOS token
    (one window: the document is shorter than the model's context), NLL in bits over the UTF-8 bytes."""
    from moequant.evals.lm_eval_tasks import materialize

    text = json.loads((materialize() / f"ppl_{domain}.jsonl").read_text().splitlines()[0])["text"]
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) <= model.config.max_position_embeddings
    x = torch.tensor([ids])  # [1, T]
    logp = model(input_ids=x[:, :-1], use_cache=False).logits.float().log_softmax(-1)  # [1, T-1, V]
    nll = -float(logp[0].gather(-1, x[0, 1:, None]).sum())
    return nll / math.log(2) / len(text.encode())


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


# ---- offline lm-eval tasks ------------------------------------------------------------------------------


def test_tasks_render_with_absolute_local_data(cache, tmp_path):
    folder = materialize(tmp_path)
    assert materialize(tmp_path) == folder  # cached by content hash
    for task in (*PPL_TASKS, "moequant_cont"):
        cfg = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert cfg["task"] == task and cfg["dataset_path"] == "json"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith(str(folder)) and (folder / data.rsplit("/", 1)[1]).is_file()
    rows = [json.loads(line) for line in (folder / "cont.jsonl").read_text().splitlines()]
    assert len(rows) == 100 * len(DOMAINS)
    # interleaved: --limit sees every domain
    assert [r["domain"] for r in rows[: len(DOMAINS)]] == list(DOMAINS)


def test_continuation_items_are_deterministic_and_true():
    items = continuation_items("english", n_items=20)
    assert items == continuation_items("english", n_items=20)
    text = "\n\n".join(load_documents("test", "english"))
    for it in items:
        assert len(it["choices"]) == CONT_CHOICES and len(set(it["choices"])) == CONT_CHOICES
        assert all(len(c.split()) == CONT_WORDS and c[0].isspace() for c in it["choices"])
        assert it["context"] + it["choices"][it["label"]] in text  # the labelled choice is the real one
    assert len({it["label"] for it in items}) > 1


# ---- drift ----------------------------------------------------------------------------------------------


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


def test_integrity_check_catches_misread_experts(q3, tmp_path):
    """Swap the stored codes of two same-width experts: the folder still loads, the check flags both."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moequant.evals.integrity import check

    bad = tmp_path / "swapped"
    shutil.copytree(q3, bad)
    rep = json.loads((bad / "quant_report.json").read_text())
    rows = [r for r in rep["experts"] if r["layer"] == 0]
    a, b = next(
        (x, y) for x in rows for y in rows if x["expert"] < y["expert"] and x["planned"] == y["planned"]
    )
    shard = bad / "model-layer-00000.safetensors"
    t = load_file(shard)
    pa, pb = (f"model.layers.0.mlp.experts.{r['expert']}.gate_up.qweight" for r in (a, b))
    t[pa], t[pb] = t[pb], t[pa]
    save_file(t, shard, metadata={"format": "pt"})
    res = check(load_model(None), load_model(str(bad)), rep)
    assert res["ok"] is False and res["checked"] == 32
    assert {(m["layer"], m["expert"]) for m in res["mismatches"]} == {(0, a["expert"]), (0, b["expert"])}


def test_probe_choice_is_bounded():
    tokens = {(l, e): 10 * l + e for l in range(4) for e in range(8)}
    probes = choose_probes(tokens, ProbeConfig(experts_per_end=2, layers=2, max_probes=6))
    assert len(probes) == 6
    assert [p.reason for p in probes[:3]] == ["most-routed", "least-routed", "layer"]
    assert probes[0].experts == [7] and probes[0].layer == 3 and probes[1].tokens == 0
    assert {p.layer for p in probes if p.kind == "layer"} == {0, 3}
    assert len(choose_probes(tokens, ProbeConfig(max_probes=2))) == 2


# ---- the command ----------------------------------------------------------------------------------------


def test_eval_command_end_to_end(q3, tok, test_ids, no_network, capsys):
    args = ["eval", str(q3), "--limit", "1", "--samples", "2", "--seq-len", "64", "--probes", "3"]
    assert main([*args, "--probe-windows", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "moequant_cont" in out and "moequant_ppl_english" in out and "routing:" in out
    rep = json.loads((q3 / "eval" / "report.json").read_text())
    assert rep["baseline"] == "bundled" and rep["sizes"]["quantized_bytes"] < rep["sizes"]["baseline_bytes"]
    rows = {(r["task"], r["metric"]): r for r in rep["lm_eval"]["rows"]}
    models = {"baseline": load_model(None), "quantized": load_model(str(q3))}
    # lm-eval's scores of both models (--limit 1: the first document of each task), recomputed from logits
    for name, model in models.items():
        for d in DOMAINS:
            r = rows[(f"moequant_ppl_{d}", "bits_per_byte")]
            assert r["samples"] == 1 and r["lower_is_better"]
            assert r[name] == pytest.approx(reference_bits_per_byte(model, tok, d), rel=1e-5), (name, d)
        cont = reference_cont(model, tok, limit=1)
        assert rows[("moequant_cont", "acc")][name] == cont["acc"], name
        assert rows[("moequant_cont", "acc_norm")][name] == cont["acc_norm"], name
    assert rep["integrity"] == {"checked": 32, "mismatches": [], "ok": True}
    assert len(rep["drift"]["experts"]) == 4 * 8 and len(rep["drift"]["routing"]) == 4
    # token perplexity: --limit 1 window of --seq-len 64 tokens per domain, for both models
    ppl = {name: reference_ppl(model, test_ids, seq_len=64, windows=1) for name, model in models.items()}
    for name in models:
        assert set(rep["perplexity"][name]) == {*DOMAINS, "overall"}
        assert rep["perplexity"][name] == pytest.approx(ppl[name], rel=1e-5), name
    # 3 bits moves 6 x 64 tokens' perplexity by a little, either way (one window is too few to order the two)
    assert ppl["quantized"]["overall"] != ppl["baseline"]["overall"]
    assert ppl["quantized"]["overall"] == pytest.approx(ppl["baseline"]["overall"], rel=0.10)
    sens = rep["sensitivity"]
    assert len(sens["probes"]) == 3 and "at most 3 probes" in sens["cost_bound"]
    # the probes' baseline is the original model on the same windows (--probe-windows 1, --seq-len 64)
    base = sens["baseline_ppl"]
    assert base == pytest.approx(ppl["baseline"]["overall"], rel=1e-5)
    tokens = {(e["layer"], e["expert"]): e["tokens"] for e in rep["drift"]["experts"]}
    most = max(tokens, key=lambda k: (tokens[k], -k[0], -k[1]))
    least = min(tokens, key=lambda k: (tokens[k], -k[0], -k[1]))
    probes = sens["probes"]
    assert [(p["reason"], p["layer"], p["experts"]) for p in probes] == [
        ("most-routed", most[0], [most[1]]),
        ("least-routed", least[0], [least[1]]),
        ("layer", 0, list(range(8))),
    ]
    assert probes[0]["delta"] != 0 and probes[2]["delta"] != 0
    # the least-routed expert gets no calibration token, nor one of these windows (a dead expert of the
    # bundled model): its probe cannot move the perplexity at all
    assert probes[1]["tokens"] == 0 and probes[1]["delta"] == 0.0
    from moequant.arch import get_arch
    from moequant.plan.probe import rtn_swapped

    original = models["baseline"]
    for p in probes:  # each probe: those experts at 2-bit RTN (group size 128) inside the original model
        experts = original.model.layers[p["layer"]].mlp.experts
        with rtn_swapped(get_arch(original), experts, p["experts"], 2, 128):
            probed = reference_ppl(original, test_ids, seq_len=64, windows=1)["overall"]
        assert p["ppl"] == pytest.approx(probed, rel=1e-5), p
        assert p["delta"] == pytest.approx(p["ppl"] - base, rel=1e-9) and p["rel_delta"] == pytest.approx(
            p["delta"] / base, rel=1e-9
        )
    for f in ("report.md", "drift_heatmap.png", "routing_drift.png"):
        assert (q3 / "eval" / f).is_file()
    md = (q3 / "eval" / "report.md").read_text()
    assert "## Routing drift per layer" in md and "## Sensitivity probe" in md and "## lm-eval" in md
    card = (q3 / "README.md").read_text()
    assert "Quality vs the original" in card and "eval/drift_heatmap.png" in card


def test_eval_errors_are_one_line(q3, tmp_path, capsys):
    assert main(["eval", str(q3), "--tasks", "no_such_task_xyz", "--limit", "1", "--probes", "0"]) == 2
    err = capsys.readouterr().err
    assert re.match(r"moequant eval: error: unknown lm-eval task\(s\): no_such_task_xyz", err)
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


# ---- other families -------------------------------------------------------------------------------------


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
