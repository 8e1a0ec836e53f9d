"""The probe's experts stand-in (ChunkedExperts) against the real experts module: outputs and gradients, experts
sliced from memory or read a chunk at a time from disk, rounded or not."""

import pytest
import torch

from moequant.arch.tiny import save_tiny
from moequant.checkpoint.source import open_source
from moequant.plan.probe import rtn_swapped
from moequant.plan.probe_experts import ChunkedExperts, Rounding


def _routing(ref, T, seed):
    g = torch.Generator().manual_seed(seed)
    E, k = ref.num_experts, ref.top_k or 2
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct experts
    w = torch.rand(T, k, generator=g)  # [T, k]
    return idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_chunked_experts_match_the_module_forward_and_backward(tmp_path, model_type):
    """Outputs and the gradients with respect to the hidden states and the routing weights equal autograd
    through transformers' own experts module, for experts sliced from memory and read 3 at a time from disk."""
    model = save_tiny(model_type, tmp_path, seed=1)  # float32 on disk: both readers see the same weights
    mem = open_source(model)
    lazy = open_source(str(tmp_path), lazy_experts=True)
    ref = mem.blocks[0]
    hidden, inter = mem.arch.expert_dims(ref.experts)
    T = 40
    idx, w0 = _routing(ref, T, seed=0)
    x0 = torch.randn(T, hidden, generator=torch.Generator().manual_seed(1))  # [T, H]
    g = torch.randn(T, hidden, generator=torch.Generator().manual_seed(2))  # [T, H] upstream gradient

    def run(module):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = module(x, idx, w)  # [T, H]
        gx, gw = torch.autograd.grad(y, (x, w), g)
        return y.detach(), gx, gw

    want = run(ref.experts)
    lazy.load_layer(ref.layer_idx)
    chunk_mb = 3.5 * 4 * 3 * hidden * inter / 2**20  # 3 experts a read
    rows = mem.arch.activation.in_rows(inter)
    some_kept = 4 * rows * T * 0.7 / 2**20  # the forward keeps the pre-activations of some experts, not all
    for source in (mem, lazy):
        for keep_mb in (0.0, some_kept, 1e4):
            got = run(ChunkedExperts(source, source.arch, source.blocks[0], chunk_mb, keep_mb=keep_mb))
            for a, b, name in zip(got, want, ("output", "grad hidden", "grad weights"), strict=True):
                torch.testing.assert_close(
                    a, b, rtol=1e-4, atol=1e-5, msg=f"{model_type} {name} keep {keep_mb}"
                )
    rounded = ChunkedExperts(mem, mem.arch, ref, chunk_mb, Rounding(2, 32, False))
    with torch.no_grad():
        y = rounded(x0, idx, w0)  # reads the module's weights: before they are swapped below
        with rtn_swapped(mem.arch, ref.experts, list(range(ref.num_experts)), 2, 32, False):
            torch.testing.assert_close(y, ref.experts(x0, idx, w0), rtol=1e-4, atol=1e-5)
        assert (y - want[0]).abs().max() > 1e-3  # the rounding is really applied


def test_kept_pre_activations_serve_every_label_draw(tmp_path):
    """The probe calls the backward once per label draw on one graph: with the pre-activations kept, the second
    call's gradients equal autograd through the module for its own cotangent (nothing of the first call leaks)."""
    model = save_tiny("mixtral", tmp_path, seed=1)
    mem = open_source(model)
    ref = mem.blocks[0]
    hidden, _ = mem.arch.expert_dims(ref.experts)
    T = 24
    idx, w0 = _routing(ref, T, seed=3)
    x0 = torch.randn(T, hidden, generator=torch.Generator().manual_seed(4))  # [T, H]
    gs = [torch.randn(T, hidden, generator=torch.Generator().manual_seed(5 + d)) for d in range(2)]  # [T, H]
    chunked = ChunkedExperts(mem, mem.arch, ref, keep_mb=1e4)
    x = x0.clone().requires_grad_(True)
    y = chunked(x, idx, w0)  # [T, H]
    recomputed = []
    pre = chunked.runner.pre
    chunked.runner.pre = lambda *a: recomputed.append(1) or pre(*a)  # the backward must not recompute h
    for d, g in enumerate(gs):
        (got,) = torch.autograd.grad(y, x, g, retain_graph=d == 0)
        xr = x0.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(ref.experts(xr, idx, w0), xr, g)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not recomputed
