"""How close the planner's damage estimates come to what GPTQ leaves, and to the model's measured change.

    python -m moequant.evals.bench.damage_check [--out evals/results/damage_check]

On the bundled model, one calibration (bundled corpus train split, 128 x 256 tokens, seed 0), two damage
tables: the proxy (RTN error x diagonal input moments, damage.py) and GPTQ's loss on the real Hessians
(damage_gptq.py), both before the layer probe (per item, as the knapsack first sees them) and after it.

1. Per item (expert projection x width), predicted against measured: quantize uniformly at 2, 3 and 4 bits
   with GPTQ, read each item's GPTQ loss from quant_report.json (the quantize pass's own Hessian: its
   down-projection Hessian reads the quantized gate/up), times the expert's importance: Spearman rank
   correlation with each table's entry, and the spread of log(predicted / measured).
2. Per plan: the predicted total (the table summed over the plan's choices) against the token KL to the
   16-bit model measured on the test split, over uniform and planned checkpoints: Spearman rank correlation.

Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _plan_total(table, plan) -> float:
    """The table summed over the plan's choices (column of each projection's spec)."""
    from moequant.config import proj_specs

    cols = {(s.method, s.bits, s.group_size): c for c, s in enumerate(table.config.columns())}
    total = 0.0
    for r, (i, e) in enumerate(table.keys):
        for p, spec in enumerate(proj_specs(plan.layers[i][e])):
            key = (table.config.method if spec.method.is_integer else spec.method, spec.bits, spec.group_size)
            c = cols.get(key, cols.get((spec.method, spec.bits, table.config.group_size)))
            total += float(table.damage[r, p, c])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="evals/results/damage_check")
    ap.add_argument("--planned", default="2.25,2.5,3.0,3.5")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import moequant  # noqa: F401
    from moequant import api
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.calibration.profiler import ProfileConfig
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.checkpoint.source import open_source
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.evals.env_info import run_meta
    from moequant.evals.perplexity import token_kl
    from moequant.plan import probe
    from moequant.plan.config import Budget, PlanConfig
    from moequant.plan.damage import damage_from_source
    from moequant.plan.damage_gptq import damage_from_gptq
    from moequant.plan.importance import importance
    from moequant.plan.knapsack import solve
    from moequant.quantize.pricing import gptq_pricing

    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig())
    base = load_model(None)
    prof = api.profile(None, calib, ProfileConfig(progress=False))
    cfg = PlanConfig(Budget(bits=3.0), progress=False)
    tables = {
        "proxy": damage_from_source(open_source(None, lazy_experts=True), prof, cfg),
        "gptq": damage_from_gptq(open_source(None), prof, cfg, calib, gptq_pricing()),
    }
    for name in list(tables):  # the same tables after the layer probe (what the knapsack solves)
        tables[name + "+probe"] = probe.calibrate_streamed(
            tables[name], open_source(None, lazy_experts=True), calib
        )
    cols = {s.bits: c for c, s in enumerate(cfg.columns()) if s.group_size == cfg.group_size}
    qcfg = QuantizeConfig(progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="mq-damage-"))
    items, plans = [], []
    try:

        def run(name, plan):
            out = tmp / f"p{len(plans)}"
            api.quantize(None, plan, calib, out, qcfg, tokenizer=tok, profile_result=prof)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            kl = token_kl(base, model, tok, split="test", max_windows=None)
            rep = json.loads((out / "quant_report.json").read_text())["experts"]
            shutil.rmtree(out, ignore_errors=True)
            row = {"plan": name, "avg_bits": round(plan.average_bits(), 4), "measured_kl": kl}
            row |= {f"predicted_{t}": _plan_total(tab, plan) for t, tab in tables.items()}
            plans.append(row)
            print(f"{name:28s} bits {row['avg_bits']:.3f}  KL {kl:.3e}", flush=True)
            return rep

        for b in (2, 3, 4):
            rep = run(f"uniform gptq:{b}", api.make_uniform_plan(None, QuantSpec(Method.GPTQ, b, 128)))
            for r in rep:
                if r["method"] != "gptq":
                    continue  # an RTN fallback has no GPTQ loss
                imp = float(importance(prof, r["layer"], cfg)[r["expert"]])
                row = tables["proxy"].keys.index((r["layer"], r["expert"]))
                for p, proj in enumerate(("gate_up", "down")):
                    measured = imp * r[f"{proj}_gptq_loss"]
                    items.append({"bits": b, "proj": proj, "measured": measured}
                                 | {t: float(tab.damage[row, p, cols[b]]) for t, tab in tables.items()})  # fmt: skip
        for b in [float(x) for x in args.planned.split(",") if x]:
            for t in ("proxy", "gptq"):
                run(f"planned {b} ({t})", solve(tables[t + "+probe"], Budget(bits=b)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    item_stats = []
    for t in tables:
        for b in (2, 3, 4, "all"):
            sel = [x for x in items if b == "all" or x["bits"] == b]
            logr = np.array([math.log(x[t] / x["measured"]) for x in sel if x[t] > 0 and x["measured"] > 0])
            item_stats.append({"table": t, "bits": b, "items": len(sel),
                               "spearman": round(_spearman([x[t] for x in sel], [x["measured"] for x in sel]), 3),
                               "log_ratio_mean": round(float(logr.mean()), 3),
                               "log_ratio_std": round(float(logr.std()), 3)})  # fmt: skip
    plan_stats = {t: round(_spearman([p[f"predicted_{t}"] for p in plans], [p["measured_kl"] for p in plans]), 3)
                  for t in tables}  # fmt: skip
    meta = run_meta("moequant.evals.bench.damage_check", args) | {
        "calibration": calib.description,
        "measured": "per item: importance x GPTQ loss from quant_report.json of uniform GPTQ 2/3/4-bit runs; "
        "per plan: token KL to the 16-bit model, every test window",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(
        json.dumps({"meta": meta, "items": item_stats, "plans": plans, "plan_spearman": plan_stats}, indent=1)
    )
    lines = ["# Damage estimates against GPTQ's loss and measured KL (bundled model)\n",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "## Per item: predicted vs importance x GPTQ loss of the quantize pass", "",
             "| table | width | items | Spearman | mean log(pred/meas) | std log(pred/meas) |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s['table']} | {s['bits']} | {s['items']} | {s['spearman']} | {s['log_ratio_mean']} | {s['log_ratio_std']} |"
              for s in item_stats]  # fmt: skip
    lines += ["", "## Per plan: predicted total vs measured token KL", "",
              "| plan | avg bits | measured KL | " + " | ".join(f"predicted ({t})" for t in tables) + " |",
              "|---" * (3 + len(tables)) + "|"]  # fmt: skip
    lines += [f"| {p['plan']} | {p['avg_bits']:.3f} | {p['measured_kl']:.3e} | "
              + " | ".join(f"{p[f'predicted_{t}']:.3e}" for t in tables) + " |" for p in plans]  # fmt: skip
    lines += ["", "Spearman rank correlation of predicted total with measured KL over these plans: "
              + ", ".join(f"{t} {v}" for t, v in plan_stats.items())]  # fmt: skip
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
