"""How good could any per-expert plan be? A measured damage table, on the bundled model.

    python -m moequant.evals.bench.plan_oracle [--windows 6] [--budgets 2.5,3.0] [--out evals/results/plan_oracle]

The planner estimates damage(e, b) with a proxy (moequant/plan/damage.py). This script measures it instead, at the cost of
one forward pass per (expert, width), which only a tiny model affords:

1. quantize the model with uniform GPTQ at each width (2, 3, 4, 8 bits; same calibration as `quantize`);
2. damage(e, b) = mean token KL(16-bit || 16-bit model with only expert e replaced by its b-bit GPTQ
   weights), over `--windows` windows per domain of the *validation* split (not calibration, not test);
3. solve the same exact knapsack on the measured table at each budget, quantize that plan, and report its
   test perplexity and test KL next to the proxy planner's plan and the uniform widths. The table also
   gives each plan's summed measured damage, so the additivity assumption behind any per-expert planner
   can be checked against the KL the whole quantized model actually has.

A budget at which even the measured-table plan is predicted (summed damage) and measured (test KL and
perplexity) worse than a uniform width is one no per-expert width choice can reach on this model.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WIDTHS = (2, 3, 4, 8)


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat(
        [
            model(input_ids=ids[b : b + batch], use_cache=False).logits.float().log_softmax(-1)
            for b in range(0, len(ids), batch)
        ]
    )  # [W, L, V]


@torch.no_grad()
def _kl(ref_lp: torch.Tensor, model, ids: torch.Tensor, batch: int = 8) -> float:
    """Mean KL(reference || model) per token, reference given as log-probs [W, L, V]."""
    total = 0.0
    for b in range(0, len(ids), batch):
        p = ref_lp[b : b + batch]  # [B, L, V]
        q = model(input_ids=ids[b : b + batch], use_cache=False).logits.float().log_softmax(-1)  # [B, L, V]
        total += float((p.exp() * (p - q)).sum())
    return total / ids.numel()


def _quantized_experts(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(gate_up [E, 2I, H], down [E, H, I]) float32 per MoE layer] of a written checkpoint, dequantized."""
    from transformers import AutoModelForCausalLM

    from moequant.modules.qexperts import QuantizedExperts

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    for qe in (m for m in model.modules() if isinstance(m, QuantizedExperts)):
        slots = [qe.slot(e) for e in range(qe.num_experts)]
        out.append(
            (
                torch.stack([s.gate_up.dequantize(torch.float32) for s in slots]),  # [E, 2I, H]
                torch.stack([s.down.dequantize(torch.float32) for s in slots]),  # [E, H, I]
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--windows", type=int, default=6, help="validation windows per domain for the damage table"
    )
    ap.add_argument("--budgets", default="2.5,3.0")
    ap.add_argument("--out", default="evals/results/plan_oracle")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import moequant  # noqa: F401
    from moequant import api
    from moequant.arch import ExpertWeights, resolve
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.evals.env_info import run_meta
    from moequant.evals.perplexity import perplexity, split_windows, token_kl
    from moequant.plan.config import Budget, PlanConfig
    from moequant.plan.damage import DamageTable
    from moequant.plan.knapsack import solve

    t_start = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig())
    qcfg = QuantizeConfig(progress=False)
    base = load_model(None).float().eval()
    arch, blocks = resolve(base)
    val = torch.cat(list(split_windows(tok, "validation", 256, args.windows).values()))  # [W, L]
    ref_lp = _logprobs(base, val)  # [W, L, V]
    tmp = Path(tempfile.mkdtemp(prefix="mq-oracle-"))
    rows: list[dict] = []

    def evaluate(name: str, folder: Path, bits: float, predicted: float | None) -> None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        rows.append(
            {
                "config": name,
                "avg_bits": round(bits, 4),
                "summed_damage": None if predicted is None else float(f"{predicted:.4g}"),
                "val_kl": float(f"{_kl(ref_lp, model, val):.4g}"),
                "test_kl": float(f"{token_kl(base, model, tok, split='test'):.4g}"),
                "test_ppl": round(perplexity(model, tok, split="test")["overall"], 3),
            }
        )
        print(rows[-1], flush=True)

    try:
        # 1. uniform GPTQ at every width: the candidate weights of every expert
        cand = {}
        for b in WIDTHS:
            folder = tmp / f"uniform{b}"
            s = api.quantize(
                None,
                api.make_uniform_plan(None, QuantSpec(Method.GPTQ, b, 128)),
                calib,
                folder,
                qcfg,
                tokenizer=tok,
            )
            cand[b] = (_quantized_experts(folder), s.average_bits, folder)

        # 2. measured damage: one expert at a time replaced by its b-bit weights
        keys, table = [], []
        for li, ref in enumerate(blocks):
            canon = arch.expert_weights(ref.experts)
            saved = {n: p.data.clone() for n, p in ref.experts.named_parameters()}
            for e in range(canon.gate_up.shape[0]):
                row = []
                for b in WIDTHS:
                    gu, dn = canon.gate_up.clone(), canon.down.clone()  # [E, 2I, H], [E, H, I]
                    gu[e], dn[e] = cand[b][0][li][0][e], cand[b][0][li][1][e]
                    swapped = ExpertWeights(gu, dn, canon.gate_up_bias, canon.down_bias)
                    params = dict(ref.experts.named_parameters())
                    for n, t in arch.fused_from_canonical(swapped).items():
                        params[n].data.copy_(t)
                    row.append(max(_kl(ref_lp, base, val), 0.0))  # clamp float noise of ~1e-10 below zero
                    for n, t in saved.items():
                        params[n].data.copy_(t)
                table.append([*row, 0.0])  # keep in 16-bit: no damage
                keys.append((ref.layer_idx, e))
        damage = np.array(table)  # [n_experts, len(WIDTHS) + 1]

        # 3. uniform rows, then proxy and measured-table plans at each budget
        H, inter = base.config.hidden_size, base.config.intermediate_size
        widths_cfg = (*WIDTHS, 16)
        for j, b in enumerate(WIDTHS):
            evaluate(f"uniform GPTQ {b}-bit", cand[b][2], cand[b][1], damage[:, j].sum())
        for B in [float(x) for x in args.budgets.split(",")]:
            cfg = PlanConfig(budget=Budget(bits=B), widths=widths_cfg)
            proxy, prof = api.make_plan_for(None, calib, cfg, progress=False)
            col = {w: j for j, w in enumerate(widths_cfg)}
            pred = sum(
                damage[keys.index((i, e)), col[s.bits if s.method is not Method.KEEP else 16]]
                for i, specs in proxy.layers.items()
                for e, s in enumerate(specs)
            )
            folder = tmp / f"proxy{B}"
            s = api.quantize(None, proxy, calib, folder, qcfg, tokenizer=tok, profile_result=prof)
            evaluate(f"proxy plan {B} {s.histogram}", folder, s.average_bits, pred)
            oracle = solve(DamageTable(arch.model_type, keys, damage, cfg, H, inter, 0), cfg.budget)
            folder = tmp / f"oracle{B}"
            s = api.quantize(None, oracle, calib, folder, qcfg, tokenizer=tok)
            evaluate(
                f"measured-table plan {B} {s.histogram}", folder, s.average_bits, oracle.estimate["damage"]
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = run_meta("moequant.evals.bench.plan_oracle", args) | {
        "damage_table": f"token KL on {len(val)} validation windows of 256 tokens, one expert swapped at a time",
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(
        json.dumps(
            {"meta": meta, "rows": rows, "keys": keys, "widths": widths_cfg, "damage": damage.tolist()},
            indent=1,
        )
    )
    lines = ["# Measured per-expert damage vs the planner's proxy (bundled model)\n"]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [
        "| config | avg bits | summed measured damage | validation KL | test KL | test perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['avg_bits']:.3f} | {r['summed_damage']:.3g} | {r['val_kl']:.3g} | "
            f"{r['test_kl']:.3g} | {r['test_ppl']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
