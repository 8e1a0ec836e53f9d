#!/usr/bin/env python
"""How differently a MoE model routes the bundled corpus's domains.

For every MoE layer and domain: the fraction of routed token slots (tokens x top-k) that each expert
receives on the validation split, and the Jensen-Shannon divergence (base 2, in [0, 1]) between the
domains' expert-load distributions. The noise floor is the JSD between the two halves of the same domain.

Usage:
    python tools/routing_by_domain.py                       # the bundled tiny MoE, validation split
    python tools/routing_by_domain.py --model PATH --split test --json out.json

`train_tiny_moe.py` imports `routing_by_domain()` from here for its training report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions (1-D, summing to 1)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def expert_counts(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Routed-slot counts `[layers, experts]` (int64) of `windows` ([n, seq]) through `model`.

    Uses the router logits the model returns with `output_router_logits=True`; the experts chosen are
    the top-k of those logits, as in the model's own softmax-top-k router.
    """
    cfg = model.config
    num_experts = int(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    top_k = int(cfg.num_experts_per_tok)
    counts = None
    for i in range(0, len(windows), batch_size):
        out = model(input_ids=windows[i : i + batch_size], output_router_logits=True)
        layers = [logits.reshape(-1, num_experts) for logits in out.router_logits]  # each [tokens, E]
        if counts is None:
            counts = torch.zeros(len(layers), num_experts, dtype=torch.int64)
        for layer_idx, logits in enumerate(layers):
            chosen = logits.topk(top_k, dim=-1).indices  # [tokens, k]
            counts[layer_idx] += torch.bincount(chosen.flatten(), minlength=num_experts)
    return counts


def routing_by_domain(model, windows_by_domain: dict[str, torch.Tensor], batch_size: int = 8) -> dict:
    """Expert-load fractions per layer and domain, and JSD between domains (see module docstring)."""
    model.eval()
    counts = {d: expert_counts(model, w, batch_size) for d, w in windows_by_domain.items()}
    halves = {}
    for d, w in windows_by_domain.items():
        n = len(w) // 2
        halves[d] = (expert_counts(model, w[:n], batch_size), expert_counts(model, w[n : 2 * n], batch_size))
    domains = list(windows_by_domain)
    num_layers = next(iter(counts.values())).shape[0]
    load = {d: (c.double() / c.sum(dim=-1, keepdim=True)) for d, c in counts.items()}  # [L, E] fractions
    total = sum(counts.values())
    mixture = total.double() / total.sum(dim=-1, keepdim=True)
    layers = []
    for layer in range(num_layers):
        pairs = {
            f"{a}|{b}": js_divergence(load[a][layer], load[b][layer])
            for a, b in itertools.combinations(domains, 2)
        }
        within = {}
        for d, (c1, c2) in halves.items():
            p1 = c1[layer].double() / c1[layer].sum()
            p2 = c2[layer].double() / c2[layer].sum()
            within[d] = js_divergence(p1, p2)
        probs = mixture[layer]
        layers.append(
            {
                "layer": layer,
                "expert_load": {d: [round(float(x), 4) for x in load[d][layer]] for d in domains},
                "jsd_pairwise": {k: round(v, 4) for k, v in pairs.items()},
                "jsd_mean_between_domains": round(sum(pairs.values()) / len(pairs), 4),
                "jsd_domain_vs_mixture": {
                    d: round(js_divergence(load[d][layer], mixture[layer]), 4) for d in domains
                },
                "jsd_mean_within_domain_halves": round(sum(within.values()) / len(within), 4),
                "mixture_load": [round(float(x), 4) for x in probs],
                "mixture_load_entropy_bits": round(
                    float(-(probs[probs > 0] * probs[probs > 0].log2()).sum()), 4
                ),
            }
        )
    return {
        "split_tokens": {d: int(w.numel()) for d, w in windows_by_domain.items()},
        "max_entropy_bits": round(math.log2(mixture.shape[-1]), 4),
        "layers": layers,
    }


def format_table(result: dict) -> str:
    """A plain-text table: per layer, the mean between-domain JSD, the within-domain noise floor, the most
    distinct pair, and each domain's top expert."""
    lines = [
        f"{'layer':>5} {'JSD between':>11} {'JSD within':>10}  most distinct pair            top expert per domain"
    ]
    for row in result["layers"]:
        pair, value = max(row["jsd_pairwise"].items(), key=lambda kv: kv[1])
        tops = " ".join(
            f"{d[:2]}:e{max(range(len(v)), key=v.__getitem__)}({max(v):.2f})"
            for d, v in row["expert_load"].items()
        )
        lines.append(
            f"{row['layer']:>5} {row['jsd_mean_between_domains']:>11.4f} {row['jsd_mean_within_domain_halves']:>10.4f}"
            f"  {pair:<20s} {value:.4f}  {tops}"
        )
    return "\n".join(lines)


def validation_windows(tokenizer, split: str, seq_len: int) -> dict[str, torch.Tensor]:
    """Non-overlapping full windows of `seq_len` tokens of each domain's text (the tail is dropped)."""
    from moequant.calibration.corpus import load_split

    out = {}
    for domain, text in load_split(split).items():
        ids = torch.tensor(
            tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long
        )
        n = len(ids) // seq_len
        out[domain] = ids[: n * seq_len].view(n, seq_len)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "moequant" / "assets" / "tiny-moe"))
    ap.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, help="write the full result here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    result = routing_by_domain(model, validation_windows(tok, args.split, args.seq_len))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
