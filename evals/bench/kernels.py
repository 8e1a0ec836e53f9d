"""Benchmark of the quantized MoE kernels on one GPU (H100 / H200), against the bandwidth floor and bf16.

    python -m moequant.evals.bench.kernels                       # full table, written to evals/results/
    python -m moequant.evals.bench.kernels --shapes qwen3 --batches 1,16 --formats int4,mixed --sweep

For every (layer shape, batch, format):
    time      median over many CUDA-graph replays of one layer forward, L2 flushed before each replay
    floor     bytes of the touched experts' packed weights + scales/zeros (touched = experts the actual
              routing hits) over the device-to-device copy bandwidth measured in the same run
    % floor   floor / time (decode target: >= 75% for batch <= 16)
    vs bf16   bf16 time / time; bf16 = the faster of torch grouped_mm and a per-expert cuBLAS loop
              (targets: int4 at batch 1 >= 3.3x; 4096-token prefill: time <= 1.3x bf16)
    vs bytes  mixed layers: time / (time the layer's bytes predict at the uniform int4 layer's achieved
              bandwidth) (target <= 1)
    max err   max |kernel - torch reference| / max |reference|

Without a CUDA device the script exits with a message: CPU interpreter timings are not performance numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moequant.arch.base import Activation
from moequant.kernels import KernelConfig, PackedMoE, quantized_moe
from moequant.kernels.reference import moe_reference
from moequant.quantizers.packed import PackedLinear
from moequant.quantizers.packing import packed_rows

SHAPES = {  # name: (hidden H, intermediate I, experts E, top-k)
    "mixtral": (4096, 14336, 8, 2),  # Mixtral-8x7B layer
    "qwen3": (2048, 768, 128, 8),  # Qwen3-30B-A3B layer (fine-grained)
}
BATCHES = (1, 4, 16, 64, 256, 4096)
FORMATS = {  # name: (bits, group_size, sym) for every expert, or None for the mixed layer
    "int4": (4, 128, False),
    "int3": (3, 128, False),
    "int2": (2, 128, False),
    "int8": (8, 128, True),
    "mixed": None,
}
MIXED_CYCLE = [(2, 128, False), (3, 128, False), (4, 128, False), (8, 128, True)]  # expert e gets [e % 4]
SWEEP = [
    KernelConfig(direct=True, block_n=32),
    KernelConfig(direct=True, block_n=64),
    KernelConfig(direct=True, block_n=64, block_k=256),
    KernelConfig(direct=False, block_m=16),
    KernelConfig(direct=False, block_m=32),
    KernelConfig(direct=False, block_m=64),
    KernelConfig(direct=False, block_m=64, block_n=128, num_stages=4),
]


# ---- bytes and FLOPs first ----------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What one layer forward must move and compute, from the actual routing."""

    touched_experts: int
    weight_bytes: int  # packed codes + scales + zeros (+ g_idx) of the touched experts, both projections
    act_bytes: int  # x read, act written and read, weighted outputs written and read, y written
    flops: int  # 2 * pairs * (H * 2I + I * H)
    bf16_weight_bytes: int  # the same experts in bf16


def traffic(packed: PackedMoE, top_k_index: torch.Tensor, x_dtype: torch.dtype = torch.bfloat16) -> Traffic:
    hit = torch.unique(top_k_index.reshape(-1)).tolist()
    touched = [e for e in hit if packed.is_packed(e)]
    h, i = packed.hidden, packed.intermediate
    pairs = int(sum(int((top_k_index == e).sum()) for e in touched))
    t = top_k_index.shape[0]
    xb = torch.finfo(x_dtype).bits // 8
    act = t * h * xb + pairs * i * xb * 2 + pairs * h * 4 * 2 + t * h * xb
    return Traffic(
        touched_experts=len(touched),
        weight_bytes=sum(packed.expert_nbytes(e) for e in touched),
        act_bytes=act,
        flops=2 * pairs * (h * 2 * i + i * h),
        bf16_weight_bytes=len(touched) * 3 * h * i * 2,
    )


def floor_seconds(tr: Traffic, bandwidth: float) -> float:
    """The issue's floor: touched experts' packed weights and scales over the measured copy bandwidth."""
    return tr.weight_bytes / bandwidth


# ---- layers and routing -------------------------------------------------------------------------


def random_packed(
    n: int, k: int, bits: int, group_size: int, sym: bool, gen: torch.Generator, device
) -> PackedLinear:
    """Random codes straight in packed form (any bit pattern is valid), scales ~ 1/sqrt(K)."""
    g = math.ceil(k / group_size)
    words = torch.randint(-(2**31), 2**31, (packed_rows(k, bits), n), generator=gen, dtype=torch.int64)
    scales = (torch.rand(g, n, generator=gen) + 0.5) / ((1 << (bits - 1)) * math.sqrt(k / 3))
    zeros = None if sym else torch.randint(0, 1 << bits, (g, n), generator=gen, dtype=torch.uint8)
    return PackedLinear(
        qweight=words.to(torch.int32).to(device),
        scales=scales.to(torch.float16).to(device),
        qzeros=None if zeros is None else zeros.to(device),
        g_idx=None,
        bits=bits,
        group_size=group_size,
        in_features=k,
        out_features=n,
    )


def build_layer(shape: str, fmt: str, device, seed: int = 0) -> PackedMoE:
    h, i, e, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    specs = [FORMATS[fmt] or MIXED_CYCLE[x % len(MIXED_CYCLE)] for x in range(e)]
    gu = [random_packed(2 * i, h, *s, gen, device) for s in specs]
    dn = [random_packed(h, i, *s, gen, device) for s in specs]
    return PackedMoE.from_experts(gu, dn, e, device=device)


def routing(shape: str, batch: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k of random router logits (scale 2: non-uniform load, as in trained routers)."""
    _, _, e, k = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed + batch)
    logits = torch.randn(batch, e, generator=gen) * 2.0
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return idx.to(device), (w / w.sum(-1, keepdim=True)).to(device)


# ---- bf16 baselines -----------------------------------------------------------------------------


def dense_weights(packed: PackedMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [E, 2I, H] and [E, H, I] holding the packed experts' dequantized weights."""
    e, h, i = packed.num_experts, packed.hidden, packed.intermediate
    dev = packed.device
    gu = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, device=dev)
    dn = torch.empty(e, h, i, dtype=torch.bfloat16, device=dev)
    for g in packed.gate_up:
        for s, ex in enumerate(g.experts):
            gu[ex] = g.dequantize(s).to(torch.bfloat16)
    for g in packed.down:
        for s, ex in enumerate(g.experts):
            dn[ex] = g.dequantize(s).to(torch.bfloat16)
    return gu, dn


def bf16_grouped_mm(x, idx, w, gu, dn) -> torch.Tensor:
    """bf16 MoE with torch grouped_mm: sort pairs by expert, two grouped GEMMs, weighted fixed-order sum."""
    t, k = idx.shape
    e = gu.shape[0]
    flat = idx.reshape(-1)  # [P]
    order = torch.argsort(flat, stable=True)  # [P]
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
    xs = x[order // k]  # [P, H]
    h = F.grouped_mm(xs, gu.transpose(1, 2), offs=offs)  # [P, 2I]
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up  # [P, I]
    o = F.grouped_mm(a, dn.transpose(1, 2), offs=offs)  # [P, H]
    out = torch.empty(t * k, gu.shape[2], dtype=torch.float32, device=x.device)
    out[order] = o.float() * w.reshape(-1)[order, None]
    return out.view(t, k, -1).sum(1).to(x.dtype)


def bf16_loop(x, idx, w, gu, dn) -> Callable[[], torch.Tensor]:
    """bf16 MoE as a per-expert cuBLAS loop; routing known on the host up front (generous to bf16)."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    groups = [(ex, torch.nonzero(flat == ex).flatten()) for ex in torch.unique(flat).tolist()]

    def run():
        out = torch.zeros(t * k, gu.shape[2], dtype=torch.float32, device=x.device)
        for ex, pairs in groups:
            hh = x[pairs // k] @ gu[ex].T
            gate, up = hh.chunk(2, dim=-1)
            out[pairs] = ((F.silu(gate) * up) @ dn[ex].T).float() * w.reshape(-1)[pairs, None]
        return out.view(t, k, -1).sum(1).to(x.dtype)

    return run


# ---- timing -------------------------------------------------------------------------------------


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 20."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def time_graph(fn: Callable[[], object], flush: torch.Tensor, budget_s: float = 2.0) -> float:
    """Median seconds of one CUDA-graph replay of fn, with the L2 flushed (flush buffer written) before each."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the graph
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    torch.cuda.synchronize()
    reps = int(min(1000, max(20, budget_s / max(a.elapsed_time(b) / 1e3, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True))


# ---- the table ----------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    batch: int
    format: str
    path: str
    time_us: float
    touched: int
    weight_mb: float
    floor_us: float
    pct_floor: float
    achieved_gbs: float
    bf16_us: float
    vs_bf16: float
    vs_bytes: float | None
    tflops: float
    max_rel_err: float


def bench_one(shape, fmt, batch, packed, dense, bw, flush, args, int4_gbs) -> Row:
    h = SHAPES[shape][0]
    idx, w = routing(shape, batch, "cuda")
    x = torch.randn(batch, h, device="cuda", generator=torch.Generator("cuda").manual_seed(batch)).to(
        torch.bfloat16
    )
    tr = traffic(packed, idx)
    configs = SWEEP if args.sweep else [None]
    best_t, best_cfg = math.inf, None
    for cfg in configs:
        t = time_graph(
            lambda cfg=cfg: quantized_moe(
                x, idx, w, packed, Activation.SILU_GLU, backend="triton", config=cfg
            ),
            flush,
        )
        if t < best_t:
            best_t, best_cfg = t, cfg
    y = quantized_moe(x, idx, w, packed, Activation.SILU_GLU, backend="triton", config=best_cfg)
    ref = moe_reference(x.float(), idx, w, packed, Activation.SILU_GLU)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    gu, dn = dense
    bf16 = [time_graph(bf16_loop(x, idx, w, gu, dn), flush)]
    if hasattr(F, "grouped_mm"):
        try:
            bf16.append(time_graph(lambda: bf16_grouped_mm(x, idx, w, gu, dn), flush))
        except RuntimeError as exc:  # grouped_mm shape/arch restrictions
            print(f"  grouped_mm unavailable here: {exc}", file=sys.stderr)
    bf16_t = min(bf16)
    floor = floor_seconds(tr, bw)
    predicted = tr.weight_bytes / int4_gbs / 1e9 if (fmt == "mixed" and int4_gbs) else None
    path = "default" if best_cfg is None else _cfg_name(best_cfg)
    return Row(
        shape=shape,
        batch=batch,
        format=fmt,
        path=path,
        time_us=best_t * 1e6,
        touched=tr.touched_experts,
        weight_mb=tr.weight_bytes / 1e6,
        floor_us=floor * 1e6,
        pct_floor=100 * floor / best_t,
        achieved_gbs=tr.weight_bytes / best_t / 1e9,
        bf16_us=bf16_t * 1e6,
        vs_bf16=bf16_t / best_t,
        vs_bytes=None if predicted is None else best_t / predicted,
        tflops=tr.flops / best_t / 1e12,
        max_rel_err=err,
    )


def _cfg_name(cfg: KernelConfig) -> str:
    parts = ["direct" if cfg.direct else f"sorted m{cfg.block_m}"]
    parts += [
        f"{k[6:]}{v}" for k, v in asdict(cfg).items() if k.startswith("block_") and k != "block_m" and v
    ]
    return " ".join(parts)


def markdown(rows: list[Row], meta: dict) -> str:
    lines = [f"# Kernel benchmark, {meta['device']}, {meta['date']}", "", f"Command: `{meta['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("device", "date", "command")]
    lines += [
        "",
        "| shape | batch | format | path | time us | touched | MB | floor us | % floor | GB/s | bf16 us | vs bf16 | vs bytes | TFLOP/s | max rel err |",
    ]
    lines += ["|" + "---|" * 15]
    for r in rows:
        vb = "" if r.vs_bytes is None else f"{r.vs_bytes:.2f}"
        lines.append(
            f"| {r.shape} | {r.batch} | {r.format} | {r.path} | {r.time_us:.1f} | {r.touched} | {r.weight_mb:.1f} | "
            f"{r.floor_us:.1f} | {r.pct_floor:.0f} | {r.achieved_gbs:.0f} | {r.bf16_us:.1f} | {r.vs_bf16:.2f} | {vb} | "
            f"{r.tflops:.1f} | {r.max_rel_err:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sweep", action="store_true", help="try the SWEEP launch configs, report the best")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA device found. This benchmark measures GPU kernels (H100/H200); "
            "CPU interpreter timings are not performance numbers, so nothing was measured or written.",
            file=sys.stderr,
        )
        return 2
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference stays fp32
    bw = copy_bandwidth()
    flush = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")  # 512 MB >> L2 (50 MB H100, 60 MB H200)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m moequant.evals.bench.kernels "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "copy bandwidth (GB/s)": f"{bw / 1e9:.0f}",
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}",
        "activations": "bf16, SiLU-GLU, routing = softmax top-k of N(0, 4) logits, seeded",
    }
    print(f"device {meta['device']}, copy bandwidth {bw / 1e9:.0f} GB/s", file=sys.stderr)
    rows: list[Row] = []
    formats = args.formats.split(",")
    formats = [f for f in formats if f != "mixed"] + (["mixed"] if "mixed" in formats else [])  # int4 first
    for shape in args.shapes.split(","):
        int4_gbs: dict[int, float] = {}
        for fmt in formats:
            packed = build_layer(shape, fmt, "cuda")
            dense = dense_weights(packed)
            for batch in map(int, args.batches.split(",")):
                row = bench_one(shape, fmt, batch, packed, dense, bw, flush, args, int4_gbs.get(batch))
                if fmt == "int4":
                    int4_gbs[batch] = row.achieved_gbs
                rows.append(row)
                print(markdown([row], meta).splitlines()[-1], file=sys.stderr)
            del packed, dense
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_kernels_{meta['device'].replace(' ', '_')}_{now.strftime('%Y%m%d_%H%M')}"
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
