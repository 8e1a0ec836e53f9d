"""moequant vs GPTQModel 7.6.0 on the bundled tiny MoE: uniform 4-bit GPTQ, same calibration windows.

    GPTQMODEL_CPU_WORKERS=2 python -m moequant.evals.bench.vs_gptqmodel            # 2 repeats of each timed run
    python -m moequant.evals.bench.vs_gptqmodel --repeats 1 --skip-defaults

Target (Quantization issue): same model, same calibration, uniform 4-bit: our perplexity no worse, our wall
time at most half of GPTQModel's.

GPTQModel is an optional dev tool (`pip install gptqmodel==7.6.0 --no-deps` plus the few packages it imports;
see evals/results/bench_vs_gptqmodel.md). Every run is its own subprocess: GPTQModel patches transformers'
Mixtral classes at import (defuser swaps the fused experts for per-expert nn.Linear), which must not leak into
our runs, and a fresh process gives both sides the same start.

* Calibration: build_calibration(tokenizer, CalibConfig()) (bundled corpus, 128 x 256 tokens, seed 0), saved
  once and handed to both sides as the same input_ids (GPTQModel gets them as a list of {input_ids,
  attention_mask} dicts, calibration_sort=None so it keeps the order; batch size 8 on both sides).
* Settings: 4 bits, group size 128, symmetric, no act-order, true-sequential, experts only (attention stays
  16-bit on both sides: GPTQModel gets dynamic={"-:.*self_attn.*": {}}, routers are never quantized by either),
  damping 1% and RTN fallback for experts with fewer than 32 routed tokens on both sides ("matched"). One
  difference stays: since 2026-12-08 our group grids come from the original weights (GPTQOptions.static_groups,
  our default; evals/results/gptq_static_grids_2026-12-08.md), GPTQModel's from the error-updated weights.
  GPTQModel's own defaults differ (damp 5%, group-aware reordering GAR on, fallback below 0.5% of tokens):
  reported as an extra row, as are ours at our own defaults (asymmetric; QuantizeConfig defaults at run time).
* Wall time: from the checkpoint folder to the written quantized folder (model load + quantize + save), in a
  fresh process after imports; the calibration windows are built before the clock starts on both sides.
* Perplexity: moequant.evals.perplexity.perplexity(model, tok, split="test") in float32 on CPU. Ours is loaded
  with transformers (our registered quantizer, torch reference kernels). GPTQModel's CPU kernel (TorchLinear)
  runs only in fp16/bf16, so its checkpoint is dequantized (qweight/qzeros/scales/g_idx, GPTQ v1 format,
  unpacked here in float32) into the original model; a bf16 cross-check compares that with GPTQModel's own
  loader + kernel on a few windows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moequant.evals.bench.child import run_child, save_calibration
from moequant.evals.bench.vs_gptqmodel_runs import CHECK_WINDOWS, child_main
from moequant.evals.env_info import cpu_model

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _child(what: str, model: str, work: Path, calib: Path | None = None, out: Path | None = None) -> dict:
    js = work / f"{what}-{time.monotonic_ns()}.json"
    cmd = [  # -m, not the file: evals/bench/ on sys.path would shadow packages (kernels.py)
        sys.executable,
        "-m",
        "moequant.evals.bench.vs_gptqmodel",
        "--_child",
        what,
        "--model",
        model,
        "--json",
        str(js),
    ]
    if calib is not None:
        cmd += ["--calib", str(calib)]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 2))}
    run = run_child(cmd, js, work / f"{what}.log", env)
    if run.result is None:
        sys.stderr.write(run.tail())
        raise SystemExit(f"child run {what} failed with status {run.returncode} (log: {run.log})")
    return run.result | {"process_s": run.process_s}


def fmt_ppl(p: dict, domains: list[str]) -> str:
    return " | ".join(f"{p[d]:.3f}" for d in ["overall", *domains])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per method (interleaved)")
    ap.add_argument("--skip-defaults", action="store_true", help="skip the two defaults rows")
    ap.add_argument("--keep", default=None, help="keep the work folder here instead of a temporary one")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.bundled import bundled_model_path
    from moequant.checkpoint.loading import load_tokenizer

    try:  # no import here: importing gptqmodel patches transformers and sets env vars the children inherit
        from importlib.metadata import PackageNotFoundError, version

        gq_version = version("gptqmodel")
    except PackageNotFoundError:
        raise SystemExit(
            "GPTQModel is not installed: pip install gptqmodel==7.6.0 --no-deps (see the module doc)"
        ) from None
    load_before = os.getloadavg()
    model = str(bundled_model_path())
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moequant-vs-gptqmodel-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    data = build_calibration(tok, CalibConfig())
    calib = save_calibration(data, work / "calib.safetensors")

    methods = ["ours-matched", "gptqmodel-matched"]
    extra = [] if args.skip_defaults else ["ours-defaults", "gptqmodel-defaults"]
    timings: dict[str, list[dict]] = {m: [] for m in methods + extra}
    try:
        for r in range(args.repeats):
            for m in methods:  # interleaved, so machine-load drift hits both sides alike
                out = work / f"{m}-{r}"
                timings[m].append(_child(m, model, work, calib, out))
                print(f"{m} run {r}: {timings[m][-1]['wall_s']:.1f} s", flush=True)
        for m in extra:
            timings[m].append(_child(m, model, work, calib, work / f"{m}-0"))
            print(f"{m}: {timings[m][-1]['wall_s']:.1f} s", flush=True)
        evals = {"original": _child("eval-original", model, work)}
        for m in methods + extra:
            kind = "ours" if m.startswith("ours") else "gptqmodel"
            evals[m] = _child(f"eval-{kind}", model, work, out=work / f"{m}-0")
            print(f"{m}: ppl {evals[m]['ppl']['overall']:.3f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    domains = [k for k in evals["original"]["ppl"] if k != "overall"]
    labels = {
        "original": "original (bf16 weights, fp32 compute)",
        "ours-matched": "moequant gptq, matched (sym, no act-order, unweighted Hessians, damp 0.01)",
        "gptqmodel-matched": "GPTQModel 7.6.0, matched (sym, desc_act off, GAR off, damp 0.01, fallback <32 tokens)",
        "ours-defaults": "moequant gptq, our defaults at run time (see config in the JSON)",
        "gptqmodel-defaults": "GPTQModel 7.6.0, its defaults (GAR on, damp 0.05, fallback <0.5%)",
    }
    rows = []
    for m in ["original", *methods, *extra]:
        walls = [t["wall_s"] for t in timings.get(m, [])]
        cpus = [t["cpu_s"] for t in timings.get(m, []) if "cpu_s" in t]
        rows.append(
            {
                "method": m,
                "label": labels[m],
                "wall_s": walls,
                "wall_median_s": statistics.median(walls) if walls else None,
                "cpu_median_s": statistics.median(cpus) if cpus else None,
                "ppl": evals[m]["ppl"],
            }
        )
    ours_t = statistics.median(t["wall_s"] for t in timings["ours-matched"])
    theirs_t = statistics.median(t["wall_s"] for t in timings["gptqmodel-matched"])
    ours_c = statistics.median(t["cpu_s"] for t in timings["ours-matched"])
    theirs_c = statistics.median(t["cpu_s"] for t in timings["gptqmodel-matched"])
    ours_p = evals["ours-matched"]["ppl"]["overall"]
    theirs_p = evals["gptqmodel-matched"]["ppl"]["overall"]
    verdict = {
        "ppl_no_worse": ours_p <= theirs_p,
        "time_at_most_half": ours_t <= 0.5 * theirs_t,
        "time_ratio_ours_over_theirs": ours_t / theirs_t,
        "cpu_ratio_ours_over_theirs": ours_c / theirs_c,
    }
    header = "| method | wall s (median) | wall s, each run | CPU s (median) | test ppl overall | "
    header += " | ".join(domains) + " |"
    table = [header, "|" + "---|" * (5 + len(domains))]
    for r in rows:
        w = f"{r['wall_median_s']:.1f}" if r["wall_median_s"] is not None else "-"
        c = f"{r['cpu_median_s']:.1f}" if r["cpu_median_s"] is not None else "-"
        runs = ", ".join(f"{x:.1f}" for x in r["wall_s"]) or "-"
        table.append(f"| {r['label']} | {w} | {runs} | {c} | {fmt_ppl(r['ppl'], domains)} |")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res = {
        "date": date,
        "command": "python -m moequant.evals.bench.vs_gptqmodel "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores, no GPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptqmodel": gq_version,
        "python": platform.python_version(),
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 2)),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "calibration": data.description,
        "rows": rows,
        "timings": timings,
        "evals": evals,
        "verdict": verdict,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_vs_gptqmodel.json").write_text(json.dumps(res, indent=1, default=str))
    g = evals["gptqmodel-matched"]
    md = [
        "# moequant vs GPTQModel 7.6.0: uniform 4-bit GPTQ on the bundled tiny MoE (CPU)",
        "",
        f"- date: {date}",
        f"- command: `GPTQMODEL_CPU_WORKERS={res['GPTQMODEL_CPU_WORKERS']} {res['command']}`",
        f"- machine: {res['machine']}; torch {res['torch']}, transformers {res['transformers']}, "
        f"gptqmodel {gq_version}, python {res['python']}, {res['torch_threads']} torch threads",
        f"- load average (1, 5, 15 min) before: {res['loadavg_before']}, after: {res['loadavg_after']}",
        "- model: bundled tiny-moe (Mixtral, 4 layers x 8 experts, top-2, hidden 128, intermediate 256)",
        f"- calibration (both sides, same input_ids): {data.description}",
        "- wall s: checkpoint folder -> written quantized folder (load + quantize + save), fresh process, "
        "imports and calibration building excluded; runs interleaved ours/theirs",
        "- perplexity: moequant.evals.perplexity.perplexity(split='test'), float32 CPU, all test windows",
        "",
        *table,
        "",
        f"Verdict (matched rows): perplexity {ours_p:.3f} (ours) vs {theirs_p:.3f} (GPTQModel): "
        f"**{'PASS' if verdict['ppl_no_worse'] else 'FAIL'}** (no worse); wall {ours_t:.1f} s vs {theirs_t:.1f} s "
        f"= {verdict['time_ratio_ours_over_theirs']:.2f}x: **{'PASS' if verdict['time_at_most_half'] else 'FAIL'}** "
        f"(at most half). Process CPU seconds: {ours_c:.1f} vs {theirs_c:.1f} = "
        f"{verdict['cpu_ratio_ours_over_theirs']:.2f}x.",
        "",
        f"GPTQModel cross-check (bf16, {CHECK_WINDOWS} windows per domain): its own loader + TorchLinear kernel "
        f"overall ppl {g['check_kernel_bf16']['overall']:.3f}, its weights dequantized here into the original "
        f"model {g['check_dequant_bf16']['overall']:.3f}. Dequantized modules: {g['dequantized_modules']}; "
        f"quantized attention modules in its checkpoint: {g['quantized_attention_modules']}.",
        "",
    ]
    prints = {}
    for m, ts in timings.items():
        for j, t in enumerate(ts):
            prints.setdefault(json.dumps(t["source"], sort_keys=True), []).append(f"{m}#{j}")
    for m, e in evals.items():
        prints.setdefault(json.dumps(e["source"], sort_keys=True), []).append(f"eval-{m}")
    if len(prints) == 1:
        src = json.loads(next(iter(prints)))
        md.append(
            f"Library source for every run: git HEAD {src['git_head']} with {src['uncommitted_library_files']} "
            f"uncommitted library files (shared tree), sources sha256 {src['source_sha256']}."
        )
    else:
        md.append("**The library changed during the benchmark** (shared tree); runs per source state:")
        for k, runs in prints.items():
            md.append(f"- {k}: {', '.join(runs)}")
    md.append("")
    res["source_states"] = {k: v for k, v in prints.items()}
    (RESULTS / "bench_vs_gptqmodel.json").write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / "bench_vs_gptqmodel.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
