"""The `--target vllm` compressed-tensors export of the bundled model, loaded by transformers with and without
`import moequant`, beside moequant's own format of the same plan: test-split perplexity of each.

    python -m moequant.evals.bench.ct_transformers [--bits 5.5]

Without `import moequant`, transformers' compressed-tensors loader finds no per-expert Linear under the fused
experts and leaves them as initialised (it warns "Could not match ..."); with it, moequant's loader
(moequant/checkpoint/ct_loading.py) turns the checkpoint's codes and scales into QuantizedExperts. Each load runs
in its own process, float32. Writes evals/results/bench_ct_transformers.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moequant.checkpoint.loading import load_tokenizer
from moequant.evals.perplexity import split_windows

RESULTS = Path(__file__).resolve().parents[1] / "results"

CHILD = """
import json, math, sys, torch
how, path, windows, out = sys.argv[1:5]
if how != "plain":
    import moequant  # noqa: F401  registers the moequant format and its compressed-tensors loader
assert how != "plain" or "moequant" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
x = torch.load(windows)  # [W, L] token ids
nll = 0.0
with torch.no_grad():
    for b in range(0, x.shape[0], 8):
        logits = model(input_ids=x[b : b + 8], use_cache=False).logits.float()  # [B, L, V]
        nll += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[b : b + 8, 1:].reshape(-1), reduction="sum"))
open(out, "w").write(json.dumps({"overall": math.exp(nll / x[:, 1:].numel())}))
"""


def _child(how: str, path: Path, windows: Path, out: Path) -> dict:
    """Perplexity of `path` on `windows` in a fresh process; "plain" never imports moequant there."""
    cmd = [sys.executable, "-c", CHILD, how, str(path), str(windows), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"{how} load of {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="5.5")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_ct_transformers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "ct"
        cmd = ["moequant", "quantize", "--target", "vllm", "--bits", args.bits, "--out", str(work), "--quiet"]
        subprocess.run(cmd, check=True, capture_output=True)
        rows = [
            ("compressed-tensors export, plain transformers", "plain", work),
            ("compressed-tensors export, import moequant + transformers", "moequant", work),
            ("moequant format of the same plan (<out>.moequant)", "moequant", Path(f"{work}.moequant")),
        ]
        windows = Path(tmp) / "windows.pt"
        torch.save(
            torch.cat(list(split_windows(load_tokenizer(None), "test", 256).values())), windows
        )  # [W, 256]
        results = [
            (label, _child(how, path, windows, Path(tmp) / f"{i}.json"))
            for i, (label, how, path) in enumerate(rows)
        ]
    when = datetime.date.today().isoformat()
    lines = [
        "# The compressed-tensors export in transformers, with and without `import moequant`",
        "",
        f"{when}, {platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"`python -m moequant.evals.bench.ct_transformers --bits {args.bits}`; export made by `{' '.join(cmd[:-3])}`;"
        " bundled corpus test split (every 256-token window of every domain, pooled), float32, each load in its own"
        " process; the plain load's process never imports moequant.",
        "",
        "| load | test perplexity (lower is better) |",
        "|---|---|",
        *[f"| {label} | {res['overall']:.4f} |" for label, res in results],
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"date": when, "bits": args.bits, "rows": results}, indent=1)
    )
    print("\n".join(lines[-5:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
