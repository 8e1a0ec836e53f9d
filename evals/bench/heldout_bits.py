"""Where a plan puts its bits, seen from text the calibration never saw: the cause behind leave-one-domain-out.

    python -m moequant.evals.bench.heldout_bits [--out evals/results/heldout_bits] [--bits 3.0]

For each of the bundled corpus' six domains: calibrate on the other five (as bench.lodo does), plan the
budget with each planner (importance mass or minimax, whole experts or per-projection items), then profile
the held-out domain's test split and weigh each expert's stored bits by how much routing weight that text
gives it. Columns: the routing-weighted bits per expert weight under the held-out text and under the
calibration text, and the share of the held-out text's routing weight that lands on experts stored at
2 bits in both projections ("starved"). No quantization runs: plans and profiles only. Writes <out>.md and
<out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def routed_bits(plan, profile) -> tuple[float, float]:
    """(routing-weighted bits per expert weight, routing-weight share on experts at 2 bits in both
    projections) of `plan` under the routing `profile` records."""
    from moequant.config import proj_specs

    per_expert = 3 * plan.hidden * plan.intermediate
    num, den, starved = 0.0, 0.0, 0.0
    for i, specs in plan.layers.items():
        mass = profile.layers[i].weight_mass  # [E] float64
        for e, s in enumerate(specs):
            m = float(mass[e])
            num += m * 8 * plan.expert_bytes(s) / per_expert
            den += m
            if all(p.method.is_integer and p.bits == 2 for p in proj_specs(s)):
                starved += m
    return num / den, starved / den


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="evals/results/heldout_bits")
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--heldout-samples", type=int, default=64, help="held-out test sequences profiled")
    args = ap.parse_args()

    from moequant import api
    from moequant.calibration.corpus import load_split
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.calibration.profiler import ProfileConfig
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.evals.env_info import run_meta
    from moequant.plan.config import Budget, Importance, PlanConfig

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(None)
    domains = sorted(load_split("train"))
    quiet = ProfileConfig(progress=False)
    b = Budget(bits=args.bits)
    configs = {
        "mass, per expert": PlanConfig(b, importance=Importance.MASS, per_projection=False, progress=False),
        "minimax, per expert": PlanConfig(b, per_projection=False, progress=False),
        "mass, per projection": PlanConfig(b, importance=Importance.MASS, progress=False),
        "minimax, per projection": PlanConfig(b, progress=False),
    }
    rows = []
    t0 = time.perf_counter()
    for d in domains:
        seen = tuple(x for x in domains if x != d)
        calib = build_calibration(tok, CalibConfig(sources=seen))
        held = build_calibration(tok, CalibConfig(split="test", sources=(d,), samples=args.heldout_samples))
        held_prof = api.profile(None, held, quiet)
        for name, pcfg in configs.items():
            plan, calib_prof = api.make_plan_for(None, calib, pcfg, progress=False)
            held_bits, starved = routed_bits(plan, held_prof)
            calib_bits, calib_starved = routed_bits(plan, calib_prof)
            rows.append({"held_out": d, "config": name, "avg_bits": round(plan.average_bits(), 4),
                         "held_out_bits": round(held_bits, 4), "calib_bits": round(calib_bits, 4),
                         "held_out_starved": round(starved, 4), "calib_starved": round(calib_starved, 4)})  # fmt: skip
            print(f"{d:8s} {name:24s} held-out {held_bits:.3f} bits ({starved:.1%} starved)  "
                  f"calibration {calib_bits:.3f} bits ({calib_starved:.1%})", flush=True)  # fmt: skip
    meta = run_meta("moequant.evals.bench.heldout_bits", args) | {
        "calibration": "bundled corpus train split without the held-out domain; 128 x 256 tokens, seed 0",
        "held_out": f"the held-out domain's test split, {args.heldout_samples} x 256 tokens, profiled on the 16-bit model",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = list(configs)
    lines = ["# Where the plan's bits go under held-out text (bundled model)\n",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "Each cell: routing-weighted bits per expert weight under the held-out text / under the calibration "
             "text; in brackets, the held-out routing weight on experts stored at 2 bits in both projections.", "",
             "| held-out domain | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for d in domains:
        r = {x["config"]: x for x in rows if x["held_out"] == d}
        lines.append(f"| {d} | " + " | ".join(
            f"{r[n]['held_out_bits']:.3f} / {r[n]['calib_bits']:.3f} ({r[n]['held_out_starved']:.1%})" for n in names
        ) + " |")  # fmt: skip
    mean = {n: [sum(x[k] for x in rows if x["config"] == n) / len(domains)
                for k in ("held_out_bits", "calib_bits", "held_out_starved")] for n in names}  # fmt: skip
    lines.append(
        "| mean | " + " | ".join(f"{m[0]:.3f} / {m[1]:.3f} ({m[2]:.1%})" for m in mean.values()) + " |"
    )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
