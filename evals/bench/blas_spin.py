"""GPTQ chunks with scipy's OpenBLAS workers spinning (its default) and sleeping at once (moequant's default).

    python -m moequant.evals.bench.blas_spin                 # 2 threads, 3 pairs, OLMoE-shape chunks
    python -m moequant.evals.bench.blas_spin --pairs 1 --tag _smoke

GPTQ factors each expert's Hessian with scipy's LAPACK (OpenBLAS, quantizers/gptq_factor.py) and runs the rest
on torch's threads. OpenBLAS's idle workers spin for 2^OPENBLAS_THREAD_TIMEOUT cycles after a call (default
28); moequant sets 4 when it is imported (moequant/__init__.py). Each row is a fresh process (the variable is
read when OpenBLAS loads) timing gptq_quantize on chunks of 5 OLMoE-1B-7B-shape experts (gate/up [2048, 2048],
down [2048, 1024]; 4-bit, groups of 128, no act-order, as real_shapes_peers runs it), both settings alternated;
the codes of both settings are compared byte for byte. Writes evals/results/blas_spin{tag}.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moequant.evals.env_info import cpu_model, source_fingerprint

RESULTS = Path(__file__).resolve().parents[1] / "results"
SHAPES = ((5, 2048, 2048), (5, 2048, 1024))  # [E, N, K]: gate/up, down
SETTINGS = {"spinning (OpenBLAS default, 28)": "28", "sleeping (moequant default, 4)": "4"}


def _child(repeats: int) -> None:
    import torch

    from moequant.config import GPTQOptions, Method, QuantSpec
    from moequant.quantizers.gptq import gptq_quantize

    torch.manual_seed(0)
    spec, opts = QuantSpec(Method.GPTQ, 4, 128, True), GPTQOptions(act_order=False)
    out = {}
    for E, N, K in SHAPES:
        W = torch.randn(E, N, K) * 0.02  # [E, N, K]
        X = torch.randn(E, 1500, K)  # [E, T, K]
        H = torch.stack([2 / 1500 * x.T @ x for x in X])  # [E, K, K]
        gptq_quantize(W, H.clone(), spec, opts)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            r = gptq_quantize(W, H.clone(), spec, opts)
            times.append(time.perf_counter() - t)
        digest = hashlib.sha256(r.codes.numpy().tobytes() + r.scales.numpy().tobytes()).hexdigest()[:16]
        out[f"{E}x{N}x{K}"] = {"s": statistics.median(times), "codes_sha": digest}
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3, help="alternated process pairs")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per shape in each process (median)")
    p.add_argument("--tag", default="_" + datetime.date.today().isoformat())
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        _child(args.repeats)
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.pairs):
        for name, timeout in SETTINGS.items():
            env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT=timeout, OMP_NUM_THREADS=str(args.threads))
            cmd = [
                sys.executable,
                "-m",
                "moequant.evals.bench.blas_spin",
                "--_child",
                "--repeats",
                str(args.repeats),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    shapes = [f"{E}x{N}x{K}" for E, N, K in SHAPES]
    base, new = SETTINGS
    lines = [
        "# GPTQ chunks with scipy's OpenBLAS workers spinning and sleeping",
        "",
        f"{datetime.date.today().isoformat()}, {cpu_model()}, "
        f"{os.cpu_count()} logical cores, torch threads {args.threads}; "
        f"`python -m moequant.evals.bench.blas_spin {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Median over {args.pairs} alternated fresh processes of each process's median of {args.repeats} calls "
        "of gptq_quantize (4-bit, groups of 128, no act-order) on a chunk of experts [E, N, K]. Library: "
        f"{source_fingerprint()}.",
        "",
        "| chunk | " + " | ".join(SETTINGS) + " | ratio | same codes |",
        "|---|---|---|---|---|",
    ]
    for s in shapes:
        med = {name: statistics.median(r[s]["s"] for r in runs[name]) for name in SETTINGS}
        same = len({r[s]["codes_sha"] for name in SETTINGS for r in runs[name]}) == 1
        lines.append(
            f"| {s} | {med[base]:.3f} s | {med[new]:.3f} s | {med[new] / med[base]:.2f}x | {'yes' if same else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"blas_spin{args.tag}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
