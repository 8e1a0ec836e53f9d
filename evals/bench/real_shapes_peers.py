"""moequant beside GPTQModel 7.6.0 and llm-compressor 0.14 at real shapes: OLMoE-1B-7B layers, uniform 4-bit.

    python -m moequant.evals.bench.real_shapes_peers                       # 2 layers, 16 x 512, every tool
    python -m moequant.evals.bench.real_shapes_peers --layers 1 --samples 2 --seq-len 64 --tag _smoke

Writes a random-weight bf16 checkpoint at OLMoE's published layer shapes (real_shapes.shape_config, per-expert
keys as published, the byte tokenizer with byte 0 as its pad token, which GPTQModel's tokenizer loader asks
for; nothing committed), builds one calibration set from the bundled corpus and hands the same input_ids to
every tool. Each tool runs in a fresh process, one after the other, inside a memory cgroup whose limit is far
above its need (to read its peak: resident memory plus the page cache it charged) and with wait4's peak RSS:

* moequant: this interpreter, vs_gptqmodel's "matched" child (4 bits, group 128, symmetric, no act-order,
  damping 1%, unweighted routed Hessians, RTN below 32 routed tokens; attention and routers 16-bit; group
  grids from the original weights, as llm-compressor's, GPTQModel's are from the updated weights);
* GPTQModel 7.6.0 and llm-compressor 0.14.0: each in its own virtual environment (evals/bench/peers.py
  ensure_venv: the CPU torch first, then the tool; llm-compressor pins its own transformers, 5.17), where
  moequant is not installed; the tool's code is evals/bench/peers_runs.py, with the same settings
  (GPTQModel: --matched, float32 load; llm-compressor: W4A16 = symmetric int4 in groups of 128, damping 1%,
  no act-order, its MoE loader's per-expert Linears, routed tokens only; --llmc-all-experts adds a row with
  its default of every token through every expert).

Wall: process start to exit (imports, load, calibration forward, GPTQ, written folder). Quality, in this
process after every run (float32, CPU): perplexity on the first 16 windows of 256 tokens per domain of the
bundled test split (random weights: the numbers mean nothing alone, their differences from the 16-bit model
do) and the token KL to the 16-bit model over
the first 8 test windows per domain. moequant's checkpoint loads with transformers; GPTQModel's GPTQ v1
tensors are unpacked (evals/bench/gptq_v1.py) and llm-compressor's compressed-tensors checkpoint is
decompressed by the compressed-tensors library (checkpoint/export_ct.decompressed_state_dict), each into the
16-bit model's experts; peers.cross_checks guards every output (at most 16 values per group, attention
untouched, every expert changed, relative error sane). A tool that cannot run gives a row with its reason.

Writes evals/results/bench_real_shapes_peers{tag}.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

from moequant.evals.bench.real_shapes import RESULTS, run_limited, shape_config

TOOLS = ("moequant", "gptqmodel", "llm-compressor")
DISTRIBUTIONS = {"gptqmodel": "gptqmodel", "llm-compressor": "llmcompressor"}  # tool -> its package's name
RUNS_FILE = Path(__file__).resolve().with_name("peers_runs.py")
PPL_WINDOWS = (
    16  # test windows per domain (96 x 256 tokens): the whole split is 1118 windows, hours at these shapes
)
KL_WINDOWS = 8
LIMIT_BYTES = int(40e9)  # far above every tool's need: the cgroup is there to read peaks, not to bound them


def _give_pad_token(ckpt: Path) -> None:
    """Byte 0 becomes the byte tokenizer's pad token (GPTQModel's Tokenicer refuses a tokenizer without one;
    the calibration ids hold no padding)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.save_pretrained(ckpt)


def _peer_python(tool: str, venv_root: Path, log: Path) -> tuple[Path, dict]:
    """The peer venv's python (created on first use) and the environment its runs get (offline hub)."""
    from moequant.evals.bench.peers import PEERS, _peer_env, ensure_venv

    return ensure_venv(venv_root, PEERS[tool], log), _peer_env(PEERS[tool])


def command(tool: str, row: str, ckpt: Path, calib: Path, out: Path, js: Path, py: Path | None) -> list[str]:
    """The command line of one row; `py`: the peer venv's python (None for moequant, this interpreter)."""
    if py is None:
        child = "ours-matched-no-fallback" if row.endswith("no-fallback") else "ours-matched"
        cmd = [sys.executable, "-m", "moequant.evals.bench.vs_gptqmodel", "--_child", child]
        return [*cmd, "--model", str(ckpt), "--calib", str(calib), "--out", str(out), "--json", str(js)]
    cmd = [
        str(py),
        "-P",
        str(RUNS_FILE),
        tool,
        "--model",
        str(ckpt),
        "--calib",
        str(calib),
        "--out",
        str(out),
    ]
    cmd += ["--bits", "4", "--batch-size", "8", "--json", str(js)]
    if tool == "gptqmodel":
        return [*cmd, "--matched", "--dtype", "float32"]
    return [*cmd, *([] if row.endswith("all-experts") else ["--matched"])]


def quantized_weights(tool: str, out: Path) -> dict:
    """{projection name: dequantized weight [N, K] float32} of one tool's output."""
    from moequant.checkpoint.export_ct import decompressed_state_dict
    from moequant.checkpoint.loading import load_model
    from moequant.evals.bench.gptq_v1 import gptq_v1_weights
    from moequant.evals.bench.peers import moequant_weights, projection_name

    if tool == "moequant":
        import moequant  # noqa: F401  (registers the quantizer with transformers)

        return moequant_weights(load_model(str(out)))
    if tool == "gptqmodel":
        tensors = gptq_v1_weights(out, 4)
    else:
        tensors = {k: v for k, v in decompressed_state_dict(out).items() if ".experts." in k}
    return {projection_name(k) or k: w for k, w in tensors.items()}


def evaluate(tool: str, out: Path, base, tok) -> dict:
    """Cross-checks, perplexity and KL to the 16-bit model of one output (its weights set into a copy)."""
    import copy

    from moequant.evals.bench.peers import Job, apply_weights, cross_checks, original_weights
    from moequant.evals.perplexity import perplexity, token_kl

    originals = original_weights(base)
    weights = quantized_weights(tool, out)
    weights = {k: weights.get(k, originals[k]) for k in originals}
    checks = cross_checks(Job(tool, tool, "experts", 4), weights, None, originals)
    model = copy.deepcopy(base)
    checks["projections_set"] = apply_weights(model, weights)
    return {
        "checks": checks,
        "ppl": perplexity(model, tok, split="test", max_windows=PPL_WINDOWS),
        "kl_to_16bit": token_kl(base, model, tok, split="test", max_windows=KL_WINDOWS),
    }


def _versions(tool: str, py: Path | None, work: Path) -> str:
    """The tool's version as its run sees it (a peer: its venv's, with the transformers beside it)."""
    from moequant.evals.bench.peers import _peer_versions
    from moequant.evals.env_info import code_version

    if py is None:
        return code_version()
    v = _peer_versions(py, work, tool)
    return f"{v[DISTRIBUTIONS[tool]]} (transformers {v['transformers']})"


def markdown(record: dict) -> str:
    gb = lambda b: "-" if b is None else f"{b / 1e9:.2f} GB"  # noqa: E731
    ref = record["reference_ppl"]["overall"]
    lines = [
        f"# moequant beside GPTQModel and llm-compressor at OLMoE-1B-7B shapes ({record['layers']} layers, "
        "uniform 4-bit, matched settings)",
        "",
        f"{record['date']}, {record['machine']}; `{record['command']}`",
        "",
        f"- checkpoint: {gb(record['checkpoint_bytes'])} bf16, random weights at the published shapes; "
        f"calibration {record['calibration']}, the same input_ids for every tool",
        "- wall: the whole process, start to exit (imports, load, calibration forward, GPTQ, written folder); "
        "peak RSS from wait4, cgroup peak = resident memory plus the page cache it charged",
        f"- quality: perplexity over {PPL_WINDOWS} test windows of 256 tokens per domain, 16-bit model {ref:.2f} "
        f"(random weights: only differences mean something); KL to the 16-bit model over {KL_WINDOWS} test windows per domain",
        "",
        "| tool | wall s | peak RSS | cgroup peak | test ppl | KL to 16-bit | wall / moequant | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = record["rows"].get("moequant", {}).get("wall_s")
    for r in record["rows"].values():
        ok = r.get("status") == "ok"
        ppl = f"{r['ppl']['overall']:.2f}" if ok else "-"
        kl = f"{r['kl_to_16bit']:.4e}" if ok else "-"
        ratio = f"{r['wall_s'] / ours:.2f}x" if ok and ours else "-"
        lines.append(
            f"| {r['label']} | {r.get('wall_s', '-')} | {gb(r.get('child_maxrss_bytes'))} | "
            f"{gb(r.get('peak_bytes'))} | {ppl} | {kl} | {ratio} | {r['status']} |"
        )
    lines += ["", *(f"- {n}" for n in record["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument(
        "--llmc-all-experts", action="store_true", help="add llm-compressor at its own MoE default"
    )
    p.add_argument(
        "--moequant-no-fallback",
        action="store_true",
        help="add moequant without the RTN fallback below 32 routed tokens (llm-compressor has none)",
    )
    p.add_argument("--venv-root", default=str(Path("~/.cache/moequant-peers").expanduser()))
    p.add_argument("--workdir", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    tools = args.tools.split(",")
    if unknown := set(tools) - set(TOOLS):
        p.error(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")

    import torch

    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.evals.bench.child import save_calibration
    from moequant.evals.bench.memory_fixture import write_synthetic_checkpoint
    from moequant.evals.bench.peers import PeerFailed
    from moequant.evals.env_info import machine
    from moequant.evals.perplexity import perplexity

    venv_root = Path(args.venv_root)
    config = shape_config("olmoe", args.layers)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="moequant-rs-peers-"))
    ckpt = root / "ckpt"
    rows_to_run = [(t, t) for t in tools]
    if args.moequant_no_fallback and "moequant" in tools:
        rows_to_run.insert(1, ("moequant", "moequant-no-fallback"))
    if args.llmc_all_experts and "llm-compressor" in tools:
        rows_to_run.append(("llm-compressor", "llm-compressor-all-experts"))
    record: dict = {}
    try:
        sizes = write_synthetic_checkpoint(ckpt, config)
        _give_pad_token(ckpt)
        tok = load_tokenizer(str(ckpt))
        data = build_calibration(tok, CalibConfig(samples=args.samples, seq_len=args.seq_len))
        calib = save_calibration(data, root / "calib.safetensors")
        record = {
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "command": "python -m moequant.evals.bench.real_shapes_peers "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "layers": args.layers,
            "checkpoint_bytes": sizes["total_bytes"],
            "calibration": f"{args.samples} x {args.seq_len} tokens ({data.description})",
            "rows": {},
            "notes": [],
        }
        # every tool runs before this process loads a model: a child forked from a process holding one would
        # count the parent's pages in its peak RSS
        for tool, name in rows_to_run:
            label = {"moequant": "moequant", "gptqmodel": "GPTQModel", "llm-compressor": "llm-compressor"}[
                tool
            ]
            suffix = {
                "llm-compressor-all-experts": " (every token through every expert)",
                "moequant-no-fallback": " (GPTQ on every expert a token reaches, no RTN fallback)",
            }.get(name, "")
            row = {"tool": tool, "label": label + suffix}
            record["rows"][name] = row
            out, js, log = root / f"out-{name}", root / f"{name}.json", root / f"{name}.log"
            try:
                peer = tool != "moequant"
                py, env = _peer_python(tool, venv_root, root / f"venv-{tool}.log") if peer else (None, {})
                cmd = command(tool, name, ckpt, calib, out, js, py)
                row["version"] = _versions(tool, py, root)
            except PeerFailed as err:
                row["status"] = f"failed: {err}"
                continue
            res = run_limited(cmd, LIMIT_BYTES, log, env)
            row |= res
            if res["rc"] != 0:
                lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
                row["status"] = f"failed: exit {res['rc']}: {(lines or ['empty log'])[-1][:300]}"
            else:
                row["inner"], row["status"] = json.loads(js.read_text()), "quantized"
            print(f"{name}: {res['wall_s']} s, peak RSS {res['child_maxrss_bytes'] / 1e9:.2f} GB, "
                  f"{row['status']}", flush=True)  # fmt: skip
        base = load_model(str(ckpt), dtype=torch.float32)
        record["reference_ppl"] = perplexity(base, tok, split="test", max_windows=PPL_WINDOWS)
        for name, row in record["rows"].items():
            if row["status"] != "quantized":
                continue
            try:
                row |= evaluate(row["tool"], root / f"out-{name}", base, tok) | {"status": "ok"}
            except PeerFailed as err:
                row["status"] = f"failed: {err}"
            print(f"{name}: {row['status']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = [r for r in record["rows"].values() if r.get("status") == "ok" and r["tool"] != "moequant"]
    for name in ("moequant", "moequant-no-fallback"):
        ours = record["rows"].get(name, {})
        if ok and ours.get("status") == "ok":
            best = min(ok, key=lambda r: r["wall_s"])
            record["notes"].append(
                f"{ours['label']} / fastest peer ({best['label']}): wall {ours['wall_s'] / best['wall_s']:.2f}x, "
                f"test ppl {ours['ppl']['overall']:.2f} vs {best['ppl']['overall']:.2f}, "
                f"KL {ours['kl_to_16bit']:.4e} vs {best['kl_to_16bit']:.4e}"
            )
    text = markdown(record)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_real_shapes_peers{args.tag}.md").write_text(text)
    (RESULTS / f"bench_real_shapes_peers{args.tag}.json").write_text(
        json.dumps(record, indent=1, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
