"""`--target vllm` on the bundled model: one symmetric 4- or 8-bit width per MoE layer under a 5.5-bit budget,
written as GPTQ v1 with a per-layer `dynamic` map, loaded by GPTQModel beside moequant's own load of the same
plan; test-split perplexity of each, and their ratio.

    python -m moequant.evals.bench.vllm_target [--bits 5.5]

Steps (each load in its own process; GPTQModel patches transformers at import):
1. `moequant quantize --target vllm --bits B --format gptq --allow-mixed-gptq --out W/v` (GPTQModel runs mixed
   widths; vLLM's Marlin MoE does not, vllm-project/vllm#41955): writes W/v (GPTQ,
   the published key names vLLM loads) and W/v.moequant (moequant's format, the same plan).
2. `moequant export-gptq W/v.moequant W/hf --names transformers`: the same tensors under the names GPTQModel
   7.6 checks for under transformers 5 (it refuses W/v: "Missing required quantized weights", it looks for
   per-expert `mlp.experts.N.gate_proj`).
3. Perplexity (bundled corpus, test split) of: the 16-bit model; moequant's load of W/v.moequant (float32 and
   bfloat16); GPTQModel.load(W/hf, backend TORCH, bfloat16: its CPU kernel takes 16-bit only).
Writes evals/results/bench_vllm_target.{md,json}. GPTQModel is an optional dev tool
(`pip install gptqmodel==7.6.0 --no-deps` plus what it imports).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

CHILD = """
import json, sys, torch
what, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
from moequant.checkpoint.loading import load_model, load_tokenizer
from moequant.evals.perplexity import perplexity
tok = load_tokenizer(None)
if what == "gptqmodel":
    from gptqmodel import BACKEND, GPTQModel
    model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.bfloat16).model
else:
    import moequant  # noqa: F401
    model = load_model(None if path == "-" else path)
    if what.endswith("bf16"):
        model = model.to(torch.bfloat16)
res = perplexity(model, tok, split="test")
open(out, "w").write(json.dumps(res))
"""


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="5.5")
    args = p.parse_args(argv)
    try:
        from importlib.metadata import version

        gq_version = version("gptqmodel")
    except Exception:  # noqa: BLE001
        raise SystemExit("GPTQModel is not installed: pip install gptqmodel==7.6.0 --no-deps") from None
    work = Path(tempfile.mkdtemp(prefix="moequant-vllm-target-"))
    py = sys.executable
    quant_s = _run([py, "-m", "moequant", "quantize", "--target", "vllm", "--bits", args.bits, "--format", "gptq",
                    "--allow-mixed-gptq", "--out", str(work / "v"), "--quiet"])  # fmt: skip
    _run([py, "-m", "moequant", "export-gptq", str(work / "v.moequant"), str(work / "hf"), "--names", "transformers",
          "--allow-mixed-gptq"])  # fmt: skip
    mq = json.loads((work / "v.moequant" / "config.json").read_text())["quantization_config"]
    layer_bits = {int(i): sorted({s.split(":")[1] for s in ws}) for i, ws in mq["experts"].items()}
    gq = json.loads((work / "v" / "config.json").read_text())["quantization_config"]
    ppl = {}
    for what, path in (("16-bit", "-"), ("moequant", str(work / "v.moequant")),
                       ("moequant-bf16", str(work / "v.moequant")), ("gptqmodel", str(work / "hf"))):  # fmt: skip
        out = work / f"{what}.json"
        _run([py, "-c", CHILD, what, path, str(out)])
        ppl[what] = json.loads(out.read_text())
    overall = {k: v["overall"] for k, v in ppl.items()}
    rel = overall["gptqmodel"] / overall["moequant-bf16"] - 1
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "command": "python -m moequant.evals.bench.vllm_target "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "gptqmodel": gq_version,
        "budget_bits": float(args.bits),
        "layer_bits": layer_bits,
        "gptq_config": {k: gq[k] for k in ("bits", "group_size", "sym", "desc_act", "dynamic")},
        "quantize_s": round(quant_s, 1),
        "perplexity": ppl,
        "gptqmodel_vs_moequant_bf16": rel,
    }
    lines = [
        f"# --target vllm at {args.bits} bits: GPTQModel {gq_version} loads the export",
        "",
        f"{record['date']}, {record['machine']}; `{record['command']}`",
        "",
        f"- plan: one width per MoE layer, {', '.join(f'layer {i}: {b[0]}-bit' for i, b in layer_bits.items())}; "
        f"GPTQ base {gq['bits']} bits, group {gq['group_size']}, sym {gq['sym']}, dynamic overrides "
        f"{sum(k.startswith('+:') for k in gq['dynamic'])}",
        "- perplexity: bundled corpus, test split (overall = all windows)",
        "",
        "| model | loaded by | dtype | ppl overall |",
        "|---|---|---|---|",
        f"| 16-bit | transformers | float32 | {overall['16-bit']:.3f} |",
        f"| --target vllm, moequant format | moequant | float32 | {overall['moequant']:.3f} |",
        f"| --target vllm, moequant format | moequant | bfloat16 | {overall['moequant-bf16']:.3f} |",
        f"| --target vllm, GPTQ (transformers names) | GPTQModel (TORCH kernel) | bfloat16 | {overall['gptqmodel']:.3f} |",
        "",
        f"GPTQModel against moequant's load, both bfloat16: {100 * rel:+.2f}% perplexity.",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)  # noqa: T201
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_vllm_target.md").write_text(text)
    (RESULTS / "bench_vllm_target.json").write_text(json.dumps(record, indent=1))
    return 0 if abs(rel) <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
