"""The streamed layer probe against the whole-model (measured) probe on the bundled model: layer scales, plan,
perplexity.

    python -m moequant.evals.bench.probe_agreement [--budgets 2.5,3.0] [--streamed 16x0,16x128]
        [--out evals/results/probe_agreement]

One profile (bundled corpus train split, 128 x 256 tokens, seed 0) serves every row. For each probe (measured:
calibration loss increase, one full-model forward per MoE layer; streamed: expected KL from a forward and a
backward stream; none: the uncalibrated proxy) and each budget: the probe's per-layer numbers and the layer
scales it gives the damage table, the wall time of the plan step, the share of experts planned at the same
width as with the measured probe, and the GPTQ checkpoint's test-split perplexity and KL to the 16-bit model.
`--streamed` lists the streamed probe's sizes, sequences x tokens per sequence (0: whole calibration windows;
PlanConfig.probe_samples / probe_len), one row each.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2.5,3.0")
    ap.add_argument(
        "--streamed", default="16x0", help="streamed probe sizes, SEQUENCESxTOKENS, comma-separated"
    )
    ap.add_argument(
        "--no-measured-ppl", action="store_true", help="skip the measured and none rows' checkpoints"
    )
    ap.add_argument("--out", default="evals/results/probe_agreement")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import moequant  # noqa: F401
    from moequant import api
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.calibration.profiler import ProfileConfig
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.config import QuantizeConfig
    from moequant.evals.env_info import run_meta
    from moequant.evals.perplexity import perplexity, token_kl
    from moequant.plan.config import Budget, PlanConfig, ProbeKind

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig())
    base = load_model(None)
    prof = api.profile(None, calib, ProfileConfig(progress=False))
    probes = {"measured": (ProbeKind.MEASURED, 16, 0), "none": (None, 16, 0)}
    for size in args.streamed.split(","):
        n, length = (int(v) for v in size.split("x"))
        probes[f"streamed {n}x{length or calib.input_ids.shape[1]}"] = (ProbeKind.STREAMED, n, length)
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="mq-probe-"))
    try:
        for budget in [float(b) for b in args.budgets.split(",")]:
            plans = {}
            for name, (kind, samples, length) in probes.items():
                cfg = PlanConfig(budget=Budget(bits=budget), layer_probe=kind is not None, progress=False,
                                 probe_samples=samples, probe_len=length)  # fmt: skip
                cfg = dataclasses.replace(cfg, probe=kind) if kind is not None else cfg
                t0 = time.perf_counter()
                plan = api.plan(None, prof, cfg, calib)
                plan_s = time.perf_counter() - t0
                plans[name] = plan
                same = sum(
                    a == b
                    for i, specs in plan.layers.items()
                    for a, b in zip(specs, plans["measured"].layers[i], strict=True)
                ) / sum(len(v) for v in plan.layers.values())
                if args.no_measured_ppl and kind is not ProbeKind.STREAMED:
                    rows.append({"budget": budget, "probe": name, "plan_s": round(plan_s, 1), "avg_bits": budget,
                                 "same_width_as_measured": round(same, 3), "test_ppl": float("nan"),
                                 "kl_to_16bit": float("nan"), "per_layer": plan.estimate.get("loss_increase", {}),
                                 "layer_scales": plan.estimate.get("layer_scales", {}), "histogram": {}})  # fmt: skip
                    continue
                out = tmp / f"{name.replace(' ', '_')}{budget}"
                s = api.quantize(None, plan, calib, out, QuantizeConfig(progress=False), tokenizer=tok,
                                 profile_result=prof)  # fmt: skip
                model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
                ppl = perplexity(model, tok, split="test")["overall"]
                kl = token_kl(base, model, tok, split="test")
                row = {
                    "budget": budget, "probe": name, "plan_s": round(plan_s, 1), "avg_bits": round(s.average_bits, 4),
                    "same_width_as_measured": round(same, 3), "test_ppl": round(ppl, 3), "kl_to_16bit": float(f"{kl:.4g}"),
                    "per_layer": plan.estimate.get("loss_increase", {}), "layer_scales": plan.estimate.get("layer_scales", {}),
                    "histogram": {str(k): v for k, v in s.histogram.items()},
                }  # fmt: skip
                rows.append(row)
                print(f"{budget} {name:9s} plan {plan_s:6.1f} s  bits {s.average_bits:.3f}  same {same:.3f}  "
                      f"ppl {ppl:.3f}  KL {kl:.3e}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = run_meta("moequant.evals.bench.probe_agreement", args) | {"calibration": calib.description}
    write_tables(args.out, meta, rows)


def _numbers(d: dict) -> str:
    """A layer's probe numbers or scales: one per layer, or per projection (gate/up, down) where split."""
    return ", ".join(
        "/".join(f"{x:.3g}" for x in v.values()) if isinstance(v, dict) else f"{v:.3g}" for v in d.values()
    )


def write_tables(out: str, meta: dict, rows: list[dict]) -> None:
    """<out>.json and <out>.md."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Streamed vs measured layer probe on the bundled model\n",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
    ]
    lines += [
        "| budget | probe | plan s | avg bits | same width as measured | test ppl | KL to 16-bit | per-layer probe | layer scales |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['probe']} | {r['plan_s']} | {r['avg_bits']:.3f} | "
                     f"{r['same_width_as_measured']:.3f} | {r['test_ppl']:.3f} | {r['kl_to_16bit']:.3e} | "
                     f"{_numbers(r['per_layer']) or '-'} | {_numbers(r['layer_scales']) or '-'} |")  # fmt: skip
    Path(out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
