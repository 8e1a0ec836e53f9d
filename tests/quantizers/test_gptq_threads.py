"""GPTQ's CPU scheduling (moequant/quantizers/gptq_threads.py): results never depend on how the experts are
chunked, on how many workers run the chunks, or on the caller's thread count."""

from __future__ import annotations

import logging

import pytest
import torch

from moequant.config import GPTQOptions, QuantSpec
from moequant.quantizers import gptq_threads
from moequant.quantizers.gptq import gptq_quantize
from moequant.quantizers.result import QuantResult

# E = 6 experts: one chunk, one per expert, uneven, halves, and the escalating expert 4 alone at the end
SPLITS = (
    [(0, 6)],
    [(e, e + 1) for e in range(6)],
    [(0, 2), (2, 5), (5, 6)],
    [(0, 3), (3, 6)],
    [(0, 4), (4, 6)],
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def hessians(E: int, K: int, seed: int) -> torch.Tensor:
    """H [E, K, K] = 2/T X^T X of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(E):
        X = torch.randn(3 * K, 8, generator=g) @ torch.randn(8, K, generator=g)
        X = (X + 0.3 * torch.randn(3 * K, K, generator=g)) * torch.exp(0.5 * torch.randn(K, generator=g))
        out.append(2 / X.shape[0] * X.T @ X)  # [K, K]
    return torch.stack(out)


def experts(E: int = 6, N: int = 24, K: int = 64, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """W [E, N, K], H [E, K, K]: expert 1 has a dead input channel, expert 4 needs escalated damping."""
    W = torch.randn(E, N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    H = hessians(E, K, seed + 1)
    H[1, :, 3] = H[1, 3, :] = 0
    H[4] -= 0.3 * H[4].diagonal().mean() * torch.eye(K)
    return W, H


def assert_same(a: QuantResult, b: QuantResult) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)
    assert (a.g_idx is None and b.g_idx is None) or torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.damp, b.damp) and torch.equal(a.losses, b.losses)


@pytest.mark.parametrize(
    "cfg",
    [
        (QuantSpec(bits=3, group_size=32), GPTQOptions(static_groups=False, act_order=True, blocksize=64)),
        (
            QuantSpec(bits=4, group_size=16, sym=True),
            GPTQOptions(act_order=True, static_groups=True, blocksize=32),
        ),
        (QuantSpec(bits=2, group_size=32), GPTQOptions(act_order=False, static_groups=False, blocksize=16)),
    ],
)
def test_results_do_not_depend_on_chunks_workers_or_caller_threads(monkeypatch, caplog, cfg):
    """Any contiguous splitting of the experts, run in place (1 caller thread) or on 2 or 3 worker threads,
    gives bit for bit the one-chunk, one-thread result; messages name experts by their index in the whole
    batch; the caller's thread count is left as it was."""
    W, H = experts()
    want = gptq_quantize(W, H, *cfg)
    for split in SPLITS:
        monkeypatch.setattr(gptq_threads, "_expert_chunks", lambda *args, split=split: list(split))
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="moequant.quantizers.gptq"):
                got = gptq_quantize(W, H, *cfg)
            assert torch.get_num_threads() == threads
            torch.set_num_threads(1)
            assert_same(got, want)
            assert "expert(s) 4 (" in caplog.text and "expert(s) 0 (" not in caplog.text


def test_parallel_chunks_equal_one_thread_per_expert_calls(monkeypatch):
    """With the chunk size floor lifted, these small experts really split over worker threads on 2 caller
    threads, and every expert still equals its own call on 1 thread bit for bit."""
    monkeypatch.setattr(gptq_threads, "_MIN_CHUNK_ELEMS", 1)  # let these small experts split
    seen = []
    chunks = gptq_threads._expert_chunks
    monkeypatch.setattr(gptq_threads, "_expert_chunks", lambda *a: seen.append(chunks(*a)) or seen[-1])
    W, H = experts()
    cfg = (QuantSpec(bits=3, group_size=32), GPTQOptions(static_groups=False, act_order=True))
    torch.set_num_threads(2)
    full = gptq_quantize(W, H, *cfg)
    assert torch.get_num_threads() == 2
    assert len(seen[-1]) > 1  # the call did run in several chunks
    torch.set_num_threads(1)
    for e in range(W.shape[0]):
        assert_same(full.expert(e), gptq_quantize(W[e], H[e], *cfg))


@pytest.mark.parametrize("N", [1, 24, 512, 4096, 14336])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_chunks_cover_every_expert_once_in_order(N, blocksize):
    for E in (1, 2, 3, 5, 8, 16, 64, 129):
        for parallel in (1, 2, 3, 8, 64):
            chunks = gptq_threads._expert_chunks(E, N, blocksize, parallel)
            assert chunks and chunks[0][0] == 0 and chunks[-1][1] == E
            assert all(a < b for a, b in chunks)  # none empty
            assert [a for a, _ in chunks[1:]] == [b for _, b in chunks[:-1]]  # contiguous, in order


def fake_chunk(calls: list):
    """A per-chunk function that records its call and returns codes naming each expert and each chunk."""

    def chunk(W: torch.Tensor, H: torch.Tensor, first: int, release: bool) -> QuantResult:
        c, N, K = W.shape
        calls.append((first, c, release, torch.get_num_threads()))
        assert H.shape == (c, K, K)
        ids = torch.arange(first, first + c, dtype=torch.uint8)  # [c]
        return QuantResult(
            codes=ids[:, None, None].expand(c, N, K).clone(),  # [c, N, K]
            scales=torch.full((c, N, 1), float(first), dtype=torch.float16),  # [c, N, 1]
            zeros=None,
            g_idx=None,
            bits=4,
            group_size=K,
            losses=W[:, 0, 0].double(),  # [c]
            damp=torch.full((c,), float(c)),  # [c]
        )

    return chunk


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("threads", [1, 2])
def test_runner_slices_stacks_and_keeps_thread_counts(monkeypatch, split, threads):
    """Every expert is handed to the chunk function once, under its index in the batch, on its shape's
    thread count; the results are stacked in expert order; H is released only when one chunk holds all."""
    monkeypatch.setattr(gptq_threads, "_expert_chunks", lambda *a: list(split))
    E, N, K = 6, 3, 8
    W, H = torch.randn(E, N, K), torch.randn(E, K, K)
    calls = []
    torch.set_num_threads(threads)
    res = gptq_threads.run_expert_chunks(fake_chunk(calls), W, H, 128, consume_hessian=True)
    assert torch.get_num_threads() == threads
    assert sorted(a for a, *_ in calls) == [a for a, _ in split]  # each chunk once, under its first expert
    assert all(n == gptq_threads.expert_threads(N, K, threads) for *_, n in calls)
    assert all(release == (len(split) == 1) for _, _, release, _ in calls)
    assert torch.equal(res.codes[:, 0, 0], torch.arange(E, dtype=torch.uint8))
    assert torch.equal(res.losses, W[:, 0, 0].double())
    assert res.scales.shape == (E, N, 1) and res.damp.shape == (E,) and res.zeros is None


def test_runner_restores_threads_when_a_chunk_fails(monkeypatch):
    monkeypatch.setattr(gptq_threads, "_expert_chunks", lambda *a: [(0, 1), (1, 2)])

    def boom(W, H, first, release):
        raise RuntimeError(f"expert {first}")

    for threads in (1, 2):
        torch.set_num_threads(threads)
        with pytest.raises(RuntimeError, match="expert"):
            gptq_threads.run_expert_chunks(boom, torch.zeros(2, 4, 8), torch.zeros(2, 8, 8), 128)
        assert torch.get_num_threads() == threads


def test_large_experts_run_on_the_callers_threads():
    """From K = 1024 (LAPACK-bound) an expert runs on all the caller's threads, in place."""
    calls = []
    E, N, K = 2, 1, 1024
    H = torch.zeros(1, 1, 1).expand(E, K, K)  # only sliced, never read
    torch.set_num_threads(2)
    gptq_threads.run_expert_chunks(fake_chunk(calls), torch.zeros(E, N, K), H, 128, consume_hessian=True)
    assert [n for *_, n in calls] == [2] * len(calls)
    assert not any(release for _, _, release, _ in calls)  # an expanded view does not own its storage


def test_split_chunks_never_free_the_hessian(monkeypatch):
    """consume_hessian with several chunks: H stays whole (a chunk must not free what another reads)."""
    monkeypatch.setattr(gptq_threads, "_expert_chunks", lambda *a: [(0, 3), (3, 6)])
    W, H = experts()
    cfg = (QuantSpec(bits=3, group_size=32), GPTQOptions(act_order=False, static_groups=False))
    want = gptq_quantize(W, H, *cfg)
    owned = H.clone()
    assert_same(gptq_quantize(W, owned, *cfg, consume_hessian=True), want)
    assert torch.equal(owned, H)


def test_owns_storage():
    t = torch.zeros(4, 8, 8)
    assert gptq_threads._owns_storage(t) and gptq_threads._owns_storage(t[1:].clone())
    for view in (t[1:], t[:2], t.mT, t[:, :4], torch.zeros(1, 8, 8).expand(4, 8, 8)):
        assert not gptq_threads._owns_storage(view)
