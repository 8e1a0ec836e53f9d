"""moequant vs GPTQModel 7.6.0 on the bundled tiny MoE: uniform 4-bit GPTQ, same calibration windows.

    GPTQMODEL_CPU_WORKERS=2 python evals/bench/vs_gptqmodel.py            # 2 repeats of each timed run
    python evals/bench/vs_gptqmodel.py --repeats 1 --skip-defaults

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
  damping 1% and RTN fallback for experts with fewer than 32 routed tokens on both sides ("matched").
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moequant.evals.env_info import cpu_model, source_fingerprint

RESULTS = Path(__file__).resolve().parents[1] / "results"
CHECK_WINDOWS = 4  # windows per domain for the bf16 kernel cross-check


# ---- child runs -------------------------------------------------------------------------------------


def _load_calib(path: str):
    from safetensors.torch import load_file

    from moequant.calibration.data import CalibData

    meta = json.loads(Path(path + ".json").read_text())
    return CalibData(load_file(path)["input_ids"], meta["labels"], meta["description"])


def run_ours(model: str, calib: str, out: str, variant: str) -> dict:
    import dataclasses

    from moequant import api
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.config import Method, QuantizeConfig, QuantSpec

    tok = load_tokenizer(model)
    data = _load_calib(calib)
    if variant == "matched":  # GPTQModel's settings: symmetric, no act-order, unweighted routed Hessians
        spec = QuantSpec(Method.GPTQ, 4, 128, sym=True)
        config = QuantizeConfig(
            batch_size=8,
            progress=False,
            act_order=False,
            weight_by_routing=False,
            percdamp=0.01,
            min_tokens=32,
        )
    else:  # our defaults as they stand in the tree at run time (spec and QuantizeConfig defaults)
        spec = QuantSpec(Method.GPTQ, 4, 128)
        config = QuantizeConfig(batch_size=8, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = api.make_uniform_plan(model, spec, act_order=config.stores_g_idx)
    summary = api.quantize(model, plan, data, out, config, tokenizer=tok)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    cfg = {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(config).items()}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "fallbacks": summary.fallbacks,
        "inner_s": summary.seconds,
        "config": {"spec": spec.to_json()} | cfg,
    }


def run_gptqmodel(model: str, calib: str, out: str, variant: str) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import Fallback

    data = _load_calib(calib)
    calibration = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in data.input_ids]
    common = dict(bits=4, group_size=128, desc_act=False, sym=True, dynamic={r"-:.*self_attn.*": {}})
    if variant == "matched":
        qc = QuantizeConfig(
            **common, act_group_aware=False, damp_percent=0.01, fallback=Fallback(threshold=32)
        )
    else:  # GPTQModel's own defaults for everything else (GAR on, damp 0.05, fallback below 0.5% of tokens)
        qc = QuantizeConfig(**common)
    t0, c0 = time.perf_counter(), time.process_time()
    m = GPTQModel.load(model, qc, dtype=torch.float32)  # CPU: no accelerator here
    t1 = time.perf_counter()
    m.quantize(calibration, batch_size=8, calibration_sort=None)
    t2 = time.perf_counter()
    m.save(out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = list(Path(out, "quant_log.csv").read_text().splitlines())[1:]
    fallbacks = sum(1 for r in rows if "fallback" in r)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_s": t1 - t0,
        "quantize_s": t2 - t1,
        "save_s": wall - (t2 - t0),
        "fallback_modules": fallbacks,
        "modules": len(rows),
        "config": {
            k: str(v)
            for k, v in qc.to_dict().items()
            if k in ("bits", "group_size", "sym", "desc_act", "dynamic")
        }
        | {k: qc.to_dict().get("meta", {}).get(k) for k in ("damp_percent", "act_group_aware", "fallback")},
    }


def _unpack_rows(q, bits: int = 4):
    """[K / (32/bits), N] int32 -> [K, N] codes (GPTQ packs along the input dimension)."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [32/bits]
    return ((q.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, q.shape[1])


def _unpack_cols(q, bits: int = 4):
    """[G, N / (32/bits)] int32 -> [G, N] zero points."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return ((q.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(q.shape[0], -1)


def dequantize_gptq_v1(t: dict, prefix: str, bits: int = 4):
    """nn.Linear weight [N, K] float32 from a GPTQ (v1) module: scale * (q - (qzero + 1))."""
    codes = _unpack_rows(t[f"{prefix}.qweight"], bits).float()  # [K, N]
    zeros = _unpack_cols(t[f"{prefix}.qzeros"], bits).float() + 1  # [G, N] v1 stores zero - 1
    scales = t[f"{prefix}.scales"].float()  # [G, N]
    g = t[f"{prefix}.g_idx"].long()  # [K]
    W = scales[g] * (codes - zeros[g])  # [K, N]
    return W.T.contiguous()  # [N, K]


def dequantized_gptqmodel_into(original, out: str):
    """Copy GPTQModel's quantized experts (dequantized in float32) into the fused experts of `original`."""
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    n = 0
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                p = f"model.layers.{i}.mlp.experts.{e}"
                gate = dequantize_gptq_v1(tensors, f"{p}.gate_proj")  # [I, H]
                up = dequantize_gptq_v1(tensors, f"{p}.up_proj")  # [I, H]
                down = dequantize_gptq_v1(tensors, f"{p}.down_proj")  # [H, I]
                ex.gate_up_proj[e] = torch.cat([gate, up]).to(ex.gate_up_proj.dtype)  # [2I, H]
                ex.down_proj[e] = down.to(ex.down_proj.dtype)  # [H, I]
                n += 3
    untouched = [k for k in tensors if "self_attn" in k and k.endswith(".qweight")]
    return n, untouched


def eval_child(kind: str, model: str, out: str | None) -> dict:
    import torch

    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.evals.perplexity import perplexity

    tok = load_tokenizer(model)
    t0 = time.perf_counter()
    res: dict = {}
    if kind == "original":
        m = load_model(model)  # float32 on CPU
    elif kind == "ours":
        import moequant  # noqa: F401  (registers the quantizer with transformers)

        m = load_model(out)
    elif kind == "gptqmodel":
        m = load_model(model)
        n, attn = dequantized_gptqmodel_into(m, out)
        res["dequantized_modules"] = n
        res["quantized_attention_modules"] = len(attn)
    else:
        raise ValueError(kind)
    res["ppl"] = perplexity(m, tok, split="test")
    if kind == "gptqmodel":  # cross-check: the dequantized model vs GPTQModel's own loader + CPU kernel, bf16
        res["check_dequant_bf16"] = perplexity(
            m.to(torch.bfloat16), tok, split="test", max_windows=CHECK_WINDOWS
        )
        del m
        from gptqmodel import BACKEND, GPTQModel

        g = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16)
        res["check_kernel_bf16"] = perplexity(g.model, tok, split="test", max_windows=CHECK_WINDOWS)
    res["eval_s"] = time.perf_counter() - t0
    return res


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what")
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib")
    ap.add_argument("--out")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    if a.what == "ours-matched":
        res = run_ours(a.model, a.calib, a.out, "matched")
    elif a.what == "ours-defaults":
        res = run_ours(a.model, a.calib, a.out, "defaults")
    elif a.what.startswith("gptqmodel-"):
        res = run_gptqmodel(a.model, a.calib, a.out, a.what.removeprefix("gptqmodel-"))
    elif a.what.startswith("eval-"):
        res = eval_child(a.what.removeprefix("eval-"), a.model, a.out)
    else:
        raise SystemExit(f"unknown child run {a.what}")
    res["source"] = source_fingerprint()
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


# ---- driver -----------------------------------------------------------------------------------------


def _child(what: str, model: str, work: Path, calib: Path | None = None, out: Path | None = None) -> dict:
    js = work / f"{what}-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
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
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 2))
    log = work / f"{what}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"child run {what} failed with status {rc} (log: {log})")
    res = json.loads(js.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


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
    from safetensors.torch import save_file

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
    calib = work / "calib.safetensors"
    save_file({"input_ids": data.input_ids.contiguous()}, str(calib))
    Path(str(calib) + ".json").write_text(
        json.dumps({"labels": data.labels, "description": data.description})
    )

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
        "command": "python evals/bench/vs_gptqmodel.py " + " ".join(sys.argv[1:] if argv is None else argv),
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
