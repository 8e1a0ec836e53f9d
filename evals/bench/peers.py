"""Peer quantizers and moequant on the same page: AutoRound, GPTQModel, HQQ and moequant on the bundled tiny MoE.

    python -m moequant.evals.bench.peers                                   # all tools, W2/W3/W4, both variants
    python -m moequant.evals.bench.peers --tools hqq,moequant --bits 4 --variants experts
    python -m moequant.evals.bench.peers --moequant-methods gptq,rtn      # any value `--method` accepts

* Peers, each in its own virtual environment under --venv-root (default ~/.cache/moequant-peers/<tool>),
  created on first use: `pip install torch==<this torch>` first (the CPU wheel; a bare torch requirement
  would pull the CUDA build), then the tool at a pinned version with this environment's transformers:
  auto-round 0.16.1, gptqmodel 7.6.0 (the version evals/bench/vs_gptqmodel.py measured;
  GPTQMODEL_CPU_WORKERS=2), hqq 0.2.8.post1 (calibration-free; runs on CPU). A tool that cannot be installed
  or run gives a row with status "failed: <reason>", never a missing row. The tools' code runs in
  evals/bench/peers_runs.py; moequant rows run `moequant quantize --uniform --bits B` (--non-expert
  METHOD:B for all-linear), once per --moequant-methods value.
* Calibration: build_calibration(tokenizer, CalibConfig()) (bundled corpus train split, 128 x 256 tokens,
  seed 0), saved once as input_ids and handed to every tool that calibrates (AutoRound: its dataset, nsamples
  128, seqlen 256, its default 200 iterations unless --iters; GPTQModel: in order, calibration_sort=None);
  `moequant quantize` builds the same windows itself (checked: the CLI's calibration equals the saved ids).
  Batch size 8 everywhere.
* Settings: W2/W3/W4, group size 128, asymmetric, each tool's defaults otherwise. Variants: "experts" (the
  routed experts' projections only) and "all-linear" (experts + attention q/k/v/o); routers, embeddings and
  lm_head (tied to the embeddings) stay 16-bit.
* wall s: the whole quantization command as the bench sees it, from process start to exit (interpreter,
  imports, checkpoint load, calibration, quantization, written output), each in a fresh process.
* Quality, in this process (float32, CPU): perplexity(model, tok, split="test") per domain and overall, and
  token_kl to the 16-bit model over the first 8 test windows per domain. moequant's checkpoint loads with
  transformers; a peer's output is dequantized into the original model's fused experts
  (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) and attention: GPTQModel's GPTQ v1 tensors
  unpacked as vs_gptqmodel.py does (evals/bench/gptq_v1.py), AutoRound's fake-quantized model
  (format="fake"), HQQ's own dequantize() of each projection.
* Size: bits per quantized weight as stored (codes + fp16 scale + zero per group; a real checkpoint's
  quantized tensors as written, g_idx included; AutoRound's fake output counted the way moequant stores it,
  moequant/plan/schema.py linear_nbytes; HQQ: its W_q, scale and zero tensors). size_bytes: a real
  checkpoint's *.safetensors bytes (moequant, GPTQModel); a fake-quantized output's 16-bit bytes of every
  unquantized tensor plus the stored bytes of the quantized ones.
* Cross-checks (a failing one fails the row): at most 2**bits distinct values in every group of 128 of every
  quantized weight, attention unchanged in "experts" and changed in "all-linear", every expert projection
  changed and within a sane relative error of the original, AutoRound's other tensors unchanged, and
  GPTQModel's own loader + kernel module dequantizing to the same weights as our unpacking.

Writes evals/results/bench_peers.md and bench_peers.json (rows written as they finish).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moequant.evals.bench.child import ChildRun, run_child, save_calibration

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS_FILE = Path(__file__).resolve().with_name("peers_runs.py")
PEER_TOOLS = ("auto-round", "gptqmodel", "hqq")
TOOLS = (*PEER_TOOLS, "moequant")
VARIANTS = ("experts", "all-linear")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GROUP_SIZE = 128
BATCH_SIZE = 8
KL_WINDOWS = 8  # test windows per domain for the KL to the 16-bit model (perplexity uses all of them)
KERNEL_TOL = 2e-2  # GPTQModel's bf16 kernel vs our float32 unpacking: max |diff| / max |w| per module
MAX_REL_ERR = 0.8  # ||W_q - W|| / ||W|| of the experts above this: a wrong dequantization, not a 2-bit grid
INNER_KEYS = ("wall_s", "cpu_s", "load_s", "quantize_s", "save_s", "iters", "config", "fallbacks", "modules")


@dataclass(frozen=True)
class Peer:
    """A peer tool: the distribution names its venv installs (pinned), its environment variables, and whether
    its venv gets this environment's transformers (False: the tool pins its own)."""

    name: str
    requirements: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    our_transformers: bool = True


PEERS = {
    "auto-round": Peer("auto-round", ("auto-round==0.16.1",)),
    "gptqmodel": Peer("gptqmodel", ("gptqmodel==7.6.0",), (("GPTQMODEL_CPU_WORKERS", "2"),)),
    "hqq": Peer("hqq", ("hqq==0.2.8.post1",)),
    # requires transformers <= 5.17: runs only in evals/bench/real_shapes_peers.py, which evaluates its output
    # from the checkpoint it writes, not with its model classes
    "llm-compressor": Peer("llm-compressor", ("llmcompressor==0.14.0",), our_transformers=False),
}


class PeerFailed(Exception):
    """A tool that could not be installed, run or checked: the row's reason."""


@dataclass(frozen=True)
class Job:
    tool: str  # auto-round | gptqmodel | hqq | moequant
    method: str  # the tool itself for peers; moequant's --method
    variant: str
    bits: int

    @property
    def key(self) -> str:
        return f"{self.tool}-{self.method}-{self.variant}-w{self.bits}"

    @property
    def label(self) -> str:
        return f"moequant {self.method}" if self.tool == "moequant" else self.tool


@dataclass
class Context:
    """What every row shares: the work folder, the saved calibration, the 16-bit model and its numbers."""

    args: argparse.Namespace
    model: str  # the bundled checkpoint folder
    work: Path
    calib: Path
    tok: object
    base: object  # the 16-bit model, float32 on CPU
    reference_ppl: dict
    quantized_weights: dict  # variant -> number of weights the variant quantizes
    original_16bit_bytes: int  # every weight of the original at 16 bits (tied ones once)
    venvs: dict = field(default_factory=dict)  # tool -> its python, or the PeerFailed reason
    versions: dict = field(default_factory=dict)  # tool -> version


# ------------------------------------------------------------------------------------------------ venvs


def _requirements(peer: Peer) -> list[str]:
    import torch
    import transformers

    # the same torch (CPU build, local wheel) and transformers as the evaluation: one model class on both sides
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        *peer.requirements,
        *([f"transformers=={transformers.__version__}"] if peer.our_transformers else []),
    ]


def ensure_venv(root: Path, peer: Peer, log: Path) -> Path:
    """The peer's venv python: created and installed on first use (torch first, then the tool), reused while
    its recorded requirements match. Raises PeerFailed with pip's last error line."""
    venv = root / peer.name
    py = venv / "bin" / "python"
    reqs = _requirements(peer)
    marker = venv / "moequant-peers.json"
    if py.is_file() and marker.is_file() and json.loads(marker.read_text()).get("requirements") == reqs:
        return py
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(py), "-m", "pip", "install", reqs[0]],  # torch alone first: the CPU wheel, not a CUDA build
        [str(py), "-m", "pip", "install", *reqs[1:]],
    ]
    for step in steps:
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(step)}\n")
            fh.flush()
            rc = subprocess.run(step, stdout=fh, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            what = " ".join(step[2:]) if step[0] == str(py) else "python -m venv"
            raise PeerFailed(f"install: `{what}` exit {rc}: {ChildRun(rc, None, 0.0, log).error_line()}")
    marker.write_text(json.dumps({"requirements": reqs}, indent=1))
    return py


def _peer_env(peer: Peer) -> dict:
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **dict(peer.env)}


def _peer_versions(py: Path, work: Path, tool: str) -> dict:
    js = work / f"versions-{tool}.json"
    run = run_child(
        [str(py), "-P", str(RUNS_FILE), "versions", "--json", str(js)], js, work / f"versions-{tool}.log"
    )
    if run.result is None:
        raise PeerFailed(f"import: {run.error_line()}")
    return run.result


# ------------------------------------------------------------------------------------------------ runs


def moequant_command(job: Job, model: str, out: Path) -> list[str]:
    cmd = ["quantize", model, "--uniform", "--bits", str(job.bits), "--method", job.method]
    cmd += ["--group-size", str(GROUP_SIZE), "--asym", "--batch-size", str(BATCH_SIZE)]
    cmd += [
        "--samples",
        "128",
        "--seq-len",
        "256",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
    ]
    if job.variant == "all-linear":
        cmd += ["--non-expert", f"{job.method}:{job.bits}"]
    return cmd


def quantize(job: Job, ctx: Context, out: Path) -> ChildRun:
    """One quantization command in a fresh process; the result JSON is the tool's (moequant: its report)."""
    threads = {} if ctx.args.threads is None else {"OMP_NUM_THREADS": str(ctx.args.threads)}
    if job.tool == "moequant":
        cmd = [sys.executable, "-m", "moequant", *moequant_command(job, ctx.model, out)]
        return run_child(cmd, out / "quant_report.json", ctx.work / f"{out.name}.log", threads)
    py = ctx.venvs[job.tool]
    js = ctx.work / f"{out.name}.json"
    cmd = [str(py), "-P", str(RUNS_FILE), job.tool, "--model", ctx.model, "--calib", str(ctx.calib)]
    cmd += ["--out", str(out), "--bits", str(job.bits), "--variant", job.variant, "--json", str(js)]
    cmd += ["--group-size", str(GROUP_SIZE), "--batch-size", str(BATCH_SIZE)]
    if job.tool == "auto-round" and ctx.args.iters is not None:
        cmd += ["--iters", str(ctx.args.iters)]
    if job.tool == "gptqmodel":
        cmd += ["--dtype", ctx.args.gptqmodel_dtype]
    return run_child(cmd, js, ctx.work / f"{out.name}.log", _peer_env(PEERS[job.tool]) | threads)


# ------------------------------------------------------------------------------------------------ weights

_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)"
    r"(?:\.weight)?$"
)
_ATTN = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)(?:\.weight)?$")
_ALIAS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def projection_name(name: str) -> str | None:
    """A tensor or module name as `model.layers.L.mlp.experts.E.{gate,up,down}_proj` or
    `model.layers.L.self_attn.X_proj` (None for anything else): the names every tool's weights are read by."""
    m = _EXPERT.match(name)
    if m:
        return f"model.layers.{m[1]}.mlp.experts.{m[2]}.{_ALIAS.get(m[3], m[3])}"
    m = _ATTN.match(name)
    return f"model.layers.{m[1]}.self_attn.{m[2]}" if m else None


def original_weights(model) -> dict:
    """{projection name: weight [N, K] float32} of every expert projection and attention Linear of `model`
    (the transformers model with fused experts)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        inter = ex.down_proj.shape[-1]
        for e in range(ex.gate_up_proj.shape[0]):
            p = f"model.layers.{i}.mlp.experts.{e}"
            out[f"{p}.gate_proj"] = ex.gate_up_proj[e, :inter].detach().float()  # [I, H]
            out[f"{p}.up_proj"] = ex.gate_up_proj[e, inter:].detach().float()  # [I, H]
            out[f"{p}.down_proj"] = ex.down_proj[e].detach().float()  # [H, I]
        for a in ATTENTION:
            out[f"model.layers.{i}.self_attn.{a}"] = getattr(layer.self_attn, a).weight.detach().float()
    return out


def moequant_weights(model) -> dict:
    """The same names from a loaded moequant checkpoint: its quantized experts and Linears dequantized."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for e in range(ex.num_experts):
            slot = ex.slot(e)
            gu = slot.gate_up.dequantize()  # [2I, H]
            inter = gu.shape[0] // 2
            p = f"model.layers.{i}.mlp.experts.{e}"
            out[f"{p}.gate_proj"], out[f"{p}.up_proj"] = gu[:inter], gu[inter:]
            out[f"{p}.down_proj"] = slot.down.dequantize()  # [H, I]
        for a in ATTENTION:
            mod = getattr(layer.self_attn, a)
            w = mod.w.dequantize() if hasattr(mod, "w") else mod.weight
            out[f"model.layers.{i}.self_attn.{a}"] = w.detach().float()
    return out


def apply_weights(model, weights: dict) -> int:
    """Copy per-projection weights [N, K] into `model`'s fused experts and attention Linears; every expert's
    three projections must be there. Returns how many projections were set."""
    import torch

    by_name = dict(weights)
    n = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            for e in range(ex.gate_up_proj.shape[0]):
                p = f"model.layers.{i}.mlp.experts.{e}"
                try:
                    gate, up, down = (by_name.pop(f"{p}.{x}") for x in ("gate_proj", "up_proj", "down_proj"))
                except KeyError as err:
                    raise PeerFailed(f"check: no quantized weight for {err.args[0]}") from None
                ex.gate_up_proj[e] = torch.cat([gate, up]).to(ex.gate_up_proj.dtype)  # [2I, H]
                ex.down_proj[e] = down.to(ex.down_proj.dtype)  # [H, I]
                n += 3
            for a in ATTENTION:
                w = by_name.pop(f"model.layers.{i}.self_attn.{a}", None)
                if w is not None:
                    getattr(layer.self_attn, a).weight.copy_(w)
                    n += 1
    if by_name:
        raise PeerFailed(f"check: weights for modules the model does not have: {sorted(by_name)[:3]}")
    return n


def max_distinct_per_group(w, group_size: int = GROUP_SIZE) -> int:
    """The largest number of distinct values in one group of `group_size` consecutive input columns of
    w [N, K]: at most 2**bits for a correctly dequantized group-wise integer weight."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size).sort(-1).values  # [N, G, gs]
    return int((1 + (g[..., 1:] != g[..., :-1]).sum(-1)).max())


def cross_checks(job: Job, weights: dict, ctx: Context, originals: dict) -> dict:
    """The checks a wrong dequantization or a wrong variant would fail; raises PeerFailed on the first miss."""
    import torch

    checks: dict = {}
    experts = [k for k in originals if ".experts." in k]
    attn = [k for k in originals if ".self_attn." in k]
    quantized = experts + (attn if job.variant == "all-linear" else [])
    distinct = max(max_distinct_per_group(weights[k]) for k in quantized)
    checks["max_distinct_per_group"] = distinct
    if distinct > 2**job.bits:
        raise PeerFailed(f"check: {distinct} distinct values in a group of {GROUP_SIZE} at {job.bits} bits")
    changed_attn = sum(not torch.equal(weights[k], originals[k]) for k in attn)
    checks["attention_changed"] = f"{changed_attn}/{len(attn)}"
    if changed_attn != (len(attn) if job.variant == "all-linear" else 0):
        raise PeerFailed(f"check: {changed_attn} of {len(attn)} attention weights changed in {job.variant}")
    unchanged = sum(torch.equal(weights[k], originals[k]) for k in experts)
    num = sum(float((weights[k] - originals[k]).square().sum()) for k in experts)
    den = sum(float(originals[k].square().sum()) for k in experts)
    checks["expert_rel_err"] = round((num / den) ** 0.5, 5)
    if unchanged or not 0 < checks["expert_rel_err"] < MAX_REL_ERR:
        raise PeerFailed(
            f"check: {unchanged} expert projections unchanged, rel. error {checks['expert_rel_err']}"
        )
    return checks


# ------------------------------------------------------------------------------------------------ evaluation


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _stored_in_checkpoint(folder: Path, variant: str) -> int:
    """Bytes of a real checkpoint's quantized tensors: everything under the experts, and under self_attn
    except plain 16-bit `.weight` tensors (attention kept in 16 bits)."""
    total = 0
    for name, t in _tensors(folder).items():
        quantized = ".experts." in name or (".self_attn." in name and not name.endswith(".weight"))
        if quantized and (variant == "all-linear" or ".self_attn." not in name):
            total += t.numel() * t.element_size()
    return total


def _computed_bytes(weights: dict, names: list[str], bits: int) -> int:
    """What moequant stores for these projections at `bits`, group 128, asymmetric (codes, fp16 scales,
    uint8 zeros): the count for a fake-quantized output."""
    from moequant.config import Method, QuantSpec
    from moequant.plan.schema import linear_nbytes

    spec = QuantSpec(Method.GPTQ, bits, GROUP_SIZE, sym=False)
    return sum(linear_nbytes(spec, *weights[k].shape) for k in names)


def peer_weights(job: Job, out: Path, inner: dict, ctx: Context, checks: dict) -> tuple[dict, int, str]:
    """A peer's quantized weights by projection name, the bytes it stores for them, and how size is known."""
    import torch

    from moequant.evals.bench.gptq_v1 import gptq_v1_weights

    if job.tool == "gptqmodel":
        weights = {projection_name(k) or k: w for k, w in gptq_v1_weights(out, job.bits).items()}
        theirs = ctx.work / f"{out.name}-kernel.safetensors"
        js = ctx.work / f"{out.name}-kernel.json"
        cmd = [str(ctx.venvs["gptqmodel"]), "-P", str(RUNS_FILE), "gptqmodel-dequantize", "--out", str(out)]
        run = run_child([*cmd, "--dest", str(theirs), "--json", str(js)], js, ctx.work / f"{out.name}-kernel.log",
                        _peer_env(PEERS["gptqmodel"]))  # fmt: skip
        if run.result is None:
            raise PeerFailed(f"check: GPTQModel's own loader failed on its output: {run.error_line()}")
        kernel = {projection_name(k) or k: w for k, w in _tensors_file(theirs).items()}
        worst = max(float((weights[k] - kernel[k]).abs().max() / weights[k].abs().max()) for k in weights)
        checks["gptqmodel_kernel_vs_unpacked"] = round(worst, 5)
        if set(kernel) != set(weights) or worst > KERNEL_TOL:
            raise PeerFailed(f"check: GPTQModel's kernel module and our unpacking differ by {worst:.3g}")
        return weights, _stored_in_checkpoint(out, job.variant), "checkpoint"
    if job.tool == "auto-round":
        folder = Path(inner["folder"])
        tensors = _tensors(folder)
        weights = {projection_name(k): w.float() for k, w in tensors.items() if projection_name(k)}
        base = ctx.base.state_dict()
        others = {
            k.replace(".block_sparse_moe.", ".mlp."): t for k, t in tensors.items() if not projection_name(k)
        }
        changed = [
            k for k, t in others.items() if k not in base or not torch.equal(base[k].bfloat16(), t.bfloat16())
        ]
        checks["other_tensors_changed"] = f"{len(changed)}/{len(others)}"
        if changed:  # router, norms, embeddings: kept by every variant
            raise PeerFailed(f"check: AutoRound changed or renamed tensors it should keep: {changed[:3]}")
        names = [k for k in weights if ".experts." in k or job.variant == "all-linear"]
        return weights, _computed_bytes(weights, names, job.bits), "fake-quantized, bytes computed"
    weights = {k: w.float() for k, w in _tensors_file(out / "dequantized.safetensors").items()}
    checks["hqq_file_bytes"] = (out / "hqq.safetensors").stat().st_size
    return weights, int(inner["stored_bytes"]), "fake-quantized, bytes computed"


def _tensors_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def evaluate(job: Job, out: Path, inner: dict, ctx: Context) -> dict:
    """Size, bits per weight, cross-checks, perplexity and KL of one output (raises PeerFailed)."""
    from moequant.checkpoint.loading import load_model
    from moequant.evals.env_info import checkpoint_bytes
    from moequant.evals.perplexity import perplexity, token_kl

    originals = original_weights(ctx.base)
    checks: dict = {}
    if job.tool == "moequant":
        import moequant  # noqa: F401  (registers the quantizer with transformers)

        model = load_model(str(out))
        weights = moequant_weights(model)
        stored, how = _stored_in_checkpoint(out, job.variant), "checkpoint"
    else:
        weights, stored, how = peer_weights(job, out, inner, ctx, checks)
        weights = {k: originals[k] if k not in weights else weights[k] for k in originals}
        model = load_model(None)  # the original, float32; its experts (and attention) replaced
        checks["projections_set"] = apply_weights(model, weights)
    checks |= cross_checks(job, weights, ctx, originals)
    q = ctx.quantized_weights[job.variant]
    rest = ctx.original_16bit_bytes - 2 * q + stored
    row = {
        "bits_per_weight": round(8 * stored / q, 4),
        "size_bytes": checkpoint_bytes(out) if how == "checkpoint" else rest,
        "size_kind": "checkpoint on disk" if how == "checkpoint" else how,
        "checkpoint_bytes": checkpoint_bytes(out) if how == "checkpoint" else None,
        "size_bytes_16bit_rest": rest,
        "stored_quantized_bytes": stored,
        "quantized_weights": q,
    }
    t0 = time.perf_counter()
    row["ppl"] = perplexity(model, ctx.tok, split="test")
    row["kl_to_16bit"] = token_kl(ctx.base, model, ctx.tok, split="test", max_windows=KL_WINDOWS)
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    row["checks"] = checks
    return row


# ------------------------------------------------------------------------------------------------ report


def _row_base(job: Job, ctx: Context) -> dict:
    return {
        "model": "bundled",
        "tool": job.tool,
        "method": job.method,
        "label": job.label,
        "version": ctx.versions.get(job.tool),
        "variant": job.variant,
        "bits": job.bits,
        "group_size": GROUP_SIZE,
        "sym": False,
        "status": "pending",  # "ok" once measured, or "failed: <reason>"
        "bits_per_weight": None,
        "size_bytes": None,
        "ppl": None,
        "wall_s": None,
        "wall_runs_s": [],
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    meta, ref = res["meta"], res["reference"]
    domains = [d for d in ref["ppl"] if d != "overall"]
    lines = [
        "# Peer quantizers and moequant on the bundled tiny MoE (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        f"- tools: {', '.join(f'{t} {v}' for t, v in res['tools'].items())}",
        f"- calibration (every calibrating tool, same input_ids): {res['calibration']}",
        f"- settings: {res['settings']}",
        f"- evaluation: {res['eval']}",
        "- bits/weight: stored bytes x 8 / quantized weights (codes, scales, zeros, g_idx where stored); size: "
        "the model's weight bytes (a checkpoint's *.safetensors, or for fake-quantized outputs 16-bit "
        "unquantized tensors + stored bytes of the quantized ones)",
        "- wall s: the whole quantization command (fresh process start to exit: imports, load, calibration, "
        "quantization, save); ratio: wall / moequant gptq's wall at the same width and variant",
        f"- 16-bit reference: {ref['size_bytes'] / 1e6:.3f} MB, test perplexity {ref['ppl']['overall']:.3f}",
        "",
    ]
    head = ["tool", "variant", "bits", "bits/weight", "size MB", "ppl overall", *domains]
    head += ["ppl loss vs 16-bit", "KL to 16-bit", "wall s", "wall / moequant gptq", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        ok = r["status"] == "ok" and r.get("ppl")
        ppl = r.get("ppl") or {}
        loss = None if not ok else 100 * (ppl["overall"] / ref["ppl"]["overall"] - 1)
        cells = [
            f"{r['label']} {r.get('version') or ''}".strip(),
            r["variant"],
            str(r["bits"]),
            _fmt(r.get("bits_per_weight"), ".3f"),
            _fmt(None if r.get("size_bytes") is None else r["size_bytes"] / 1e6, ".3f")
            + ("" if not ok or r["size_kind"] == "checkpoint on disk" else "*"),
            _fmt(ppl.get("overall"), ".3f"),
            *(_fmt(ppl.get(d), ".2f") for d in domains),
            "-" if loss is None else f"{loss:+.2f}%",
            _fmt(r.get("kl_to_16bit"), ".2e"),
            _fmt(r.get("wall_s"), ".1f"),
            "-" if r.get("wall_ratio") is None else f"{r['wall_ratio']:.2f}x",
            r["status"].replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "\\* fake-quantized output: size computed, not a file on disk.", ""]
    if res.get("notes"):
        lines += [*(f"- {n}" for n in res["notes"]), ""]
    return "\n".join(lines)


def _finish(res: dict, out: str, private: tuple[str, ...] = ()) -> None:
    """Wall ratios, then OUT.json and OUT.md; `private` paths (work folder, venv root) leave the reasons."""
    for r in res["rows"]:
        for i, path in enumerate(private):
            r["status"] = r["status"].replace(path, ("<work>", "<venv-root>")[min(i, 1)])
    walls = {(r["variant"], r["bits"]): r["wall_s"] for r in res["rows"]
             if r["tool"] == "moequant" and r["method"] == "gptq" and r.get("wall_s")}  # fmt: skip
    for r in res["rows"]:
        base = walls.get((r["variant"], r["bits"]))
        r["wall_ratio"] = None if not base or not r.get("wall_s") else round(r["wall_s"] / base, 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(res))


# ------------------------------------------------------------------------------------------------ main


def _parse_list(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: choose from {', '.join(allowed or ())}, got {text!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--moequant-methods", default="gptq", help="values of `moequant quantize --method`")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each quantization (interleaved)")
    ap.add_argument("--iters", type=int, default=None, help="AutoRound iterations (default: its own, 200)")
    ap.add_argument("--gptqmodel-dtype", default="auto", choices=("auto", "float32"),
                    help="GPTQModel's load dtype: auto (its own: bf16 on CPU) or float32 (vs_gptqmodel.py's)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every quantization command (default: unset, each tool's own)")  # fmt: skip
    ap.add_argument("--venv-root", default=str(Path("~/.cache/moequant-peers").expanduser()))
    ap.add_argument("--out", default=str(RESULTS / "bench_peers"), help="writes OUT.md and OUT.json")
    ap.add_argument("--keep", default=None, help="keep the work folder (outputs, logs) here")
    args = ap.parse_args(argv)
    bits = [int(b) for b in _parse_list(args.bits, ("2", "3", "4", "8"), "bits")]
    variants = _parse_list(args.variants, VARIANTS, "variants")
    tools = _parse_list(args.tools, TOOLS, "tools")
    methods = _parse_list(args.moequant_methods, None, "moequant-methods")

    import torch

    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.bundled import bundled_model_path
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.cli.common import calibration
    from moequant.cli.main import build_parser
    from moequant.evals.env_info import checkpoint_bytes, code_version, run_meta, source_fingerprint
    from moequant.evals.perplexity import perplexity
    from moequant.evals.sweep import PEERS_FORMAT

    torch.set_num_threads(os.cpu_count() or 1)
    model = str(bundled_model_path())
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moequant-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    data = build_calibration(tok, CalibConfig())
    calib = save_calibration(data, work / "calib.safetensors")
    cli_args = build_parser().parse_args(moequant_command(Job("moequant", "gptq", "experts", 4), model, work))
    same_calib = torch.equal(calibration(cli_args, tok, model).input_ids, data.input_ids)
    if not same_calib:
        raise SystemExit("moequant quantize would build other calibration windows than the peers get")
    base = load_model(model)  # float32 on CPU
    originals = original_weights(base)
    n_exp = sum(w.numel() for k, w in originals.items() if ".experts." in k)
    n_attn = sum(w.numel() for k, w in originals.items() if ".self_attn." in k)
    unique = {t.data_ptr(): t.numel() for t in base.state_dict().values()}  # tied weights once
    ctx = Context(args, model, work, calib, tok, base, perplexity(base, tok, split="test"),
                  {"experts": n_exp, "all-linear": n_exp + n_attn}, 2 * sum(unique.values()))  # fmt: skip
    ctx.versions["moequant"] = code_version()
    failed_tools: dict[str, str] = {}
    for t in (t for t in tools if t in PEERS):
        try:
            ctx.venvs[t] = ensure_venv(Path(args.venv_root), PEERS[t], work / f"install-{t}.log")
            v = _peer_versions(ctx.venvs[t], work, t)
            ctx.versions[t] = v.get(t)
            ctx.versions[f"{t} environment"] = v
        except PeerFailed as err:
            failed_tools[t] = str(err)
            print(f"{t}: {err}", flush=True)

    jobs = [
        Job(t, m, v, b)
        for v in variants
        for b in bits
        for t in tools
        for m in (methods if t == "moequant" else [t])
    ]
    res = {
        "format": PEERS_FORMAT,  # what `moequant sweep --peers` checks a file for
        "meta": run_meta("moequant.evals.bench.peers", args)
        | {
            "command": " ".join(
                ["python -m moequant.evals.bench.peers", *(sys.argv[1:] if argv is None else argv)]
            )
        },
        "model": "bundled",
        "model_name": Path(model).name,
        "tools": {
            t: ctx.versions.get(t)
            or f"not available ({failed_tools[t].replace(args.venv_root, '<venv-root>')})"
            for t in tools
        },
        "environments": {t: ctx.versions.get(f"{t} environment") for t in tools if t in PEERS},
        "calibration": data.description + f"; moequant quantize's own calibration identical: {same_calib}",
        "settings": f"W{'/W'.join(map(str, bits))}, group size {GROUP_SIZE}, asymmetric, batch size {BATCH_SIZE}; "
        f"variants {', '.join(variants)}; AutoRound iters {args.iters or 'default (200)'}; GPTQModel load dtype "
        f"{args.gptqmodel_dtype}; moequant methods {', '.join(methods)}; repeats {args.repeats}; OMP_NUM_THREADS "
        f"{args.threads or 'unset'}",
        "eval": "perplexity(model, tok, split='test'): every 256-token test window per domain, float32 CPU; "
        f"token_kl to the 16-bit model over the first {KL_WINDOWS} test windows per domain",
        "seq_len": 256,  # perplexity window
        "reference": {"size_bytes": checkpoint_bytes(model), "ppl": ctx.reference_ppl, "bits": 16},
        "rows": [],
        "notes": [],
    }
    rows = {j.key: _row_base(j, ctx) for j in jobs}
    for j in jobs:
        if j.tool in failed_tools:
            rows[j.key]["status"] = f"failed: {failed_tools[j.tool]}"
    try:
        for r in range(args.repeats):
            for j in jobs:  # interleaved over tools, so machine-load drift hits every tool alike
                row = rows[j.key]
                if row["status"].startswith("failed"):
                    continue
                out = work / f"{j.key}-r{r}"
                run = quantize(j, ctx, out)
                if run.result is None:
                    row["status"] = f"failed: quantize: {run.error_line()}"
                    print(f"{j.key}: {row['status']} (log: {run.log})", flush=True)
                    continue
                row["wall_runs_s"].append(round(run.process_s, 2))
                row.setdefault("inner", {k: v for k, v in run.result.items() if k in INNER_KEYS})
                print(f"{j.key} run {r}: {run.process_s:.1f} s", flush=True)
                if r == 0:
                    try:
                        row |= evaluate(j, out, run.result, ctx) | {"status": "ok"}
                        print(f"{j.key}: ppl {row['ppl']['overall']:.3f}", flush=True)
                    except PeerFailed as err:
                        row["status"] = f"failed: {err}"
                    except Exception as err:  # noqa: BLE001  (an output we cannot read is that row's failure)
                        row["status"] = f"failed: evaluation: {type(err).__name__}: {err}"
                    if row["status"] != "ok":
                        print(f"{j.key}: {row['status']}", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                row["wall_s"] = round(statistics.median(row["wall_runs_s"]), 2)
                res["rows"] = list(rows.values())
                res["meta"]["load_average_now"] = os.getloadavg()
                _finish(res, args.out, (str(work), args.venv_root))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["rows"] = list(rows.values())
    res["meta"]["load_average_end"] = os.getloadavg()
    res["meta"].pop("load_average_now", None)
    res["meta"]["code_end"] = source_fingerprint()
    if res["meta"]["code_end"] != res["meta"]["code"]:  # a shared tree: say so, the moequant rows may differ
        res["notes"].append(
            "the library sources changed during the run (code at the start and at the end differ)"
        )
    _finish(res, args.out, (str(work), args.venv_root))
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
