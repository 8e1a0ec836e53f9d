"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for a stack of experts, as one pure function.

Reads against IST-DASLab `gptq.py` (`fasterquant`): the names H, W1, Q1, Losses, blocksize,
percdamp, the dead-column rule, the act-order and group semantics are the reference's, with
experts as a leading batch dimension. What differs, and why:

* No inverse Hessian. The reference factors Hinv = U = chol(H^-1, upper) (Cholesky, inverse,
  Cholesky: 4/3 K^3 flops) and carries Err = (W_cur - Q) / diag(U). With V = U^-1 (upper,
  H = V V^T: one Cholesky of the index-reversed H, 1/3 K^3 flops, no explicit inverse) the same
  algorithm reads (Chen et al. 2025, "GPTQ as Babai's nearest plane"):

      Delta = W - Q                                  (error against the ORIGINAL weights)
      W_cur[:, i] = W[:, i] + sum_{j<i} Delta[:, j] * V[j, i] / V[i, i]
      Losses[:, i] = ((W_cur[:, i] - Q[:, i]) * V[i, i])**2 / 2      (reference: (w-q)^2/d^2/2)

  which equals the reference in exact arithmetic (Err = Delta V), so the sum of Losses is
  tr((W - Q) H (W - Q)^T) / 2 (tested). A quarter of the factorisation work, and a failed
  factorisation can only be the first Cholesky. The running W_cur is exact for the next column
  only; a group's grid needs the current values of all its columns, which one small triangular
  solve with the group's diagonal block of V gives (_group_weights).
* Batch invariance: quantizing a fused [E, N, K] tensor gives bit for bit what quantizing each
  expert alone gives. torch.bmm on CPU does not guarantee that (measured with torch 2.13 + MKL:
  [13, 16] @ [16, 7] and matrix-vector shaped products round differently for different batch
  sizes). So everything that sums (Cholesky, lazy-batch matmuls, reductions) runs one expert at a
  time, and only the exact elementwise work of the column loop (the part whose Python overhead a
  per-expert loop pays E times) is batched. A one-matrix call is the batched call with E = 1.
  Thread counts change rounding too (MKL products, LAPACK factorisations: measured at K >= 1024),
  so an expert's thread count depends on its shape only (expert_threads): small experts run on one
  thread each, in chunks on parallel worker threads, and never on the caller's thread count.
* Two-level lazy batch: inside each `blocksize` block, columns run in sub-blocks of SUB_BLOCK; a
  column's rank-1 update touches only its sub-block, and each finished sub-block updates the rest
  of the block with one matmul. Same arithmetic in exact math; the elementwise work per column
  drops from [E, blocksize, N] to [E, SUB_BLOCK, N].
* Group grids are found on the fully error-updated weights of the group: blocks are aligned to
  groups, and the reference's block-stale read (it passes W, not W1, to find_params, wrong for
  groups starting inside a block when group_size < blocksize) is not reproduced.
* Everything is float32; tests compare with a float64 port of the reference (>= 98% equal codes).
* Damping escalates per expert (x10, up to config.max_damp_tries) when the Cholesky fails.
* On CPU the factorisation is LAPACK spotrf called directly (see _reverse_factor), one thread
  below K = 1024 (see lapack_threads); V is stored transposed (row-major V^T), which is how
  LAPACK's factor comes out without a transposing copy.
* Scales are float16-rounded before use (see quantizer_grid.py).

Internally columns come first ([K, E, N]): the column being quantized is one contiguous [E, N]
slice for all experts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.linalg.lapack import spotrf as _spotrf
from threadpoolctl import ThreadpoolController

from moequant.config import GPTQConfig
from moequant.errors import MoEQuantError
from moequant.quantizers.grid import dequant, find_params, max_code, num_groups, quantize_codes
from moequant.quantizers.result import QuantResult

log = logging.getLogger(__name__)

SUB_BLOCK = 16  # columns per inner lazy-batch sub-block (reduced to divide group_size)


class HessianError(MoEQuantError):
    """A Hessian GPTQ cannot use (not finite, or not positive definite even after damping)."""


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, *, consume_hessian: bool = False
) -> QuantResult:
    """W [E, N, K] (out, in) with Hessians H [E, K, K] -> QuantResult (also W [N, K] with H [K, K]: E = 1).

    W may be 16-bit: it is read a block of columns at a time into float32 (no float32 copy of W is made).

    H is each expert's input second moment at any positive scale (e.g. 2/n X^T X, see hessian.py);
    input channels with H[k, k] == 0 are dead: their weights are zeroed, as in the reference.

    Experts run in chunks on parallel worker threads (see expert_threads): every expert's arithmetic
    runs on the same number of threads whatever E is, so results never depend on the batch.

    consume_hessian: the caller hands H over. When all experts run as one chunk and H owns its memory, that
    memory is freed once the factorisation is done (H's storage is resized to zero: H must not be used
    afterwards), so a large expert's column loop does not hold its K x K Hessian beside the factor.
    """
    if W.dim() == 2 and H.dim() == 2:
        W, H = W.unsqueeze(0), H.unsqueeze(0)  # [1, N, K], [1, K, K]
    if W.dim() != 3 or H.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(
            f"gptq_quantize expects W [E, N, K] and H [E, K, K], got {tuple(W.shape)}, {tuple(H.shape)}"
        )
    E, N, K = W.shape
    caller_threads = torch.get_num_threads()
    threads = expert_threads(N, K, caller_threads)
    chunks = _expert_chunks(E, N, min(config.blocksize, K), caller_threads // threads)
    workers = min(len(chunks), max(1, caller_threads // threads))
    release = consume_hessian and len(chunks) == 1 and _owns_storage(H)
    run = lambda ab: _gptq_chunk(W[ab[0] : ab[1]], H[ab[0] : ab[1]], config, ab[0], release)  # noqa: E731
    with scipy_blas_threads(lapack_threads(K, threads)):
        if workers == 1 and threads == caller_threads:  # nothing to change: run here
            parts = [run(ab) for ab in chunks]
        else:
            try:
                if workers == 1:
                    torch.set_num_threads(threads)
                    parts = [run(ab) for ab in chunks]
                else:
                    parts = list(_worker_pool(workers, threads, os.getpid()).map(run, chunks))
            finally:  # (a worker's setting also becomes the default of threads started later)
                torch.set_num_threads(caller_threads)
    return parts[0] if len(parts) == 1 else _concat(parts)


@functools.cache
def _worker_pool(workers: int, threads: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads running torch on `threads` intra-op threads each, kept for the process (`pid`: a
    forked child gets its own): starting threads per call cost page faults on fresh per-thread heaps
    (measured on W [64, 512, 512]: 0.2 s system time per call)."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix="moequant-gptq", initializer=torch.set_num_threads, initargs=(threads,)
    )


def expert_threads(N: int, K: int, available: int) -> int:
    """Intra-op threads for one [N, K] expert: 1 when K < 1024 and N K < 2^23, else all `available`.

    Small experts gain nothing from intra-op threads (the column loop works on [E, N] vectors; at
    [1024, 1024] one call took 0.079 s on 1 thread, 0.133 s on 2) and parallelise across experts
    instead ([8, 2048, 1024]: 0.67 s on 2 workers, 0.91 s on 2 intra-op threads). Large ones keep
    them ([4096, 2048]: 0.48 s on 1, 0.39 s on 2), and so do long ones: from K = 1024 the LAPACK
    factorisation matters, and scipy's OpenBLAS does not factor on two threads at once
    (K = 2816, 4 factorisations: 0.34 s from 2 workers, 0.38 s one after another on 1 thread, 0.24 s
    on 2 threads; [4, 2048, 2816]: 3.05 s on 2 workers, 2.11 s on 2 threads). The choice depends on
    the shape only, so an expert gets the same arithmetic in any batch: MKL products and LAPACK
    factorisations round differently for different thread counts (measured at K = 1024 and up).
    """
    return 1 if K < 1024 and N * K < 2**23 else available


_CHUNK_BLOCK_BYTES = 4 * 2**20  # a chunk's [blocksize, c, N] float32 block buffer stays near this (cache)
_MIN_CHUNK_ELEMS = 2**13  # a chunk's column vector [c, N]: below this, per-op overhead dominates the work
_MAX_WORKERS = 8  # the column loop holds the GIL between ops: more Python threads stop paying


def _expert_chunks(E: int, N: int, blocksize: int, parallel: int) -> list[tuple[int, int]]:
    """Contiguous expert ranges [(a, b)]: `parallel` (capped) when E allows, but none whose column vectors
    [c, N] fall below _MIN_CHUNK_ELEMS (tiny experts: splitting only multiplies the per-op overhead, and
    the workers queue on the GIL), and none whose block buffers exceed _CHUNK_BLOCK_BYTES (cache).
    Measured on W [64, 512, 512], 2 threads: chunks of 16 on 2 workers 0.34-0.44 s, one chunk 0.53-0.59 s;
    the bundled model (8 experts, [512, 128]) ran 10% slower split in two."""
    parallel = max(1, min(parallel, _MAX_WORKERS, E))
    size = max(-(-E // parallel), -(-_MIN_CHUNK_ELEMS // N))
    size = max(1, min(size, E, _CHUNK_BLOCK_BYTES // (4 * blocksize * N)))
    return [(a, min(a + size, E)) for a in range(0, E, size)]


def _concat(parts: list[QuantResult]) -> QuantResult:
    """Chunk results stacked along the expert dimension."""
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantResult(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=cat([p.zeros for p in parts]),
        g_idx=cat([p.g_idx for p in parts]),
        bits=parts[0].bits,
        group_size=parts[0].group_size,
        losses=torch.cat([p.losses for p in parts]),
        damp=torch.cat([p.damp for p in parts]),
    )


def _owns_storage(t: torch.Tensor) -> bool:
    """True when t is the whole of its storage (freeing the storage frees nothing else)."""
    return (
        t.device.type == "cpu"
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _gptq_chunk(
    W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, first: int, release: bool = False
) -> QuantResult:
    """GPTQ of experts first .. first + E - 1: W [E, N, K], H [E, K, K] (`first` names experts in messages;
    `release`: free H's storage after the factorisation, see gptq_quantize)."""
    E, N, K = W.shape
    bits, gs, sym = config.bits, config.group_size, config.sym
    maxq = max_code(bits)
    G = num_groups(K, gs)
    f32 = dict(dtype=torch.float32, device=W.device)

    diag = H.diagonal(dim1=-2, dim2=-1).to(torch.float32)  # [E, K]
    dead = diag == 0  # [E, K] input channels that never saw a non-zero input
    diag = diag.masked_fill(dead, 1.0)  # [E, K]
    perm = None
    if config.act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, K] position -> column
    orig = _Columns(W, dead, perm)  # original weights by position, read from W on demand

    V, Vdiag, damp = _reverse_cholesky(H, diag, perm, config, first)  # [E, K, K] unit upper, [E, K], [E]
    if release:  # nothing below reads H (diag is a copy)
        H.untyped_storage().resize_(0)

    blocksize = _aligned_blocksize(config.blocksize, gs)
    sub = math.gcd(gs, SUB_BLOCK) if gs <= blocksize else SUB_BLOCK  # sub-blocks never straddle a group
    static = None
    if perm is not None and config.static_groups:
        # grids of the ORIGINAL contiguous groups, fixed before any update: act-order without a g_idx
        static = _static_grids(W, dead, gs, bits, sym)  # ([E, N, G], [E, N, G])
        group_of = perm // gs  # [E, K] original group of the column at each position
        ar = torch.arange(E, device=W.device)
    Corr = torch.zeros(K, E, N, **f32)  # [K, E, N] current minus original weights
    codes = torch.empty(E, N, K, dtype=torch.uint8, device=W.device)  # [E, N, K] by position
    scales = torch.empty(G, E, N, **f32)  # [G, E, N] float16 values
    zeros = torch.empty(G, E, N, **f32)  # [G, E, N] integer values
    Losses = torch.zeros(E, dtype=torch.float64, device=W.device)  # [E]
    # block buffers, allocated once: fresh pages would fault inside the column loop
    W1buf = torch.empty(blocksize, E, N, **f32)  # [B, E, N] current weights
    Q1buf = torch.empty(blocksize, E, N, **f32)  # [B, E, N] codes (as float)
    Delta1buf = torch.empty(blocksize, E, N, **f32)  # [B, E, N] original minus quantized
    gin = min(gs, blocksize)  # rows of a group that lies inside one block
    Cgbuf, Wgbuf = torch.empty(2, gin, E, N, **f32)  # [g, E, N] each: a group's correction, current weights
    scale = zero = None

    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        count = i2 - i1
        W0 = orig(i1, i2)  # [B, E, N] the block's original weights
        W1 = torch.add(W0, Corr[i1:i2], out=W1buf[:count])  # [B, E, N] current weights, updated in place
        Q1, Delta1 = Q1buf[:count], Delta1buf[:count]  # [B, E, N] each
        V1 = V[:, i1:i2, i1:i2]  # [E, B, B]

        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                col = i1 + i
                if static is not None:  # this column's own (original) group
                    g = group_of[:, col]  # [E]
                    scale, zero = static[0][ar, :, g], static[1][ar, :, g]  # [E, N] each
                elif col % gs == 0:  # grid of the group starting here, on the OBS-updated weights
                    g2 = min(col + gs, K)
                    if g2 <= i2:  # group inside the block
                        Wg0 = W0[i : i + gs]  # [g, E, N]
                        Cg = torch.sub(W1[i : i + gs], Wg0, out=Cgbuf[: g2 - col])  # [g, E, N]
                        Wg = Wgbuf[: g2 - col]  # [g, E, N]
                    else:  # group from this block's start on (group_size > blocksize)
                        Wg0, Cg = orig(col, g2), Corr[col:g2]  # [g, E, N] each
                        Wg = torch.empty_like(Cg)  # [g, E, N]
                    src = Wg0 if col == 0 else _group_weights(Wg0, Cg, V[:, col:g2, col:g2], out=Wg)
                    scale, zero = find_params(src.permute(1, 2, 0), bits, sym)  # [E, N] each
                    scales[col // gs] = scale
                    zeros[col // gs] = zero
                c = quantize_codes(W1[i], scale, zero, maxq, out=Q1[i])  # [E, N] float codes
                q = dequant(c, scale, zero)  # [E, N] exactly the stored value
                delta = torch.sub(W0[i], q, out=Delta1[i])  # [E, N]
                if i + 1 < j2:
                    W1[i + 1 : j2] += V1[:, i, i + 1 : j2].T[:, :, None] * delta  # [j2-i-1, E, N]
            if j2 < count:  # finished sub-block -> rest of the block
                _add_matmul_(W1[j2:], V1[:, j1:j2, j2:], Delta1[j1:j2])

        for e in range(E):  # per expert: a batched reduction may order the additions differently
            codes[e, :, i1:i2] = Q1[:, e].T  # [N, B] float codes -> uint8
            Err1 = (
                (W1[:, e] - W0[:, e]).add_(Delta1[:, e]).mul_(Vdiag[e, i1:i2, None])
            )  # [B, N] (w_cur - q) V_ii
            Losses[e] += Err1.pow_(2).sum(dtype=torch.float64) / 2  # reference: (w - q)^2 / d^2 / 2
        if i2 < K:  # finished block -> all later columns
            _add_matmul_(Corr[i2:], V[:, i1:i2, i2:], Delta1)

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm, dim=-1)  # [E, K] column -> position
        codes = torch.gather(codes, 2, invperm[:, None, :].expand(E, N, K))  # [E, N, K] original order
        if static is None:
            g_idx = (invperm // gs).to(torch.int32)  # [E, K] group of every original column
    if static is not None:
        scales = static[0].permute(2, 0, 1)  # [G, E, N]
        zeros = static[1].permute(2, 0, 1)  # [G, E, N]

    return QuantResult(
        codes=codes,  # [E, N, K] uint8
        scales=scales.permute(1, 2, 0).to(torch.float16).contiguous(),  # [E, N, G] float16 (exact)
        zeros=None if sym else zeros.permute(1, 2, 0).to(torch.uint8).contiguous(),  # [E, N, G] uint8
        g_idx=g_idx,
        bits=bits,
        group_size=gs,
        losses=Losses,
        damp=damp,
    )


class _Columns:
    """Original weights of positions [c1, c2) as [c, E, N]: dead channels zeroed, act-order applied."""

    def __init__(self, W: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None):
        self.W, self.dead, self.perm = W, dead, perm  # [E, N, K], [E, K], [E, K] or None

    def __call__(self, c1: int, c2: int) -> torch.Tensor:
        E, N, _ = self.W.shape
        if self.perm is None:
            cols, dead = self.W[:, :, c1:c2], self.dead[:, c1:c2]  # [E, N, c], [E, c]
        else:
            idx = self.perm[:, c1:c2]  # [E, c]
            cols = torch.gather(self.W, 2, idx[:, None, :].expand(E, N, c2 - c1))  # [E, N, c]
            dead = self.dead.gather(1, idx)  # [E, c]
        out = torch.empty(c2 - c1, E, N, dtype=torch.float32, device=self.W.device)  # [c, E, N]
        for e in range(E):  # 2-D transposes: measured 2.5x faster than one permuted copy
            out[:, e] = cols[e].T
        return out.masked_fill_(dead.T[:, :, None], 0.0)


def _reverse_cholesky(
    H: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor | None, config: GPTQConfig, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper V with H + damp I = V V^T per expert, as (V D^-1 [E, K, K], D [E, K], damp [E]); D = diag V.

    V = P chol(P H P) P with P the index reversal (V is the inverse of the reference's Hinv).
    diag [E, K] is diag(H) with dead channels set to 1 (it replaces H's diagonal); perm [E, K] the
    act-order permutation or None. damp = percdamp * mean(diag), multiplied by 10 for an expert
    whose Cholesky fails, up to config.max_damp_tries times. Messages name expert e as first + e.
    The caller sets scipy's BLAS threads (see lapack_threads).
    """
    E, K, _ = H.shape
    f32 = dict(dtype=torch.float32, device=H.device)
    Vt = torch.empty(E, K, K, **f32)  # [E, K, K] V^T: unit lower triangular, stored row-major
    Vdiag = torch.empty(E, K, **f32)  # [E, K]
    damps = torch.empty(E, **f32)  # [E]
    escalated: dict[int, float] = {}
    failed: list[int] = []
    for e in range(E):
        He = H[e].to(torch.float32)  # [K, K] (no copy for a float32 H)
        pe = None if perm is None else perm[e]  # [K]
        base = config.percdamp * diag[e].mean()  # scalar float32, on the unpermuted diagonal
        for t in range(config.max_damp_tries + 1):
            damp = base * 10.0**t
            if _reverse_factor(He, diag[e] + damp, pe, Vt[e], Vdiag[e]):  # writes V^T D^-1 and D
                break
        else:
            failed.append(first + e)
            continue
        damps[e] = damp
        if t > 0:
            escalated[first + e] = config.percdamp * 10.0**t
    if failed:
        nonfinite = [e for e in failed if not torch.isfinite(H[e - first]).all()]
        if nonfinite:
            raise HessianError(
                f"Hessian of expert(s) {nonfinite} has non-finite entries (NaN/inf in the inputs?)"
            )
        raise HessianError(
            f"Cholesky of the damped Hessian failed for expert(s) {failed} even at percdamp "
            f"{config.percdamp * 10.0**config.max_damp_tries:g}; raise GPTQConfig.percdamp / max_damp_tries"
        )
    if escalated:
        log.warning(
            "GPTQ: Hessian not positive definite at percdamp=%g; damping escalated for expert(s) %s",
            config.percdamp,
            ", ".join(f"{e} (percdamp {p:g})" for e, p in escalated.items()),
        )
    return Vt.mT, Vdiag, damps  # V [E, K, K] as a transposed view


def _reverse_factor(
    He: torch.Tensor, De: torch.Tensor, perm: torch.Tensor | None, Vt: torch.Tensor, Vdiag: torch.Tensor
) -> bool:
    """Factor one expert: Vt [K, K] = (V D^-1)^T (unit lower) and Vdiag [K] = D, written in place, for the
    upper V with A = V V^T, A = He (act-order permuted by perm [K] or None) with its diagonal replaced by
    De [K] (given unpermuted). False when A is not positive definite (Vt, Vdiag then hold garbage).

    V = P chol(P A P) P with P the index reversal. On CPU LAPACK spotrf runs in Vt's own memory on a
    gathered copy of He (permutation and reversal together), and the factor is reversed and divided there:
    no K x K temporary; torch.linalg.cholesky_ex spends most of its time outside the factorisation,
    zeroing the other triangle element by element, and its factor would need a transposing copy: K = 512
    on one core, 2.6 ms vs 0.5 ms for spotrf). As A is symmetric, the C-ordered reversed copy read in
    Fortran order is the same matrix, and the factor read back in C order is its transpose. A failure is
    a non-zero info or a non-finite diagonal (spotrf need not stop on NaN).
    """
    K = He.shape[0]
    rev = torch.arange(K - 1, -1, -1, device=He.device) if perm is None else perm.flip(0)  # [K] P (perm)
    if He.device.type != "cpu":
        return _reverse_factor_torch(He, De, rev, Vt, Vdiag)
    # rows, then columns in place a row block at a time (one 2-D gather: 27 ms vs 10.5 ms at K = 2816); torch
    # ops, not numpy, read He: a tensor once seen by numpy can no longer have its memory freed (release)
    torch.index_select(He, 0, rev, out=Vt)  # [K, K] rows of P A P
    for b in range(0, K, 256):
        Vt[b : b + 256] = Vt[b : b + 256].index_select(1, rev)  # [<=256, K] temporary
    A = Vt.numpy()  # [K, K] the output buffer: P A P, then the factor, then V^T D^-1
    np.fill_diagonal(A, De.numpy()[rev.numpy()])
    L, info = _spotrf(A.T, lower=1, clean=0, overwrite_a=1)  # [K, K] Fortran order, lower = L
    if not np.shares_memory(L, A):  # f2py copied instead of factoring in place
        A[...] = L.T
    # V^T = P L^T P. L^T read in C order is A itself, so V^T is A with its flat index reversed, done in
    # place; above the diagonal: the untouched other triangle of P A P, cleared at the end.
    _reverse_flat(A.reshape(-1))
    d = A.diagonal().copy()  # [K]
    if info != 0 or not np.isfinite(d).all():
        return False
    Vdiag.numpy()[:] = d
    np.divide(A, d[:, None], out=A)  # V[j, i] / V[i, i], transposed
    Vt.tril_()  # (clean=1 would zero the other triangle in spotrf's wrapper: 1.5 ms vs 0.6 ms at K = 512)
    return True


_REVERSE_CHUNK = 2**18  # elements swapped per step of _reverse_flat (a 1 MB temporary)


def _reverse_flat(a: np.ndarray) -> None:
    """a[:] = a[::-1] in place for a 1-D array, with a bounded temporary (numpy would copy all of a)."""
    n = a.shape[0]
    half = n // 2
    for c in range(0, half, _REVERSE_CHUNK):
        m = min(_REVERSE_CHUNK, half - c)
        lo, hi = a[c : c + m], a[n - c - m : n - c]  # disjoint: c + m <= n / 2 <= n - c - m
        tmp = lo.copy()
        lo[:] = hi[::-1]
        hi[:] = tmp[::-1]


def _reverse_factor_torch(
    He: torch.Tensor, De: torch.Tensor, rev: torch.Tensor, Vt: torch.Tensor, Vdiag: torch.Tensor
) -> bool:
    """_reverse_factor off the CPU: torch's Cholesky on P A P (rev [K]: the reversed permutation)."""
    A = He[rev][:, rev]  # [K, K] P A P (a copy)
    A.diagonal().copy_(De[rev])
    L, info = torch.linalg.cholesky_ex(A)  # [K, K] lower
    if info != 0:
        return False
    V = L.mT.flip(0, 1)  # [K, K] P L^T P = V^T, lower
    Vdiag.copy_(V.diagonal())
    torch.div(V, Vdiag[:, None], out=Vt)
    return True


@functools.cache
def _blas_pools() -> ThreadpoolController:
    """The loaded BLAS thread pools (scipy's OpenBLAS), found once: a fresh lookup costs ~1 ms a call."""
    return ThreadpoolController()


def scipy_blas_threads(n: int):
    """Context manager: scipy's BLAS/LAPACK (the factorisations) on n threads inside it."""
    return _blas_pools().limit(limits=n, user_api="blas")


def lapack_threads(K: int, threads: int) -> int:
    """Threads for scipy's OpenBLAS during the factorisations of K x K Hessians.

    Its idle workers spin for a while after each call and take the cores from torch's own
    threads: at K = 512 on 2 cores a 2-thread OpenBLAS made a whole GPTQ call 2.3x slower
    (1.28 s vs 0.55 s). Below K = 1024 the second thread saves little anyway (0.58 vs 0.48 ms);
    above it, the factorisation dominates (K = 4096: 234 ms on 1 thread, 131 ms on 2).
    `threads`: the expert's own thread count (expert_threads).
    """
    return 1 if K < 1024 else threads


def _group_weights(Wg0: torch.Tensor, Cg: torch.Tensor, Vgg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The reference's current weights of a group once all columns before it are quantized: [g, E, N].

    Those are the optimal remaining weights W_b + Delta_a V_ab V_bb^-1 (a: done, b: rest). The
    running correction Cg holds Delta_a V_ab D_b^-1 (D = diag V; the V passed around is the
    unit-diagonal V D^-1), exact for the group's first column only; as V_bb is upper triangular the
    group needs only its own diagonal block: Wg0 + Cg Vgg^-1, one small triangular solve per
    expert. Wg0 [g, E, N] original weights, Cg [g, E, N] correction, Vgg [E, g, g]; written to out [g, E, N].
    """
    for e in range(Cg.shape[1]):  # X Vgg = Cg^T, solved on the right (measured faster than the left solve)
        out[:, e] = torch.linalg.solve_triangular(
            Vgg[e], Cg[:, e].T, upper=True, left=False, unitriangular=True
        ).T
    return out.add_(Wg0)  # [g, E, N]


def _static_grids(
    W: torch.Tensor, dead: torch.Tensor, gs: int, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of W's contiguous groups, dead channels zeroed: W [E, N, K] -> (scale, zero) [E, N, G] each.

    One group at a time: a float32 copy of one group, not of W (W may be 16-bit)."""
    E, N, K = W.shape
    G = num_groups(K, gs)
    scale = torch.empty(E, N, G, dtype=torch.float32, device=W.device)  # [E, N, G]
    zero = torch.empty_like(scale)  # [E, N, G]
    for g in range(G):
        c1, c2 = g * gs, min(g * gs + gs, K)
        wg = (
            W[:, :, c1:c2].to(torch.float32, copy=True).masked_fill_(dead[:, None, c1:c2], 0.0)
        )  # [E, N, <=gs]
        if c2 - c1 < gs:  # a partial last group is padded with zeros, as the grid of the stored group
            wg = torch.nn.functional.pad(wg, (0, gs - (c2 - c1)))  # [E, N, gs]
        scale[:, :, g], zero[:, :, g] = find_params(wg, bits, sym)
    return scale, zero


_MATMUL_OUT_BYTES = 8 * 2**20  # the per-expert product is formed in row slices of about this size


def _add_matmul_(target: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """target[:, e] += A[e]^T @ B[:, e] for every expert: one mm per expert, so rounding never depends on E.

    target [m, E, N], A [E, n, m], B [n, E, N]. The product is formed in row slices (bounded temporary: a
    whole [m, N] product of a large expert is tens of MB); slices depend on N only, never on E.
    """
    m, N = target.shape[0], target.shape[2]
    rows = max(1, _MATMUL_OUT_BYTES // (4 * N))
    for e in range(
        A.shape[0]
    ):  # (addmm_ straight into the strided target rounds differently per E: measured)
        for r1 in range(0, m, rows):
            r2 = min(r1 + rows, m)
            target[r1:r2, e] += torch.mm(A[e, :, r1:r2].T, B[:, e])  # [r, n] @ [n, N] -> [r, N]


def _aligned_blocksize(blocksize: int, group_size: int) -> int:
    """Largest block <= blocksize that nests in groups or holds whole groups, so blocks align to groups."""
    if group_size <= blocksize:
        return blocksize // group_size * group_size
    return max(d for d in range(1, blocksize + 1) if group_size % d == 0)
