"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without one.

Triton ships ptxas, so every launch `quantized_moe` would make can be compiled to a cubin for sm_90
here: this catches what the CPU interpreter cannot (lowering failures, register spills, shared
memory over the limit). It does not run anything and says nothing about speed or GPU numerics.

    python -m moequant.kernels.aot            # every width/format/path/dtype variant, sm_90
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moequant.arch.base import Activation
from moequant.kernels.backend import record_launches, triton_interpreted
from moequant.kernels.layout import PackedMoE
from moequant.kernels.tuning import KernelConfig
from moequant.quantizers.packed import PackedLinear

logger = logging.getLogger(__name__)

_PTR = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.uint8: "*u8",
}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    constants: str
    n_regs: int
    n_spills: int  # local-memory bytes per thread
    shared: int


def _signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    sig, const = {}, {}
    params = {p.name: p for p in kernel.params}
    values = dict(zip(kernel.arg_names, args, strict=False)) | {
        k: v for k, v in kwargs.items() if k in params
    }
    for name in kernel.arg_names:
        v = values[name]
        if params[name].is_constexpr:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={v!r}")
    return sig, const


def compile_launches(records: list[tuple], arch: int = 90) -> list[Compiled]:
    """Compile every recorded launch for CUDA sm_<arch>; raises on the first failure."""
    if triton_interpreted():
        raise RuntimeError("ahead-of-time compilation needs triton in compiled mode: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    out, seen = [], set()
    for kernel, _grid, args, kwargs in records:
        sig, const = _signature(kernel, args, kwargs)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = (
            kernel.__name__,
            tuple(sorted((k, str(v)) for k, v in const.items())),
            tuple(sorted(opts.items())),
        )
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(fn=kernel, signature=sig, constexprs=const)
        ccinfo = triton.compile(src, target=target, options=backend.parse_options(opts).__dict__)
        regs, local = _resource_usage(ccinfo.asm["cubin"])
        out.append(
            Compiled(
                kernel=kernel.__name__,
                constants=" ".join(f"{k}={v}" for k, v in const.items()),
                n_regs=regs,
                n_spills=local,
                shared=ccinfo.metadata.shared,
            )
        )
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread: spills) of a cubin, read with cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else -1, int(local.group(1)) if local else -1)


def _packed_linear(n: int, k: int, bits: int, group_size: int, sym: bool, act_order: bool) -> PackedLinear:
    g = (k + group_size - 1) // group_size
    codes = torch.randint(0, 1 << bits, (n, k))
    zeros = None if sym else torch.randint(0, 1 << bits, (n, g))
    g_idx = (torch.arange(k) // group_size).flip(0).to(torch.int32) if act_order else None
    return PackedLinear.from_codes(codes, torch.rand(n, g) + 0.5, zeros, bits, group_size, g_idx)


def record_layer(
    formats: list[tuple[int, int, bool, bool]],
    *,
    hidden: int = 256,
    inter: int = 192,
    tokens: int = 64,
    top_k: int = 2,
    dtype: torch.dtype = torch.float16,
    activation: Activation = Activation.SILU_GLU,
    bias: bool = False,
    config: KernelConfig | None = None,
) -> list[tuple]:
    """Launches one `quantized_moe` call makes for a layer with one expert per format (nothing runs)."""
    from moequant.kernels.moe import _triton_moe

    e = len(formats)
    rows = activation.in_rows(inter)  # gate_up rows: 2I gated, I non-gated
    gu = [_packed_linear(rows, hidden, *f) for f in formats]
    dn = [_packed_linear(hidden, inter, *f) for f in formats]
    packed = PackedMoE.from_experts(gu, dn, e, gated=activation.gated)
    x = torch.randn(tokens, hidden).to(dtype)
    idx = torch.randint(0, e, (tokens, top_k))
    w = torch.rand(tokens, top_k)
    b1 = torch.randn(e, rows) if bias else None
    b2 = torch.randn(e, hidden) if bias else None
    params = {"alpha": 1.702, "limit": 7.0} if activation is Activation.GPT_OSS_SWIGLU else None
    with record_launches() as records:
        _triton_moe(x, idx, w, packed, activation, params, b1, b2, config)
    return records


def quick_variants() -> list[tuple]:
    """A few representative launches: 3-bit straddles, act-order, both paths, fp16 and bf16, the sort, and the
    non-gated gemm1 (relu2) on both paths."""
    records = record_layer([(3, 48, False, False), (4, 128, False, True)], config=KernelConfig(direct=True))
    records += record_layer(
        [(3, 128, True, False), (2, 32, False, False)],
        tokens=256,
        dtype=torch.bfloat16,
        config=KernelConfig(direct=False),
    )
    for direct in (True, False):
        records += record_layer(
            [(4, 128, False, False), (3, 128, True, False)],
            tokens=256,
            dtype=torch.bfloat16,
            activation=Activation.RELU2,
            config=KernelConfig(direct=direct),
        )
    return records


def all_variants() -> list[tuple]:
    """Launch records covering widths x sym x act-order x group/tile relations x paths x dtypes."""
    records = []
    formats = [
        (b, g, s, a)
        for b, s in itertools.product((2, 3, 4, 8), (True, False))
        for g, a in ((128, False), (48, False))
    ]
    formats += [(4, 128, False, True), (3, 32, True, True)]
    for direct, dtype in itertools.product((True, False), (torch.float16, torch.bfloat16)):
        records += record_layer(formats, dtype=dtype, config=KernelConfig(direct=direct))
    records += record_layer(
        [(4, 128, False, False)], activation=Activation.GPT_OSS_SWIGLU, bias=True, tokens=256
    )
    for direct, dtype in itertools.product((True, False), (torch.float16, torch.bfloat16)):
        records += record_layer(
            formats, dtype=dtype, activation=Activation.RELU2, config=KernelConfig(direct=direct)
        )
    for bm in (64, 128):
        records += record_layer(
            [(4, 128, False, False), (3, 128, False, False)], tokens=4096, config=KernelConfig(block_m=bm)
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="a few representative variants only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compile_launches(quick_variants() if args.quick else all_variants(), arch=args.arch)
    for r in results:
        logger.info(
            "%-14s regs %3d spills %4d smem %6d  %s", r.kernel, r.n_regs, r.n_spills, r.shared, r.constants
        )
    spilled = [r for r in results if r.n_spills]
    logger.info(
        "%d kernels compiled for sm_%d, %d with register spills", len(results), args.arch, len(spilled)
    )


if __name__ == "__main__":
    main()
