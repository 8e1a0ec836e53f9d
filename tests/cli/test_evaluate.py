"""`moequant eval` on a 3-bit bundled-model checkpoint (conftest.q3; offline, --limit): every number of the report
recomputed here from the models' logits, and one-line errors."""

import json
import math
import re
import socket

import pytest
import torch
from helpers import corpus_test_ids, reference_cont, reference_ppl

from moequant.calibration.corpus import DOMAINS
from moequant.checkpoint.loading import load_model, load_tokenizer
from moequant.cli.main import build_parser, main


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


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The offline lm-eval tasks are rendered into a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def test_ids(tok):
    """{domain: token ids of the whole test split} (what the perplexity windows are cut from)."""
    return corpus_test_ids(tok)


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


def test_eval_keeps_its_own_drift_size():
    args = build_parser().parse_args(["eval", "folder"])
    assert (args.samples, args.seq_len) == (16, 256)
