"""Each Triton GEMM against its torch reference (kernel case: see kernel_cases.py for where it runs)."""

import pytest
import torch
from kernel_cases import GPT_OSS, H, I, keep_runnable, kernel_case, make_inputs, make_layer

from moequant.arch.base import Activation
from moequant.kernels import KernelConfig
from moequant.kernels.reference import gemm1_reference, gemm2_reference


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
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "sorted"])
def test_non_gated_gemm1_matches_its_reference(dev, direct):
    """Non-gated gemm1 (up alone, [I, H] per expert, relu2 epilogue, bias [E, I]) on both paths, act rows
    compared directly: a kernel that read gate columns, offset up by I or applied a GLU would fail."""
    from moequant.kernels import gemm, sort

    formats = [(4, 16, False, False), (3, 16, True, False), None, (8, 32, False, True), (2, 16, False, False)]
    packed, _, _, b1, _ = make_layer(formats, seed=27, bias=True, gated=False)
    assert b1.shape == (len(formats), I)
    x, idx, _ = make_inputs(10, len(formats), 2, seed=27, dtype=torch.float32)
    topk = idx.reshape(-1)
    cfg = KernelConfig(direct=direct)
    routing = None if direct else sort.moe_align(topk, packed.expert_to_global, packed.num_global, 16)
    packed_pairs = packed.expert_to_global[topk] >= 0
    act = torch.zeros(topk.numel(), I, dtype=x.dtype, device=dev)
    gemm.gemm1(x, act, topk, packed, routing, Activation.RELU2, None, b1, cfg)
    act_ref = gemm1_reference(x, idx, packed, Activation.RELU2, None, b1)
    assert (act_ref >= 0).all() and (act_ref[packed_pairs] == 0).float().mean() > 0.2  # relu clipped some
    torch.testing.assert_close(act[packed_pairs], act_ref[packed_pairs], atol=1e-4, rtol=1e-4)


def test_gemm1_refuses_an_activation_the_layout_does_not_hold():
    from moequant.kernels import gemm

    packed, *_ = make_layer([(4, 16, False, False)] * 2, seed=28, gated=False)
    x, idx, _ = make_inputs(2, 2, 1, seed=28)
    act = torch.zeros(2, I, dtype=x.dtype)
    for activation in (Activation.SILU_GLU, Activation.MODULE_UNGATED):
        with pytest.raises(ValueError, match="gemm1 runs"):
            gemm.gemm1(x, act, idx.reshape(-1), packed, None, activation, None, None, KernelConfig())


keep_runnable(globals())
