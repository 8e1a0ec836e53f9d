"""MoE kernels: the torch reference against a naive per-token loop (the definition), and the Triton
kernels against the reference on fresh random inputs (seeded per test) at small, odd shapes.

Where the kernel cases run (Triton fixes compiled-vs-interpreted when it is first imported, and
bitsandbytes imports it, so TRITON_INTERPRET=1 cannot be switched on inside a running test session):
    CUDA available            in this process on CUDA tensors (compiled), plus the interpreter child below
    TRITON_INTERPRET=1 set    in this process, interpreted, on CPU tensors
    otherwise (CPU CI)        this module re-runs itself in a child pytest with TRITON_INTERPRET=1 set
                              before anything is imported: `test_kernel_cases_under_interpreter`
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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moequant.arch.base import Activation, ExpertWeights, expert_forward
from moequant.kernels import KernelConfig, PackedMoE, quantized_moe
from moequant.kernels.backend import triton_interpreted
from moequant.kernels.reference import gemm1_reference, gemm2_reference, moe_align_reference, moe_reference
from moequant.kernels.tuning import tiles
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


@pytest.fixture
def dev(monkeypatch) -> torch.device:
    monkeypatch.delenv("MOEQUANT_KERNEL", raising=False)
    return DEVICE


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


def make_layer(formats, seed, h=H, inter=I, bias=False, down_formats=None):
    """formats[e] = (bits, group_size, sym, act_order) or None (expert kept outside the integer format)."""
    gen = torch.Generator().manual_seed(seed)
    down_formats = down_formats or formats
    gu = [None if f is None else packed_linear(2 * inter, h, *f, gen) for f in formats]
    dn = [None if f is None else packed_linear(h, inter, *f, gen) for f in down_formats]
    e = len(formats)
    b1 = torch.randn(e, 2 * inter, generator=gen) if bias else None
    b2 = torch.randn(e, h, generator=gen) * 0.1 if bias else None
    return PackedMoE.from_experts(gu, dn, e, device=DEVICE), gu, dn, _to(b1), _to(b2)


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


# ---- the reference is the definition ------------------------------------------------------------


@pytest.mark.parametrize("activation", [Activation.SILU_GLU, Activation.GPT_OSS_SWIGLU])
def test_reference_matches_naive_per_token_loop(activation):
    formats = [(4, 16, False, False), (3, 16, True, False), None, (2, 8, False, True), (8, 32, True, False)]
    bias = activation is Activation.GPT_OSS_SWIGLU
    params = GPT_OSS if bias else None
    packed, gu, dn, b1, b2 = make_layer(formats, seed=0, bias=bias)
    packed, b1, b2 = packed.to("cpu"), *(None if b is None else b.cpu() for b in (b1, b2))
    x, idx, w = (t.cpu() for t in make_inputs(9, len(formats), 3, seed=0, dtype=torch.float32))
    idx[0] = torch.tensor([1, 1, 2])  # duplicate expert and a non-packed one
    zeros_gu, zeros_dn = torch.zeros(2 * I, H), torch.zeros(H, I)
    dense = ExpertWeights(
        gate_up=torch.stack([zeros_gu if m is None else m.dequantize() for m in gu]),  # [E, 2I, H]
        down=torch.stack([zeros_dn if m is None else m.dequantize() for m in dn]),  # [E, H, I]
        gate_up_bias=b1,
        down_bias=b2,
    )
    naive = torch.zeros(9, H)
    for t in range(9):
        for j in range(3):
            e = int(idx[t, j])
            if formats[e] is not None:
                naive[t] += w[t, j] * expert_forward(dense, e, x[t : t + 1], activation, params)[0]
    ref = moe_reference(x, idx, w, packed, activation, params, b1, b2)
    torch.testing.assert_close(ref, naive, atol=1e-5, rtol=1e-5)


# ---- sorting ------------------------------------------------------------------------------------


def check_sorted(routing, idx, e2g, num_global):
    """Invariants of routing.py: every packed pair once, ascending within its expert, sentinel padding."""
    p = idx.numel()
    gid = e2g.long()[idx.reshape(-1).long()]
    starts = routing.block_start.long()
    ids = routing.sorted_ids.long()
    for g in range(num_global):
        rows = ids[starts[g] * routing.block_m : starts[g + 1] * routing.block_m]
        want = torch.nonzero(gid == g).flatten()
        assert torch.equal(rows[: want.numel()], want)
        assert (rows[want.numel() :] == p).all() and rows.numel() - want.numel() < routing.block_m


SORT_CASES = {
    "random": (dict(t=13, k=2, e=6), None),
    "one_expert": (dict(t=11, k=2, e=6), lambda t, k: torch.full((t, k), 3)),
    "empty_experts": (dict(t=9, k=2, e=6), lambda t, k: torch.randint(0, 2, (t, k))),
    "duplicates": (dict(t=7, k=3, e=6), lambda t, k: torch.tensor([[1, 1, 4]]).repeat(t, 1)),
    "t1": (dict(t=1, k=2, e=6), None),
    "many_chunks": (dict(t=300, k=4, e=40), None),
}


@kernel_case
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("case", list(SORT_CASES))
def test_sort_matches_reference(dev, case, block_m):
    from moequant.kernels import sort

    dims, index_fn = SORT_CASES[case]
    torch.manual_seed(block_m)
    t, k, e = dims["t"], dims["k"], dims["e"]
    idx = index_fn(t, k) if index_fn else torch.randint(0, e, (t, k))
    e2g = torch.arange(e, dtype=torch.int32)
    e2g[e // 2] = -1  # one expert not packed
    e2g[e // 2 + 1 :] -= 1
    num_global = e - 1
    ref = moe_align_reference(idx, e2g, num_global, block_m)
    out = sort.moe_align(idx.reshape(-1).to(dev), e2g.to(dev), num_global, block_m)
    assert torch.equal(out.block_start.cpu(), ref.block_start)
    used = int(ref.block_start[-1]) * block_m
    assert torch.equal(out.sorted_ids[:used].cpu(), ref.sorted_ids[:used])
    check_sorted(ref, idx, e2g, num_global)


@kernel_case
def test_sort_large_t_index_math(dev):
    """T = 65,536 tokens x top-8 (524,288 pairs): Triton sort equals the reference; invariants hold."""
    from moequant.kernels import sort

    t, k, e = 65536, 8, 8
    idx = torch.randint(0, e, (t, k), generator=torch.Generator().manual_seed(7))
    e2g = torch.arange(e, dtype=torch.int32)
    ref = moe_align_reference(idx, e2g, e, 64)
    out = sort.moe_align(idx.reshape(-1).to(dev), e2g.to(dev), e, 64)
    used = int(ref.block_start[-1]) * 64
    assert torch.equal(out.block_start.cpu(), ref.block_start)
    assert torch.equal(out.sorted_ids[:used].cpu(), ref.sorted_ids[:used])
    counts = torch.bincount(idx.reshape(-1), minlength=e)
    assert torch.equal(ref.block_start[1:].long() - ref.block_start[:-1].long(), (counts + 63) // 64)
    check_sorted(ref, idx, e2g, e)


# ---- GEMMs against the reference ----------------------------------------------------------------

PATHS = [pytest.param(True, id="direct"), pytest.param(False, id="sorted")]


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_each_width(dev, bits, sym, direct):
    formats = [(bits, 16, sym, False)] * 4 + [None]
    packed, *_ = make_layer(formats, seed=bits * 2 + sym)
    x, idx, w = make_inputs(6, len(formats), 2, seed=bits)
    run_both(packed, x, idx, w, direct)


MIXED = [
    (2, 32, False, False),
    (3, 16, True, False),
    (4, 32, False, False),
    None,
    (8, 16, True, False),
    (4, 32, False, False),
    (3, 32, False, False),
]


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_mixed_width_layer(dev, direct):
    packed, *_ = make_layer(MIXED, seed=11)
    assert sorted(g.bits for g in packed.gate_up) == [2, 3, 3, 4, 8]
    x, idx, w = make_inputs(10, len(MIXED), 3, seed=11)
    run_both(packed, x, idx, w, direct)


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_down_formats_differ_from_gate_up(dev, direct):
    """gate_up and down of one expert at different widths: down's launches scan a non-contiguous id range."""
    down = [(8, 16, False, False), (2, 32, True, False), None, (3, 16, False, False), (4, 32, True, False)]
    gu = [(2, 32, False, False), (4, 16, True, False), None, (4, 16, True, False), (2, 32, False, False)]
    packed, *_ = make_layer(gu, seed=12, down_formats=down)
    x, idx, w = make_inputs(8, len(gu), 2, seed=12)
    run_both(packed, x, idx, w, direct)


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_act_order_experts(dev, direct):
    formats = [(4, 16, False, True), (3, 8, True, True), (4, 16, False, False), (2, 32, False, True)]
    packed, *_ = make_layer(formats, seed=13)
    assert sum(g.act_order for g in packed.gate_up) == 3
    x, idx, w = make_inputs(7, len(formats), 2, seed=13)
    run_both(packed, x, idx, w, direct)


ROUTINGS = {
    "no_tokens_on_most": lambda t, k: torch.randint(0, 2, (t, k)),
    "all_on_one_expert": lambda t, k: torch.full((t, k), 2),
    "duplicate_indices": lambda t, k: torch.tensor([[0, 0, 5], [3, 3, 3], [1, 4, 1]]).repeat(t // 3 + 1, 1)[
        :t
    ],
    "only_unpacked": lambda t, k: torch.full((t, k), 4),
}


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_routing_edge_cases(dev, routing, direct):
    formats = [
        (4, 16, False, False),
        (3, 16, True, False),
        (4, 16, False, False),
        (8, 32, False, False),
        None,
        (2, 16, True, False),
    ]
    packed, *_ = make_layer(formats, seed=14)
    idx = ROUTINGS[routing](8, 3)
    x, idx, w = make_inputs(8, len(formats), 3, seed=14, index=idx)
    out, _ = run_both(packed, x, idx, w, direct)
    if routing == "only_unpacked":
        assert (out == 0).all()


@kernel_case
@pytest.mark.parametrize("t,direct", [(1, True), (1, False), (9, True), (37, False)])
def test_token_counts(dev, t, direct):
    formats = [(4, 16, False, False), (3, 32, True, False), (8, 16, False, False), (2, 16, False, False)]
    packed, *_ = make_layer(formats, seed=15)
    x, idx, w = make_inputs(t, len(formats), 2, seed=t)
    run_both(packed, x, idx, w, direct)


GROUP_CASES = {  # name: (group size, block_k, expect scale_after)
    "group_smaller_than_block": (16, 32, False),
    "group_equals_block": (32, 32, True),
    "group_multiple_of_block": (64, 32, True),
    "group_straddles_blocks": (48, 32, False),
    "group_larger_than_k": (128, 64, True),
}


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_group_size_vs_block_k(dev, case, direct):
    group, bk, scale_after = GROUP_CASES[case]
    h, inter = 72, 40  # K tiles: 72 = 2 x 32 + 8 (masked tail); N tiles partial
    formats = [(3, group, False, False), (4, group, True, False), (8, group, False, False)]
    packed, *_ = make_layer(formats, seed=16, h=h, inter=inter)
    cfg = KernelConfig(direct=direct, block_k=bk, block_n=16)
    t = tiles(direct=direct, block_m=16, n=inter, group_size=group, act_order=False, fused_glu=True, cfg=cfg)
    assert (t.block_k, t.scale_after) == (bk, scale_after)
    x, idx, w = make_inputs(3, len(formats), 2, seed=16, h=h)
    run_both(packed, x, idx, w, direct, cfg=cfg)


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_gpt_oss_activation_with_biases(dev, direct):
    formats = [(4, 16, False, False), None, (3, 16, True, False), (8, 32, False, False)]
    packed, _, _, b1, b2 = make_layer(formats, seed=17, bias=True)
    x, idx, w = make_inputs(6, len(formats), 2, seed=17)
    x = x * 4  # push some gate/up values past the clamp limit
    run_both(packed, x, idx, w, direct, Activation.GPT_OSS_SWIGLU, GPT_OSS, b1, b2)


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_fp32_activations(dev, direct):
    formats = [(4, 16, False, False), (3, 16, True, True), (2, 32, False, False), (8, 16, True, False)]
    packed, *_ = make_layer(formats, seed=18)
    x, idx, w = make_inputs(9, len(formats), 2, seed=18, dtype=torch.float32)
    run_both(packed, x, idx, w, direct)


@kernel_case
def test_each_kernel_matches_its_reference(dev):
    """gemm1 (fused activation) and gemm2 (routing weight) separately, on the sorted path."""
    from moequant.kernels import gemm, sort

    formats = [(4, 16, False, False), (3, 16, True, False), None, (8, 32, False, True)]
    packed, _, _, b1, b2 = make_layer(formats, seed=19, bias=True)
    x, idx, w = make_inputs(12, len(formats), 2, seed=19)
    topk = idx.reshape(-1)
    cfg = KernelConfig(direct=False)
    routing = sort.moe_align(topk, packed.expert_to_global, packed.num_global, 16)
    packed_pairs = packed.expert_to_global[topk] >= 0  # rows of non-packed pairs are never written
    act = torch.zeros(topk.numel(), I, dtype=x.dtype, device=dev)
    gemm.gemm1(x, act, topk, packed, routing, Activation.GPT_OSS_SWIGLU, GPT_OSS, b1, cfg)
    act_ref = gemm1_reference(x, idx, packed, Activation.GPT_OSS_SWIGLU, GPT_OSS, b1)
    torch.testing.assert_close(act.float()[packed_pairs], act_ref[packed_pairs], atol=1e-2, rtol=1e-2)
    out = torch.zeros(topk.numel(), H, device=dev)
    gemm.gemm2(act, out, w.reshape(-1), topk, packed, routing, b2, cfg)
    out_ref = gemm2_reference(act, idx, w, packed, b2)
    torch.testing.assert_close(out, out_ref, atol=1e-3, rtol=1e-3)


@kernel_case
def test_large_t_through_both_gemms(dev):
    """T = 65,536 tokens through the sorted path (tiny H, I): block and row index math at full size."""
    formats = [(3, 16, False, False)] * 2  # one format group: one launch per GEMM
    packed, *_ = make_layer(formats, seed=20, h=16, inter=16)
    x, _, w = make_inputs(65536, 2, 1, seed=20, h=16, index=torch.zeros(1, 1))
    idx = torch.randint(0, 2, (65536, 1), generator=torch.Generator().manual_seed(20)).to(dev)
    run_both(packed, x, idx, w, False, cfg=KernelConfig(direct=False, block_m=1024, block_n=16, block_k=32))


# ---- the backend forced by the environment, the interpreter child ----------------------------------


@kernel_case
def test_env_var_forces_triton(dev, monkeypatch):
    """MOEQUANT_KERNEL=triton makes quantized_moe run the kernels (on CPU: the interpreter), never the reference."""
    import moequant.kernels.moe as moe

    packed, *_ = make_layer([(4, 16, False, False), (3, 16, True, False)], seed=21)
    x, idx, w = make_inputs(3, 2, 1, seed=21)
    ref = moe_reference(x, idx, w, packed, Activation.SILU_GLU)
    monkeypatch.setenv("MOEQUANT_KERNEL", "triton")
    monkeypatch.setattr(moe, "moe_reference", lambda *a, **kw: pytest.fail("reference path taken"))
    y = quantized_moe(x, idx, w, packed, Activation.SILU_GLU)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=1e-2)


@kernel_case
@pytest.mark.skipif(MODE != "cuda", reason="bf16 is computed wrongly by the Triton interpreter; needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("direct", PATHS)
def test_bf16_activations_on_gpu(dev, direct):
    packed, _, _, b1, b2 = make_layer(MIXED, seed=22, bias=True)
    x, idx, w = make_inputs(33, len(MIXED), 2, seed=22, dtype=torch.bfloat16)
    run_both(packed, x, idx, w, direct, Activation.GPT_OSS_SWIGLU, GPT_OSS, b1, b2)


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEQUANT_KERNEL", CHILD_ENV)}
    return env | extra


def test_kernel_cases_under_interpreter():
    """Run this module's kernel cases in a child pytest with TRITON_INTERPRET=1 set from the start."""
    if MODE == "interpreter":
        pytest.skip("this process already runs the kernel cases in the interpreter")
    proc = subprocess.run(
        CHILD_PYTEST + [__file__],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=_child_env(TRITON_INTERPRET="1", **{CHILD_ENV: "1"}),
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"interpreter child: {summary}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert " passed" in summary and "failed" not in summary, summary


# Collect what this process can run: the child runs only the kernel cases; a CPU process that cannot
# interpret Triton leaves them to the child (test_kernel_cases_under_interpreter).
for _name, _fn in list(globals().items()):
    if _name.startswith("test_") and callable(_fn):
        if (MODE == "delegate" and getattr(_fn, "kernel_case", False)) or (
            MODE == "interpreter"
            and os.environ.get(CHILD_ENV) == "1"
            and not getattr(_fn, "kernel_case", False)
        ):
            del globals()[_name]
