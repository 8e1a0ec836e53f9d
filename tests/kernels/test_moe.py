"""quantized_moe on the Triton path against the reference path: every width, mixed layers, act-order, routing
edge cases, group sizes against K tiles, GPT-OSS activations with biases, non-gated experts (relu2: up alone),
large T, the backend forced by the environment; and the interpreter child that runs the kernel cases on a CPU machine (see kernel_cases.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    CHILD_ENV,
    CHILD_PYTEST,
    GPT_OSS,
    MODE,
    REPO,
    keep_runnable,
    kernel_case,
    make_inputs,
    make_layer,
    run_both,
)

from moequant.arch.base import Activation
from moequant.kernels import KernelConfig, quantized_moe
from moequant.kernels.reference import moe_reference
from moequant.kernels.tuning import tiles

# the modules whose kernel cases the interpreter child runs
KERNEL_CASE_MODULES = [
    str(Path(__file__).with_name(f"test_{m}.py")) for m in ("sort", "gemm", "moe", "tiles")
]


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
def test_large_t_through_both_gemms(dev):
    """T = 65,536 tokens through the sorted path (tiny H, I): block and row index math at full size."""
    formats = [(3, 16, False, False)] * 2  # one format group: one launch per GEMM
    packed, *_ = make_layer(formats, seed=20, h=16, inter=16)
    x, _, w = make_inputs(65536, 2, 1, seed=20, h=16, index=torch.zeros(1, 1))
    idx = torch.randint(0, 2, (65536, 1), generator=torch.Generator().manual_seed(20)).to(dev)
    run_both(packed, x, idx, w, False, cfg=KernelConfig(direct=False, block_m=1024, block_n=16, block_k=32))


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


NON_GATED = [  # mixed widths, act-order, one expert outside the integer format
    (2, 32, False, False),
    (3, 16, True, False),
    None,
    (4, 16, False, True),
    (8, 16, True, False),
    (4, 32, False, False),
]


@kernel_case
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("direct", PATHS)
def test_non_gated_relu2(dev, direct, dtype, bias):
    """Non-gated experts (gate_up = up alone, [I, H] per expert; relu(up)^2): one accumulator over the I rows."""
    packed, _, _, b1, b2 = make_layer(NON_GATED, seed=23, bias=bias, gated=False)
    assert not packed.gated and packed.intermediate == 24
    assert {g.out_features for g in packed.gate_up} == {24}  # N = I, not 2I
    x, idx, w = make_inputs(11, len(NON_GATED), 2, seed=23, dtype=dtype)
    out, ref = run_both(packed, x, idx, w, direct, Activation.RELU2, None, b1, b2)
    assert ref.float().abs().max() > 0.1  # relu2 is not all zeros here: the comparison has something to see


@kernel_case
@pytest.mark.parametrize("direct", PATHS)
def test_non_gated_widths_differ_between_projections(dev, direct):
    """Non-gated up and down of one expert at different widths (down's launches scan a non-contiguous range)."""
    up = [(2, 32, False, False), (4, 16, True, False), None, (4, 16, True, False), (3, 32, False, False)]
    down = [(8, 16, False, False), (2, 32, True, False), None, (3, 16, False, False), (4, 32, True, False)]
    packed, *_ = make_layer(up, seed=24, down_formats=down, gated=False)
    x, idx, w = make_inputs(9, len(up), 3, seed=24)
    run_both(packed, x, idx, w, direct, Activation.RELU2)


@kernel_case
@pytest.mark.skipif(MODE != "cuda", reason="bf16 is computed wrongly by the Triton interpreter; needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("direct", PATHS)
def test_non_gated_bf16_on_gpu(dev, direct):
    packed, _, _, b1, b2 = make_layer(NON_GATED, seed=25, bias=True, gated=False)
    x, idx, w = make_inputs(33, len(NON_GATED), 2, seed=25, dtype=torch.bfloat16)
    run_both(packed, x, idx, w, direct, Activation.RELU2, None, b1, b2)


def test_non_gated_layout_checks_shapes_and_activation():
    """PackedMoE reads I from gate_up's rows by the layout it is told; quantized_moe refuses an activation whose
    gating differs from the layout's (a GLU would split up into halves and compute nonsense)."""
    from moequant.kernels import PackedMoE

    fmt = [(4, 16, False, False)] * 2
    packed, up, dn, _, _ = make_layer(fmt, seed=26, gated=False)  # up [24, 40], down [40, 24]
    assert (packed.hidden, packed.intermediate, packed.gated) == (40, 24, False)
    with pytest.raises(ValueError, match=r"do not match \[2I=24, H=40\] / \[H, I\] \(gated experts\)"):
        PackedMoE.from_experts(up, dn, 2)  # read as [gate; up]: I = 12, but down is [40, 24]
    gated, gate_up, dn2, _, _ = make_layer(fmt, seed=26)  # gate_up [48, 40], down [40, 24]
    with pytest.raises(ValueError, match=r"do not match \[I=48, H=40\] / \[H, I\] \(non-gated experts\)"):
        PackedMoE.from_experts(gate_up, dn2, 2, gated=False)
    x, idx, w = make_inputs(3, 2, 1, seed=26)
    with pytest.raises(ValueError, match="activation silu_glu is gated, .* laid out non-gated"):
        quantized_moe(x, idx, w, packed, Activation.SILU_GLU, backend="reference")
    with pytest.raises(ValueError, match="activation relu2 is non-gated, .* laid out gated"):
        quantized_moe(x, idx, w, gated, Activation.RELU2, backend="reference")


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEQUANT_KERNEL", CHILD_ENV)}
    return env | extra


def test_kernel_cases_under_interpreter():
    """Run the kernel cases of KERNEL_CASE_MODULES in a child pytest with TRITON_INTERPRET=1 set from the start."""
    if MODE == "interpreter":
        pytest.skip("this process already runs the kernel cases in the interpreter")
    proc = subprocess.run(
        CHILD_PYTEST + KERNEL_CASE_MODULES,
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


keep_runnable(globals())
