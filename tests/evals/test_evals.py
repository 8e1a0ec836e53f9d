"""`moequant eval` on a 3-bit bundled-model checkpoint (offline, --limit), drift metrics, offline lm-eval tasks."""

import json
import re
import socket

import pytest
import torch
import yaml

import moequant  # noqa: F401
from moequant.calibration.corpus import DOMAINS, load_documents
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


def test_eval_command_end_to_end(q3, no_network, capsys):
    args = ["eval", str(q3), "--limit", "1", "--samples", "2", "--seq-len", "64", "--probes", "3"]
    assert main([*args, "--probe-windows", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "moequant_cont" in out and "moequant_ppl_english" in out and "routing:" in out
    rep = json.loads((q3 / "eval" / "report.json").read_text())
    assert rep["baseline"] == "bundled" and rep["sizes"]["quantized_bytes"] < rep["sizes"]["baseline_bytes"]
    rows = {(r["task"], r["metric"]): r for r in rep["lm_eval"]["rows"]}
    for d in DOMAINS:
        r = rows[(f"moequant_ppl_{d}", "bits_per_byte")]
        assert r["samples"] == 1 and r["baseline"] > 0 and r["quantized"] > 0 and r["lower_is_better"]
    assert 0 <= rows[("moequant_cont", "acc")]["quantized"] <= 1
    assert rep["integrity"] == {"checked": 32, "mismatches": [], "ok": True}
    assert len(rep["drift"]["experts"]) == 4 * 8 and len(rep["drift"]["routing"]) == 4
    assert set(rep["perplexity"]["quantized"]) == {*DOMAINS, "overall"}
    sens = rep["sensitivity"]
    assert len(sens["probes"]) == 3 and "at most 3 probes" in sens["cost_bound"]
    assert all(p["ppl"] > 0 for p in sens["probes"])
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
    d = measure_drift(original, quant, data, progress=False)
    assert d.routing and all(0 <= r.topk_agreement <= 1 and r.kl >= 0 for r in d.routing)
    assert all(0 < e.rel_error < 2 for e in d.experts if e.tokens)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    tokens = {(e.layer, e.expert): e.tokens for e in d.experts}
    res = run_probes(
        original, byte_tokenizer(), tokens, ProbeConfig(max_probes=1, windows=1, seq_len=32, group_size=32)
    )
    assert len(res.probes) == 1 and all(p.ppl > 0 and p.delta != 0 for p in res.probes)
    after = original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every probe restored the weights
