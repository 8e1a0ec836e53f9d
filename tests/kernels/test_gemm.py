"""Each Triton GEMM against its torch reference (kernel case: see kernel_cases.py for where it runs)."""

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


keep_runnable(globals())
