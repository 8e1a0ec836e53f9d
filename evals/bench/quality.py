"""Quality of moequant on the bundled model: test-split perplexity per configuration.

    python -m moequant.evals.bench.quality [--out evals/results/quality_bundled]

Rows: the 16-bit model; uniform GPTQ and RTN at 2, 3, 4, 8 bits; planned (budgeted) GPTQ at 2.5, 3.0 and 3.5
average bits. Every run uses the same calibration (bundled corpus train split, 128 x 256 tokens, seed 0) and
the full test split (non-overlapping 256-token windows). Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="evals/results/quality_bundled")
    ap.add_argument("--widths", default="2,3,4,8")
    ap.add_argument("--planned", default="2.5,3.0,3.5")
    ap.add_argument("--group-sizes", default="", help="group sizes the planner chooses among, e.g. 64,128")
    ap.add_argument(
        "--whole-experts", action="store_true", help="one width per expert (no per-projection items)"
    )
    ap.add_argument(
        "--damage", default="proxy", choices=("proxy", "gptq"), help="how the planner prices items"
    )
    ap.add_argument("--importance", default="minimax", choices=("minimax", "mass"))
    ap.add_argument(
        "--methods", default="gptq,rtn", help="methods of the uniform rows, e.g. gptq,signround,rtn"
    )
    ap.add_argument("--planned-method", default="gptq", help="the integer method of the planned rows")
    ap.add_argument(
        "--non-expert", default=None, choices=("auto",),
        help="auto: planned rows plan attention with the experts (--non-expert auto) and uniform rows store "
        "attention at their width too, so every row's bits count the same weights",
    )  # fmt: skip
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import moequant  # noqa: F401
    from moequant import api
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.checkpoint.source import open_source
    from moequant.config import Method, QuantizeConfig, QuantSpec
    from moequant.evals.env_info import run_meta
    from moequant.evals.perplexity import perplexity, token_kl
    from moequant.plan.config import Budget, DamageKind, Importance, PlanConfig
    from moequant.plan.damage import linear_items
    from moequant.plan.schema import PlannedLinear

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig())
    qcfg = QuantizeConfig(progress=False)
    rows = []

    base = load_model(None)

    def record(name, folder, seconds, bits, model=None):
        model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ppl = perplexity(model, tok, split="test")
        kl = token_kl(base, model, tok, split="test") if model is not base else 0.0
        rows.append(
            {"config": name, "avg_bits": bits, "quantize_s": seconds, "kl_to_16bit": float(f"{kl:.3g}")}
            | {k: round(v, 3) for k, v in ppl.items()}
        )
        print(
            f"{name:22s} bits {bits:6.3f}  ppl {ppl['overall']:8.3f}  KL {kl:.2e}  ({seconds:5.1f} s)",
            flush=True,
        )

    record("16-bit (bf16 weights)", None, 0.0, 16.0, base)
    tmp = Path(tempfile.mkdtemp(prefix="mq-quality-"))
    items = linear_items(open_source(None)) if args.non_expert == "auto" else []  # shapes only
    try:
        for bits in [int(b) for b in args.widths.split(",") if b]:
            for method in [Method.parse(m) for m in args.methods.split(",") if m]:
                out = tmp / f"{method.value}{bits}"
                t0 = time.perf_counter()
                plan = api.make_uniform_plan(None, QuantSpec(method, bits, 128))
                if args.non_expert == "auto":  # the decoder layers' non-expert Linears at the same spec
                    plan.linears = {
                        item.prefix + n: PlannedLinear(QuantSpec(method, bits, 128), o, i)
                        for item in items for n, o, i in item.linears
                    }  # fmt: skip
                s = api.quantize(None, plan, calib, out, qcfg, tokenizer=tok)
                record(f"uniform {method.value}:{bits}", out, time.perf_counter() - t0, s.average_bits)
        grids = tuple(int(g) for g in args.group_sizes.split(",") if g)
        for b in [float(x) for x in args.planned.split(",") if x]:
            out = tmp / f"planned{b}"
            label = "" if args.planned_method == "gptq" else f" {args.planned_method}"
            t0 = time.perf_counter()
            pcfg = PlanConfig(
                budget=Budget(bits=b),
                group_sizes=grids,
                per_projection=not args.whole_experts,
                damage=DamageKind(args.damage),
                importance=Importance(args.importance),
                non_expert_auto=args.non_expert == "auto",
                method=Method.parse(args.planned_method),
            )
            plan, prof = api.make_plan_for(None, calib, pcfg, progress=False)
            s = api.quantize(None, plan, calib, out, qcfg, tokenizer=tok, profile_result=prof)
            attn = (
                f"; attention {', '.join(f'{k}x{v}' for k, v in s.linear_histogram.items())}"
                if s.linear_histogram
                else ""
            )
            record(
                f"planned{label} {b} ({', '.join(f'{k}x{v}' for k, v in s.histogram.items())}{attn})",
                out,
                time.perf_counter() - t0,
                s.average_bits,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = run_meta("moequant.evals.bench.quality", args) | {
        "calibration": calib.description,
        "eval": "test split, all non-overlapping 256-token windows per domain, token-level perplexity",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    domains = [k for k in rows[0] if k not in ("config", "avg_bits", "quantize_s", "kl_to_16bit")]
    lines = ["# Quality on the bundled model\n", *(f"- {k}: {v}" for k, v in meta.items()), ""]
    lines.append(
        "| config | avg bits | quantize s | KL to 16-bit (nats/token) | " + " | ".join(domains) + " |"
    )
    lines.append("|---" * (4 + len(domains)) + "|")
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['avg_bits']:.3f} | {r['quantize_s']:.1f} | {r['kl_to_16bit']:.2e} | "
            + " | ".join(f"{r[d]:.2f}" for d in domains)
            + " |"
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
