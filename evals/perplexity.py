"""Token-level perplexity on the bundled corpus: exp(mean NLL) over non-overlapping windows per domain."""

from __future__ import annotations

import math

import torch

from moequant.calibration.corpus import load_split


def split_windows(
    tokenizer, split: str, seq_len: int = 256, max_windows: int | None = None, domains=None
) -> dict[str, torch.Tensor]:
    """{domain: [W, L] token ids}: non-overlapping seq_len windows of one corpus split, at most max_windows
    per domain (the windows every score in this module runs over)."""
    out = {}
    for domain, text in load_split(split, domains).items():
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n_win = ids.numel() // seq_len
        if max_windows is not None:
            n_win = min(n_win, max_windows)
        out[domain] = ids[: n_win * seq_len].view(n_win, seq_len)  # [W, L]
    return out


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    split: str = "test",
    seq_len: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
    domains=None,
) -> dict[str, float]:
    """{domain: ppl, ..., "overall": ppl} (overall pools every scored token of every domain)."""
    device = next(p.device for p in model.parameters())
    out, total_nll, total_n = {}, 0.0, 0
    for domain, windows in split_windows(tokenizer, split, seq_len, max_windows, domains).items():
        nll, n = 0.0, 0
        for b in range(0, windows.shape[0], batch_size):
            x = windows[b : b + batch_size].to(device)  # [B, L]
            logits = model(input_ids=x, use_cache=False).logits.float()  # [B, L, V]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            n += x[:, 1:].numel()
        out[domain] = math.exp(nll / max(n, 1))
        total_nll, total_n = total_nll + nll, total_n + n
    out["overall"] = math.exp(total_nll / max(total_n, 1))
    return out


@torch.no_grad()
def token_kl(
    reference,
    model,
    tokenizer,
    split: str = "test",
    seq_len: int = 256,
    max_windows: int | None = 32,
    batch_size: int = 8,
) -> float:
    """Mean KL(reference || model) of the next-token distributions over the split's windows (nats/token):
    a far finer measure of how much quantization changed the model than perplexity."""
    device = next(p.device for p in model.parameters())
    total, n = 0.0, 0
    for windows in split_windows(tokenizer, split, seq_len, max_windows).values():
        for b in range(0, windows.shape[0], batch_size):
            x = windows[b : b + batch_size].to(device)  # [B, L]
            p = reference(input_ids=x, use_cache=False).logits.float().log_softmax(-1)  # [B, L, V]
            q = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1)  # [B, L, V]
            total += float((p.exp() * (p - q)).sum())
            n += x.numel()
    return total / max(n, 1)
