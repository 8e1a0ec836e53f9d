"""moequant beside GPTQModel 7.6.0 at real shapes: the first 2 OLMoE-1B-7B layers, uniform 4-bit, same calibration.

    GPTQMODEL_CPU_WORKERS=2 python -m moequant.evals.bench.real_shapes_vs_gptqmodel [--samples 16 --seq-len 512]

Writes a random-weight bf16 checkpoint at OLMoE's published layer shapes (real_shapes.shape_config, per-expert
keys as published; nothing committed), builds one calibration set from the bundled corpus (the checkpoint's
byte tokenizer) and hands the same input_ids to both sides. Each side runs in its own process
(vs_gptqmodel_runs.py, "matched" settings: 4 bits, group 128, symmetric, no act-order, damping 1%, RTN below 32
routed tokens, attention 16-bit), one after the other, each in a memory cgroup with a limit far above its
need (to read its peak: resident memory plus the page cache it charged) and wait4's peak RSS. Records wall
time and peaks, with the ratios, in evals/results/bench_real_shapes_vs_gptqmodel.{md,json}. GPTQModel loads
the whole model (float32 on CPU); moequant streams it one layer at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from moequant.evals.bench.real_shapes import RESULTS, run_limited, shape_config


def _give_pad_token(ckpt: Path) -> None:
    """The byte tokenizer has no pad token; GPTQModel (Tokenicer) refuses such a tokenizer. Byte 0 becomes the
    pad token (the calibration ids are the same on both sides and hold no padding)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.save_pretrained(ckpt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    try:
        from importlib.metadata import version

        gq_version = version("gptqmodel")
    except Exception:  # noqa: BLE001
        raise SystemExit("GPTQModel is not installed: pip install gptqmodel==7.6.0 --no-deps") from None

    from safetensors.torch import save_file

    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.evals.bench.memory_fixture import write_synthetic_checkpoint

    config = shape_config("olmoe", args.layers)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="moequant-vs-gq-"))
    ckpt = root / "ckpt"
    rows = {}
    try:
        sizes = write_synthetic_checkpoint(ckpt, config)
        _give_pad_token(ckpt)  # GPTQModel's tokenizer loader refuses a tokenizer without one
        data = build_calibration(
            load_tokenizer(str(ckpt)), CalibConfig(samples=args.samples, seq_len=args.seq_len)
        )
        calib = root / "calib.safetensors"
        save_file({"input_ids": data.input_ids.contiguous()}, str(calib))
        Path(str(calib) + ".json").write_text(
            json.dumps({"labels": data.labels, "description": data.description})
        )
        for what in ("ours-matched", "gptqmodel-matched"):
            js = root / f"{what}.json"
            cmd = [sys.executable, "-m", "moequant.evals.bench.vs_gptqmodel", "--_child", what, "--model", str(ckpt),
                   "--calib", str(calib), "--out", str(root / what), "--json", str(js)]  # fmt: skip
            res = run_limited(cmd, int(40e9), root / f"{what}.log")
            if res["rc"] != 0:
                sys.stderr.write((root / f"{what}.log").read_text()[-4000:])
                raise SystemExit(f"{what} failed (rc {res['rc']})")
            rows[what] = res | {"inner": json.loads(js.read_text())}
            print(f"{what}: {res['wall_s']} s, peak RSS {res['child_maxrss_bytes'] / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ours, theirs = rows["ours-matched"], rows["gptqmodel-matched"]
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "command": "GPTQMODEL_CPU_WORKERS=" + os.environ.get("GPTQMODEL_CPU_WORKERS", "?")
        + " python -m moequant.evals.bench.real_shapes_vs_gptqmodel " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gptqmodel": gq_version,
        "checkpoint_bytes": sizes["total_bytes"],
        "calibration": f"{args.samples} x {args.seq_len} tokens ({data.description})",
        "rows": rows,
        "wall_ratio": round(ours["wall_s"] / theirs["wall_s"], 3),
        "rss_ratio": round(ours["child_maxrss_bytes"] / theirs["child_maxrss_bytes"], 3),
        "cgroup_peak_ratio": round(ours["peak_bytes"] / theirs["peak_bytes"], 3),
    }  # fmt: skip
    gb = lambda b: f"{b / 1e9:.2f} GB"
    lines = [
        f"# moequant vs GPTQModel {gq_version} at OLMoE-1B-7B shapes ({args.layers} layers, uniform 4-bit, matched)",
        "",
        f"{record['date']}, {record['machine']}; `{record['command']}`",
        "",
        f"- checkpoint: {gb(sizes['total_bytes'])} bf16, random weights at the published shapes; calibration "
        f"{record['calibration']}, the same input_ids on both sides",
        "- wall: process start to the written folder (imports, load, calibration forward, GPTQ, save)",
        "",
        "| tool | wall (s) | peak RSS | cgroup peak (RSS + charged page cache) |",
        "|---|---|---|---|",
        f"| moequant | {ours['wall_s']} | {gb(ours['child_maxrss_bytes'])} | {gb(ours['peak_bytes'])} |",
        f"| GPTQModel {gq_version} | {theirs['wall_s']} | {gb(theirs['child_maxrss_bytes'])} | {gb(theirs['peak_bytes'])} |",
        f"| ratio (moequant / GPTQModel) | {record['wall_ratio']}x | {record['rss_ratio']}x | {record['cgroup_peak_ratio']}x |",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_real_shapes_vs_gptqmodel.md").write_text(text)
    (RESULTS / "bench_real_shapes_vs_gptqmodel.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
