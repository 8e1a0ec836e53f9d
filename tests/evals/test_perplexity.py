"""Token perplexity and KL over corpus windows, against the same sums computed here from the logits."""

import math

import torch

from moequant.arch.tiny import byte_tokenizer, tiny_model
from moequant.calibration.corpus import load_split
from moequant.evals.perplexity import perplexity, split_windows, token_kl

DOMAINS = ("english", "code")


def _windows(tok, seq_len, n):
    out = {}
    for domain, text in load_split("test", DOMAINS).items():
        ids = tok(text, add_special_tokens=False)["input_ids"][: n * seq_len]
        out[domain] = torch.tensor(ids).view(n, seq_len)
    return out


@torch.no_grad()
def _nll(model, x) -> float:
    logp = model(input_ids=x).logits.float().log_softmax(-1)  # [W, L, V]
    return -float(logp[:, :-1].gather(-1, x[:, 1:, None]).sum())


def test_windows_and_perplexity_per_domain_and_pooled():
    tok, model = byte_tokenizer(), tiny_model("mixtral", seed=1)
    windows = split_windows(tok, "test", seq_len=32, max_windows=3, domains=DOMAINS)
    want = _windows(tok, 32, 3)
    assert list(windows) == list(DOMAINS) and all(torch.equal(windows[d], want[d]) for d in DOMAINS)
    got = perplexity(model, tok, "test", seq_len=32, max_windows=3, batch_size=2, domains=DOMAINS)
    nll = {d: _nll(model, want[d]) for d in DOMAINS}
    n = 3 * 31  # predicted tokens per domain
    assert set(got) == {*DOMAINS, "overall"}
    for d in DOMAINS:
        assert math.isclose(got[d], math.exp(nll[d] / n), rel_tol=1e-5)
    assert math.isclose(got["overall"], math.exp(sum(nll.values()) / (2 * n)), rel_tol=1e-5)


def test_token_kl_is_zero_against_itself_and_the_mean_kl_otherwise(monkeypatch):
    import moequant.evals.perplexity as ppl

    tok, a, b = byte_tokenizer(), tiny_model("mixtral", seed=1), tiny_model("mixtral", seed=2)
    monkeypatch.setattr(ppl, "split_windows", lambda *args: _windows(tok, 16, 2))
    assert token_kl(a, a, tok, seq_len=16, max_windows=2) == 0.0
    total, count = 0.0, 0
    with torch.no_grad():
        for x in _windows(tok, 16, 2).values():
            p, q = a(input_ids=x).logits.log_softmax(-1), b(input_ids=x).logits.log_softmax(-1)
            total, count = total + float((p.exp() * (p - q)).sum()), count + x.numel()
    assert math.isclose(
        token_kl(a, b, tok, seq_len=16, max_windows=2, batch_size=1), total / count, rel_tol=1e-5
    )
