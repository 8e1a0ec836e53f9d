"""Helpers several test files share (put on sys.path by pytest with tests/conftest.py; a child process
started by a test adds this folder itself)."""

from moequant.modules.qexperts import QuantizedExperts

# the families the arch tests run on: the six moequant once wrote adapters for, plus families that exercise the
# other layouts and activations (Aria: transposed, concatenated; Gemma 4: experts directly in the decoder layer
# and its own gate function; MiniMax-M3: GPT-OSS SwiGLU on concatenated experts; Jamba)
ARCH_FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
    "aria_text", "gemma4", "minimax_m3_vl_text", "jamba", "qwen3_5_moe",
]  # fmt: skip


def set_kernel(model, kernel: str | None) -> int:
    """Force every QuantizedExperts of `model` onto "triton" or "reference" (None: automatic). Returns the count."""
    if kernel not in (None, "triton", "reference"):
        raise ValueError(f"kernel must be 'triton', 'reference' or None, got {kernel!r}")
    mods = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for m in mods:
        m.kernel = kernel
    return len(mods)


def tiny_llama(vocab_size: int = 64):
    """A tiny dense (no Mixture-of-Experts) Llama with random weights: what moequant refuses."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(cfg)


def random_calib(
    n: int = 8, seq: int = 32, seed: int = 0, vocab: int = 256, sources: tuple[str, ...] = ("x",)
):
    """Random token ids [n, seq] as calibration data, window i labelled sources[i % len(sources)]."""
    import torch

    from moequant.calibration.data import CalibData

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return CalibData(ids, [sources[i % len(sources)] for i in range(n)], "random ids")


def planned(model, bits: float = 3.0, **kw):
    """(plan, profile, plan config) of `model` at `bits` through the planner's own entry point, on
    random_calib() profiled in batches of 4, group size 32 (without the layer probe, which these tests do not
    measure)."""
    from moequant import api
    from moequant.calibration.profiler import ProfileConfig
    from moequant.plan.config import Budget, PlanConfig

    prof = api.profile(model, random_calib(), ProfileConfig(batch_size=4, progress=False))
    cfg = PlanConfig(budget=Budget(bits=bits), group_size=32, layer_probe=False, **kw)
    return api.plan(model, prof, cfg, random_calib()), prof, cfg


def reference_cont(model, tok, limit: int) -> dict[str, float]:
    """acc and acc_norm of the offline moequant_cont task over its first `limit` documents, by lm-eval's rule,
    computed here from the logits: the choice with the largest summed log-probability of its tokens after the
    context (acc_norm: per character of the choice) is the answer."""
    import json

    from moequant.evals.lm_eval_tasks import materialize

    docs = [json.loads(line) for line in (materialize() / "cont.jsonl").read_text().splitlines()[:limit]]
    acc = acc_norm = 0
    for doc in docs:
        ll = _choice_loglikelihoods(model, tok, doc)
        acc += max(range(len(ll)), key=lambda i: ll[i]) == doc["label"]
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(doc["choices"][i])) == doc["label"]
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


def _choice_loglikelihoods(model, tok, doc: dict) -> list[float]:
    """The summed log-probability of each choice's tokens after the document's context."""
    import torch

    ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
    seqs = [tok(doc["context"] + c, add_special_tokens=False)["input_ids"] for c in doc["choices"]]
    assert all(s[: len(ctx)] == ctx and len(s) > len(ctx) for s in seqs)
    width = max(map(len, seqs))
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # [C, T], right-padded (causal)
    with torch.no_grad():
        logp = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1)  # [C, T, V]
    return [
        float(logp[i, len(ctx) - 1 : len(s) - 1].gather(-1, x[i, len(ctx) : len(s), None]).sum())
        for i, s in enumerate(seqs)
    ]


def corpus_test_ids(tok) -> dict:
    """{domain: token ids [N] of the bundled corpus's whole test split} (what perplexity windows are cut from)."""
    import torch

    from moequant.calibration.corpus import load_split

    return {
        d: torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for d, t in load_split("test").items()
    }


def reference_ppl(model, test_ids: dict, seq_len: int, windows: int) -> dict[str, float]:
    """exp(mean next-token NLL) over the first `windows` non-overlapping seq_len windows of each domain's
    test ids (corpus_test_ids), and over all of them pooled ("overall"), computed here from the logits."""
    import math

    import torch

    out, total, n = {}, 0.0, 0
    with torch.no_grad():
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


def random_codes(*shape: int, bits: int, seed: int = 0):
    """Random `bits`-wide codes of `shape`, uint8."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)


def direct_dequant(codes, scales, zeros, bits: int, group_size: int, g_idx):
    """W[n, k] = (code[k, n] - zero[g(k), n]) * scale[g(k), n], element by element (codes [K, N], scales and
    zeros [G, N]; zeros None: symmetric, zero 2^(bits-1))."""
    import torch

    k_dim, n_dim = codes.shape
    out = torch.empty(n_dim, k_dim)
    for k in range(k_dim):
        g = int(g_idx[k]) if g_idx is not None else k // group_size
        for n in range(n_dim):
            z = (1 << (bits - 1)) if zeros is None else int(zeros[g, n])
            out[n, k] = (float(codes[k, n]) - z) * float(scales[g, n])
    return out


def layer_output(model, layer, ids):
    """What `layer` (a module of `model`) returns when `model` runs on input_ids `ids` (the hidden states when
    the layer returns a tuple)."""
    import torch

    got = {}

    def hook(_m, _inp, out) -> None:  # returns None: the layer's output goes on unchanged
        got["h"] = out[0] if isinstance(out, tuple) else out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return got["h"]


def fail_shard_write(monkeypatch, shard: str):
    """Make CheckpointWriter.write_shard raise a disk-full OSError when it writes `shard` (a run stopped after
    the layers before it); returns a function that restores the real write."""
    from moequant.checkpoint.writer import CheckpointWriter

    real = CheckpointWriter.write_shard

    def failing(self, name, tensors):
        if name == shard:
            raise OSError("No space left on device (injected)")
        return real(self, name, tensors)

    monkeypatch.setattr(CheckpointWriter, "write_shard", failing)
    return lambda: monkeypatch.setattr(CheckpointWriter, "write_shard", real)


def noise_router(monkeypatch) -> None:
    """Mixtral's router returns noise over one class more than the experts in place of its logits (the weights
    and choices it hands the experts unchanged): a router with no logits that give its experts their weights.
    Adapters are derived afresh (the cached mixtral one forgotten) while the patch holds."""
    import torch
    from transformers.models.mixtral import modeling_mixtral as m

    from moequant.arch.lookup import forget_adapters

    forward = m.MixtralTopKRouter.forward

    def no_logits(self, hidden_states):
        logits, weights, index = forward(self, hidden_states)
        return torch.randn(logits.shape[0], logits.shape[1] + 1), weights, index  # [T, E + 1]

    monkeypatch.setattr(m.MixtralTopKRouter, "forward", no_logits)
    forget_adapters()
