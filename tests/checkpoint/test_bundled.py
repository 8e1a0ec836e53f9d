"""The bundled tiny MoE: loads offline with plain transformers, is a trained 8-expert top-2 MoE."""

import json
import math
import os

import pytest
import torch

from moequant.calibration.corpus import DOMAINS, load_split
from moequant.checkpoint.bundled import BUNDLED_MODEL_ID, bundled_model_path, is_bundled

SEQ_LEN = 256
N_WINDOWS = 4  # per domain, from the start of each validation split
MAX_BYTES = 8_000_000


def resolve_model_id(name_or_path: str | os.PathLike | None) -> str:
    """A name or path as given, with the bundled aliases replaced by the bundled folder's path."""
    return str(bundled_model_path()) if is_bundled(name_or_path) else os.fspath(name_or_path)


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tokenizer(offline):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="module")
def model(offline):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def report():
    return json.loads((bundled_model_path() / "training_report.json").read_text())


@pytest.fixture(scope="module")
def windows(tokenizer):
    out = {}
    for domain, text in load_split("validation").items():
        ids = tokenizer(text[:200_000], add_special_tokens=False, verbose=False)["input_ids"]
        n = min(N_WINDOWS, len(ids) // SEQ_LEN)
        out[domain] = torch.tensor(ids[: n * SEQ_LEN]).view(n, SEQ_LEN)
    return out


@torch.no_grad()
def _ppl(model, windows) -> dict[str, float]:
    out, tot_nll, tot_n = {}, 0.0, 0
    for domain, x in windows.items():
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        out[domain] = math.exp(float(nll) / x[:, 1:].numel())
        tot_nll, tot_n = tot_nll + float(nll), tot_n + x[:, 1:].numel()
    out["overall"] = math.exp(tot_nll / tot_n)
    return out


def test_bundled_names():
    assert BUNDLED_MODEL_ID == "moequant/tiny-moe"
    for name in (
        None,
        "bundled",
        "tiny-moe",
        BUNDLED_MODEL_ID,
        str(bundled_model_path()),
        bundled_model_path(),
    ):
        assert is_bundled(name), name
    for name in ("mistralai/Mixtral-8x7B-v0.1", "tiny", "/tmp", ""):
        assert not is_bundled(name), name
    assert resolve_model_id("bundled") == str(bundled_model_path())
    assert resolve_model_id("org/other") == "org/other"


def test_files_and_size():
    folder = bundled_model_path()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_report.json",
        "README.md",
    ):
        assert (folder / name).is_file(), name
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


def test_is_an_eight_expert_top2_moe(model):
    from moequant.arch import moe_blocks

    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers == 4
    blocks = moe_blocks(model)
    assert len(blocks) == 4
    assert all(b.num_experts == 8 and b.top_k == 2 for b in blocks)
    assert next(model.parameters()).dtype == torch.float32  # bf16 on disk, upcast on request


def test_tokenizer_round_trips_every_domain(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    for domain, text in load_split("test").items():
        sample = text[:3000]
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == sample, domain
        assert len(ids) < len(sample.encode()) / 2, domain  # BPE compresses every domain
    odd = "naïve café — ∑ 🙂 \t tabs\n  indent"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_trained_perplexity_far_below_random_init(model, windows, report):
    from transformers import AutoModelForCausalLM

    vocab = model.config.vocab_size
    trained = _ppl(model, windows)
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    random = _ppl(random_model, windows)
    for domain in [*DOMAINS, "overall"]:
        assert trained[domain] < 0.5 * vocab, (domain, trained[domain])
        assert trained[domain] < random[domain] / 20, (domain, trained[domain], random[domain])
    assert random["overall"] > 0.5 * vocab  # the threshold is one an untrained model fails
    # the slice is representative of the full validation numbers in the report
    reported = report["val_perplexity_bf16"]["overall"]
    assert 0.5 * reported < trained["overall"] < 2 * reported


def test_routing_differs_between_domains_more_than_within_one(model, tokenizer):
    """Measured with the profiler on validation text: 4 windows of 128 tokens from the start of each half of
    every domain, labelled "<domain>-a" / "<domain>-b". Per MoE layer, the expert-load distributions of two
    domains differ (Jensen-Shannon) by far more than those of the two halves of one domain: the experts
    specialise by domain. (Shuffled labels give ratios near 1; this model gives 8-16.)"""
    import itertools

    from moequant import api
    from moequant.calibration.data import CalibData
    from moequant.calibration.profiler import ProfileConfig
    from moequant.calibration.stats import js_divergence

    n, length = 4, 128
    by_label = {}
    for domain, text in load_split("validation").items():
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        for part, start in (("a", 0), ("b", ids.numel() // 2)):
            by_label[f"{domain}-{part}"] = [
                ids[start + k * length : start + (k + 1) * length] for k in range(n)
            ]
    # interleaved: every batch of the profiler mixes labels of several domains
    windows = [w[k] for k in range(n) for w in by_label.values()]
    labels = [label for _ in range(n) for label in by_label]
    data = CalibData(torch.stack(windows), labels, f"{n} x {length} tokens from each half of every domain")
    prof = api.profile(None, data, ProfileConfig(progress=False))
    assert sorted(prof.layers) == [0, 1, 2, 3]
    # the per-label counts are the routers' choices on those windows: recounted from the top-2 indices the
    # transformers routers return when the model runs them all in one batch
    chosen = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out, i=i: chosen.__setitem__(i, out[2]))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=data.input_ids)
    finally:
        for h in hooks:
            h.remove()
    for layer, stats in prof.layers.items():
        counts = stats.by_source
        assert set(counts) == set(by_label)
        idx = chosen[layer].view(len(labels), length, 2)  # [N, L, top-2]
        for label in by_label:
            rows = [r for r, x in enumerate(labels) if x == label]
            recount = torch.bincount(idx[rows].flatten(), minlength=8)  # [E]
            assert torch.equal(counts[label], recount), (layer, label)
        between = [
            js_divergence(counts[f"{a}-a"], counts[f"{b}-a"]) for a, b in itertools.combinations(DOMAINS, 2)
        ]
        within = [js_divergence(counts[f"{d}-a"], counts[f"{d}-b"]) for d in DOMAINS]
        assert sum(between) / len(between) > 4 * sum(within) / len(within), (layer, between, within)


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["english", "german"])  # two full domains keep CI time down
def test_full_validation_perplexity_matches_report(model, tokenizer, report, domain):
    """The saved bf16 weights reproduce the reported validation perplexity (fp32 compute)."""
    text = load_split("validation", domain)[domain]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    n = len(ids) // SEQ_LEN
    x = ids[: n * SEQ_LEN].view(n, SEQ_LEN)
    nll = 0.0
    with torch.no_grad():
        for i in range(0, n, 16):
            logits = model(input_ids=x[i : i + 16]).logits.float()
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    x[i : i + 16, 1:].reshape(-1),
                    reduction="sum",
                )
            )
    assert n * (SEQ_LEN - 1) == report["val_tokens_scored"][domain]
    assert math.exp(nll / (n * (SEQ_LEN - 1))) == pytest.approx(
        report["val_perplexity_bf16"][domain], rel=1e-3
    )
