"""Kernel backend selection (kernels/backend.py), and the GPU benchmark's byte floor and baselines
(evals/bench/kernels.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moequant.arch.base import Activation
from moequant.kernels.backend import Backend, resolve_backend, triton_interpreted
from moequant.kernels.reference import moe_reference

REPO = Path(__file__).resolve().parents[2]


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MOEQUANT_KERNEL", raising=False)
    assert resolve_backend(None, cpu) is Backend.REFERENCE
    assert resolve_backend(None, cuda) is Backend.TRITON
    monkeypatch.setenv("MOEQUANT_KERNEL", "reference")
    assert resolve_backend(None, cuda) is Backend.REFERENCE
    monkeypatch.setenv("MOEQUANT_KERNEL", "Triton ")
    assert resolve_backend(None, cuda) is Backend.TRITON
    assert resolve_backend("reference", cuda) is Backend.REFERENCE  # the argument wins over the variable
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda", cpu)
    if triton_interpreted():
        assert resolve_backend(None, cpu) is Backend.TRITON
    else:  # Triton cannot run on CPU tensors here: a clear error, never a silent fallback
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend(None, cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if "triton" in sys.modules:  # too late for this process: the message says so
            with pytest.raises(RuntimeError, match="before the process starts"):
                resolve_backend("triton", cpu)


def test_bench_floor_and_bf16_baselines(monkeypatch):
    """evals/bench/kernels.py (runs on a GPU later): its byte count for the floor is the touched experts'
    stored bytes, and both bf16 baselines compute the layer the kernels compute (tiny layer, CPU, bf16)."""
    from moequant.evals.bench import kernels as bench
    from moequant.quantizers.packed import packed_nbytes

    monkeypatch.setitem(bench.SHAPES, "tiny", (64, 48, 6, 2))
    packed = bench.build_layer("tiny", "int4", "cpu")
    idx, w = bench.routing("tiny", 5, "cpu")
    tr = bench.traffic(packed, idx)
    per_expert = packed_nbytes(96, 64, 4, 128, False) + packed_nbytes(64, 48, 4, 128, False)
    assert tr.touched_experts == len(set(idx.flatten().tolist()))
    assert tr.weight_bytes == tr.touched_experts * per_expert
    assert tr.flops == 2 * idx.numel() * 3 * 64 * 48
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(23)).bfloat16()
    ref = moe_reference(x.float(), idx, w, packed, Activation.SILU_GLU)
    gu, dn = bench.dense_weights(packed)
    outs = [bench.bf16_loop(x, idx, w, gu, dn)()]
    if hasattr(torch.nn.functional, "grouped_mm"):  # torch >= 2.9
        outs.append(bench.bf16_grouped_mm(x, idx, w, gu, dn))
    for y in outs:
        torch.testing.assert_close(y.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)
