"""GPTQ's group grids from the original weights (static) against grids on the error-updated weights, by quality.

    python -m moequant.evals.bench.static_grids                       # bundled model, 2/3/4 bits, both orders
    python -m moequant.evals.bench.static_grids --bits 4 --tag _smoke

Every row quantizes the bundled (trained) model's experts with uniform GPTQ, groups of 128, on the same
calibration (bundled corpus train split, 128 x 256 tokens, seed 0), and reads the whole test split: perplexity
and the token KL to the 16-bit model. Per width, symmetry and column order, two configurations:

* updated: each group's grid found on its error-updated weights when GPTQ reaches the group (the reference's
  default; with act-order that is the grid of a permuted group, stored with a g_idx);
* static: every grid fixed from the original contiguous group before any update (moequant's default,
  GPTQOptions.static_groups; llm-compressor's observer does the same).

Writes evals/results/gptq_static_grids{tag}.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from moequant.evals.env_info import run_meta

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _row(act_order: bool, sym: bool, bits: int, static: bool, calib, tok, base, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from moequant import api
    from moequant.config import GPTQOptions, Method, QuantizeConfig, QuantSpec
    from moequant.evals.perplexity import perplexity, token_kl

    opts = GPTQOptions(act_order=act_order, static_groups=static)
    out = tmp / f"{int(act_order)}{int(sym)}{bits}{int(static)}"
    plan = api.make_uniform_plan(
        None, QuantSpec(Method.GPTQ, bits, 128, sym=sym), act_order=opts.stores_g_idx
    )
    api.quantize(None, plan, calib, out, QuantizeConfig(progress=False, gptq=opts), tokenizer=tok)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ppl = perplexity(model, tok, split="test")["overall"]
    kl = token_kl(base, model, tok, split="test")
    shutil.rmtree(out, ignore_errors=True)
    return {"ppl": ppl, "kl": kl}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    import moequant  # noqa: F401  (registers the quantizer with transformers)
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer

    tok = load_tokenizer(None)
    calib = build_calibration(tok, CalibConfig())
    base = load_model(None)
    tmp = Path(tempfile.mkdtemp(prefix="mq-static-grids-"))
    rows = []
    try:
        for act_order in (False, True):
            for sym in (True, False):
                for bits in (int(b) for b in args.bits.split(",")):
                    pair = {s: _row(act_order, sym, bits, s, calib, tok, base, tmp) for s in (False, True)}
                    rows.append({"act_order": act_order, "sym": sym, "bits": bits} | {
                        "updated": pair[False], "static": pair[True],
                        "kl_ratio": pair[True]["kl"] / pair[False]["kl"],
                    })  # fmt: skip
                    r = rows[-1]
                    print(f"act_order={act_order} sym={sym} {bits} bits: KL {r['updated']['kl']:.4e} -> "
                          f"{r['static']['kl']:.4e} ({r['kl_ratio']:.3f}x)", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = run_meta("moequant.evals.bench.static_grids", args) | {"calibration": calib.description}
    out = RESULTS / f"gptq_static_grids{args.tag}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# GPTQ group grids: from the original weights (static) or the error-updated ones\n",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "- model: the bundled tiny MoE (trained); experts only, uniform GPTQ, groups of 128, damping 1%",
        "- eval: test split, all 256-token windows; KL: token KL to the 16-bit model (nats/token)",
        "",
        "| column order | grid | bits | ppl updated | ppl static | KL updated | KL static | KL static / updated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u, s = r["updated"], r["static"]
        lines.append(
            f"| {'act-order' if r['act_order'] else 'in order'} | {'sym' if r['sym'] else 'asym'} | {r['bits']} "
            f"| {u['ppl']:.3f} | {s['ppl']:.3f} | {u['kl']:.4e} | {s['kl']:.4e} | {r['kl_ratio']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
