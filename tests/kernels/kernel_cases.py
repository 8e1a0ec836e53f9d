"""Shared by the MoE kernel tests (test_reference, test_sort, test_gemm, test_moe, test_tiles): random packed
layers and inputs, the comparison with the reference, and where the Triton kernel cases run.

The torch reference is checked against a naive per-token loop (the definition), and the Triton kernels against
the reference on fresh random inputs (seeded per test) at small, odd shapes.

Where the kernel cases run (Triton fixes compiled-vs-interpreted when it is first imported, and
bitsandbytes imports it, so TRITON_INTERPRET=1 cannot be switched on inside a running test session):
    CUDA available            in this process on CUDA tensors (compiled), plus the interpreter child below
    TRITON_INTERPRET=1 set    in this process, interpreted, on CPU tensors
    otherwise (CPU CI)        the kernel-case modules re-run in a child pytest with TRITON_INTERPRET=1 set
                              before anything is imported: test_moe.test_kernel_cases_under_interpreter
The interpreter computes bf16 wrongly: interpreter cases use fp16 and fp32 activations (bf16 on CUDA).

Tolerances (outputs are O(1) by construction of the scales; rms = root mean square of the reference):
    reference vs naive loop, fp32:     atol = rtol = 1e-5
    kernels vs reference, fp16 x:      atol = 2e-2 * rms, rtol = 2e-2  (fp16 weight tiles, act and output)
    kernels vs reference, bf16 x:      atol = 5e-2 * rms, rtol = 5e-2  (CUDA only)
    kernels vs reference, fp32 x:      atol = 1e-4 * rms, rtol = 1e-4
The 64-bit offsets (T x top_k x 2I past 2**31) cannot be reached on CPU; the large-T tests run the
sort at T = 65,536 x top-8 and both GEMMs at T = 65,536 with tiny H, I.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

from moequant.arch.base import Activation
from moequant.kernels import KernelConfig, PackedMoE, quantized_moe
from moequant.kernels.backend import triton_interpreted
from moequant.quantizers.packed import PackedLinear

H, I = 40, 24  # not multiples of any block size: last K tile and last N tile are partial
GPT_OSS = {"alpha": 1.702, "limit": 7.0}
TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}  # atol = TOL * rms, rtol = TOL
CHILD_ENV = "MOEQUANT_KERNEL_TESTS_CHILD"  # set in the interpreter child process
CHILD_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning"]
REPO = Path(__file__).resolve().parents[2]

if os.environ.get(CHILD_ENV) == "1" or (triton_interpreted() and os.environ.get("TRITON_INTERPRET")):
    MODE, DEVICE = "interpreter", torch.device("cpu")
elif torch.cuda.is_available():
    MODE, DEVICE = "cuda", torch.device("cuda")
else:
    MODE, DEVICE = "delegate", torch.device("cpu")  # kernel cases run in the interpreter child


def kernel_case(fn):
    """Mark a test that launches Triton kernels (runs where MODE allows, see module docstring)."""
    fn.kernel_case = True
    return fn


# ---- random layers ------------------------------------------------------------------------------


def packed_linear(n, k, bits, group_size, sym, act_order, gen) -> PackedLinear:
    g = math.ceil(k / group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    # scales make (code - zero) * scale ~ 1/sqrt(k), so products stay O(1)
    scales = (torch.rand(n, g, generator=gen) + 0.5) / ((1 << (bits - 1)) * math.sqrt(k / 3))
    zeros = None if sym else torch.randint(0, 1 << bits, (n, g), generator=gen)
    g_idx = None
    if act_order:  # GPTQ act-order: every group has group_size channels, scattered over K
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return PackedLinear.from_codes(codes, scales, zeros, bits, group_size, g_idx)


def make_layer(formats, seed, h=H, inter=I, bias=False, down_formats=None, gated=True):
    """formats[e] = (bits, group_size, sym, act_order) or None (expert kept outside the integer format).
    gated: gate_up holds [gate; up] (2I rows); False: up alone (I rows), a non-gated activation's layout."""
    gen = torch.Generator().manual_seed(seed)
    down_formats = down_formats or formats
    rows = 2 * inter if gated else inter
    gu = [None if f is None else packed_linear(rows, h, *f, gen) for f in formats]
    dn = [None if f is None else packed_linear(h, inter, *f, gen) for f in down_formats]
    e = len(formats)
    b1 = torch.randn(e, rows, generator=gen) if bias else None
    b2 = torch.randn(e, h, generator=gen) * 0.1 if bias else None
    packed = PackedMoE.from_experts(gu, dn, e, device=DEVICE, gated=gated)
    return packed, gu, dn, _to(b1), _to(b2)


def _to(t):
    return None if t is None else t.to(DEVICE)


def make_inputs(t, e, k, seed, dtype=torch.float16, h=H, index=None):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, h, generator=gen).to(dtype)
    if index is None:
        index = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])  # distinct per token
    weights = torch.rand(t, k, generator=gen).softmax(-1)
    return x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)


def run_both(
    packed, x, idx, w, direct, activation=Activation.SILU_GLU, params=None, b1=None, b2=None, cfg=None
):
    cfg = cfg or KernelConfig(direct=direct)
    ref = quantized_moe(x, idx, w, packed, activation, params, b1, b2, backend="reference")
    out = quantized_moe(x, idx, w, packed, activation, params, b1, b2, backend="triton", config=cfg)
    assert out.dtype == x.dtype and out.shape == x.shape
    tol = TOL[x.dtype]
    scale = ref.float().pow(2).mean().sqrt().item() if ref.numel() else 1.0  # rms of the output
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)
    return out, ref


def keep_runnable(module_globals: dict) -> None:
    """Collect what this process can run (call it at the end of a module with kernel cases): the child runs only
    the kernel cases; a CPU process that cannot interpret Triton leaves them to the child."""
    for _name, _fn in list(module_globals.items()):
        if _name.startswith("test_") and callable(_fn):
            if (MODE == "delegate" and getattr(_fn, "kernel_case", False)) or (
                MODE == "interpreter"
                and os.environ.get(CHILD_ENV) == "1"
                and not getattr(_fn, "kernel_case", False)
            ):
                del module_globals[_name]
