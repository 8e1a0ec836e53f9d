"""Forward throughput (tokens/s) of a loaded model: a plain prefill measurement, labelled by the path it ran.

On CPU the quantized experts run the torch reference (dequantize, then matmul): the number is a reference
point for comparing checkpoints on the same machine, not a serving speed.
"""

from __future__ import annotations

import statistics
import time

import torch


def backend_label(model) -> str:
    """Where the experts ran: "cpu, moequant torch reference" / "cuda (H100), moequant triton" / ...
    (an unquantized model runs transformers' own experts implementation)."""
    from moequant.modules.qexperts import QuantizedExperts

    device = next(model.parameters()).device
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    q = next((m for m in model.modules() if isinstance(m, QuantizedExperts)), None)
    if q is None:
        impl = getattr(model.config, "_experts_implementation", None) or "default"
        return f"{where}, transformers experts ({impl})"
    return f"{where}, moequant {q.backend(device).value} path"


@torch.no_grad()
def tokens_per_second(
    model, batch: int = 4, seq_len: int = 256, repeats: int = 3, vocab: int | None = None, seed: int = 0
) -> float:
    """Median tokens/s of `repeats` forward passes over a [batch, seq_len] block of random token ids."""
    device = next(model.parameters()).device
    vocab = vocab or int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)  # [B, L]
    model(input_ids=ids, use_cache=False)  # warm-up: first calls per shape pay for lazy init / kernel setup
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(ids.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)
