"""moequant's vLLM plugin (moequant/vllm/) on the bundled model's planned checkpoints, with several widths inside
each MoE layer: prompt-logprob perplexity and greedy tokens against transformers + moequant on the same tokens,
and generation tokens/s against vLLM's 16-bit bundled model on the same CPU, in one run.

    python -m moequant.evals.bench.vllm_plugin [--vllm-python /tmp/vllm-venv/bin/python] [--work DIR]

vLLM's venv as in vllm_serve.py, plus moequant installed into it (`pip install -e ".[vllm]"`): vLLM loads the
plugin through its `vllm.general_plugins` entry point. This module runs in moequant's environment and:
1. makes the planned checkpoints (`moequant quantize --bits 3.0` and `--bits 2.5`), reused when present;
2. scores each with transformers and with vLLM (vllm_serve.transformers_scores / vllm_scores: float32 both);
3. times generation in vLLM's Python (`speed`, this file by path, one process per model): batch 1 and 8, each
   prompt 16 tokens then DECODE greedy tokens, one warm-up call first; the load average beside each timing, as
   other work may share the machine: compare the ratios within the run, not absolute figures;
4. writes evals/results/bench_vllm_plugin.{md,json}: date, machine (lscpu), vLLM version, command.

The plugin's CUDA path (moequant's Triton kernels) has not run here: no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCHES, PROMPT_LEN, DECODE, REPEATS = (1, 8), 16, 64, 3
BUDGETS = ("3.0", "2.5")
RESULTS = Path(__file__).resolve().parents[1] / "results"


# ---- the vLLM side (vLLM's venv; stdlib and vLLM only) ------------------------------------------------------


def speed(model: str, dtype: str, out_path: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, seed=0
    )
    params = SamplingParams(max_tokens=DECODE, temperature=0.0, detokenize=False, ignore_eos=True)
    rows = []
    for batch in BATCHES:
        prompts = [TokensPrompt(prompt_token_ids=[(7 * b + 3 * t) % 4000 + 10 for t in range(PROMPT_LEN)])
                   for b in range(batch)]  # fmt: skip
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        for _ in range(REPEATS):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append({"batch": batch, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
                         "loadavg_1min": load})  # fmt: skip
    Path(out_path).write_text(json.dumps({"vllm": vllm.__version__, "rows": rows}))


# ---- moequant's side ------------------------------------------------------------------------------------------


def make_checkpoints(work: Path) -> list[dict]:
    from moequant.checkpoint.bundled import bundled_model_path

    rows = [
        {"name": "16-bit (bundled)", "folder": str(bundled_model_path()), "made": "moequant/assets/tiny-moe"}
    ]
    for bits in BUDGETS:
        out = work / f"planned-{bits}"
        cmd = [sys.executable, "-m", "moequant", "quantize", "--bits", bits, "--out", str(out), "--quiet"]
        if not out.exists():
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        rows.append({"name": f"planned {bits} bits", "folder": str(out), "made": f"moequant quantize --bits {bits}",
                     "widths_per_layer": {i: sorted(set(v)) for i, v in cfg["experts"].items()}})  # fmt: skip
    return rows


def time_model(vllm_python: str, folder: str, out: Path) -> dict:
    from moequant.evals.bench.vllm_serve import VLLM_ENV

    proc = subprocess.run(
        [vllm_python, str(Path(__file__).resolve()), "speed", folder, "float32", str(out)],
        capture_output=True, text=True, env={**os.environ, **VLLM_ENV}, cwd=tempfile.gettempdir(), timeout=1800,
    )  # fmt: skip
    if not out.is_file():
        raise SystemExit(f"vLLM speed child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def median(rows: list[dict], batch: int) -> dict:
    """tokens/s at `batch`: the median over the repeats, their range, and the load averages they started at."""
    tps = sorted(r["tokens_per_s"] for r in rows if r["batch"] == batch)
    loads = [r["loadavg_1min"] for r in rows if r["batch"] == batch]
    return {"median": tps[len(tps) // 2], "min": tps[0], "max": tps[-1], "load": (min(loads), max(loads))}


def main(argv: list[str] | None = None) -> int:
    from moequant.evals.bench.vllm_serve import compare, machine, prompts, transformers_scores, vllm_scores

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    p.add_argument("--work", default=None, help="folder for the checkpoints (reused when present)")
    p.add_argument("--render", action="store_true", help="only write the .md again from the saved .json")
    args = p.parse_args(argv)
    if args.render:
        (RESULTS / "bench_vllm_plugin.md").write_text(
            report(json.loads((RESULTS / "bench_vllm_plugin.json").read_text()))
        )
        return 0
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"no vLLM Python at {args.vllm_python}: see this module's docstring")
    work = Path(args.work or tempfile.mkdtemp(prefix="moequant-vllm-plugin-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpts = make_checkpoints(work)
    ids = prompts()
    n_tokens = sum(len(q) - 1 for q in ids)
    prompts_path = work / "prompts.json"
    prompts_path.write_text(json.dumps(ids))
    for i, c in enumerate(ckpts):
        ref = transformers_scores(c["folder"], "float32", ids)
        got = vllm_scores(args.vllm_python, c["folder"], "float32", prompts_path, work / f"scores-{i}.json")
        if not got.get("ok"):
            raise SystemExit(f"vLLM refused {c['name']}: {got.get('error')} at {got.get('where')}")
        c["compare"] = compare(ref, got, n_tokens)
        c["speed"] = time_model(args.vllm_python, c["folder"], work / f"speed-{i}.json")
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "vllm": ckpts[0]["speed"]["vllm"],
        "command": "python -m moequant.evals.bench.vllm_plugin "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "prompts": f"{len(ids)} windows x {len(ids[0])} tokens of the bundled corpus' test split, 16 greedy tokens",
        "speed_setup": f"batch {' and '.join(map(str, BATCHES))}, {PROMPT_LEN}-token prompts, {DECODE} greedy "
        f"tokens each, {REPEATS} timed calls after a warm-up, float32, enforce_eager",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": ckpts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_vllm_plugin.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "bench_vllm_plugin.md").write_text(report(record))
    return 0


def report(r: dict) -> str:
    from moequant.evals.bench.vllm_serve import GREEDY, WINDOWS

    m = r["machine"]
    base = r["rows"][0]["speed"]["rows"]
    spread = max(
        median(row["speed"]["rows"], b)["max"] / median(row["speed"]["rows"], b)["min"]
        for row in r["rows"]
        for b in BATCHES
    )
    lines = [
        f"# moequant's vLLM plugin: several widths per MoE layer served by vLLM {r['vllm']} (CPU build)",
        "",
        f"{r['date']}, {m['model']} ({m['cpus']} CPUs); `{r['command']}` ({r['seconds']:.0f} s). Prompts: "
        f"{r['prompts']}. Reference: transformers + `import moequant` on the same folder and tokens, float32 "
        "both. Speed: "
        f"{r['speed_setup']}; tokens/s counts generated tokens over the whole `generate` call (prefill included); "
        "`load` is the range of 1-minute load averages the timed calls started at (other work shared this "
        f"machine's cores). The repeats of one model differ by up to {spread:.1f}x here: where that spread "
        "exceeds the differences between models, the ratios to the 16-bit model (medians, same run) do not "
        "measure the plugin's speed; a quiet machine must. No GPU here: the plugin's CUDA path (moequant's "
        "Triton kernels inside vLLM) is unmeasured.",
        "",
        "| checkpoint | ppl transformers | ppl vLLM + plugin | rel | greedy equal | tok/s b=1 median [range] (load) | "
        "vs 16-bit | tok/s b=8 median [range] (load) | vs 16-bit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        c, s = row["compare"], row["speed"]["rows"]
        cells = []
        for b in (1, 8):
            x, ref = median(s, b), median(base, b)
            cells += [
                f"{x['median']:.1f} [{x['min']:.1f}, {x['max']:.1f}] ({x['load'][0]:.1f}-{x['load'][1]:.1f})",
                f"{x['median'] / ref['median']:.2f}x",
            ]
        lines.append(
            f"| {row['name']} | {c['ppl_transformers']:.3f} | {c['ppl_vllm']:.3f} | {c['ppl_rel'] * 100:+.4f}% | "
            f"{c['greedy_equal']}/{WINDOWS} (mean prefix {c['greedy_prefix_mean']:.1f}/{GREEDY}) | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Widths inside each MoE layer (gate/up / down where they differ):", ""]
    for row in r["rows"][1:]:
        per = "; ".join(f"layer {i}: {', '.join(v)}" for i, v in row["widths_per_layer"].items())
        lines.append(f"- {row['name']} (`{row['made']}`): {per}")
    lines += [
        "",
        "The 16-bit row is vLLM's own unquantized path (no plugin in its layers). The plugin runs each expert "
        "through moequant's torch reference (dequantize, then a float32 matmul per expert), where vLLM's 16-bit "
        "MoE runs its fused CPU kernel: the speed ratio is that of the reference path, not of a fused kernel.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["speed"]:
        speed(*sys.argv[2:5])
    else:
        sys.exit(main())
