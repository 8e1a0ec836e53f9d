"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for a stack of experts, as one pure function.

Reads against IST-DASLab `gptq.py` (`fasterquant`): the names H, W1, Q1, Err1, Losses, blocksize,
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
  expert alone gives. torch.bmm on CPU does not guarantee that (with MKL, [13, 16] @ [16, 7] and
  matrix-vector shaped products round differently for different batch sizes:
  evals/results/figures_from_code_comments.md). So everything that sums (Cholesky, lazy-batch matmuls,
  reductions) runs one expert at a time, and only the exact elementwise work of the column loop (the
  part whose Python overhead a per-expert loop pays E times) is batched. A one-matrix call is the batched call with E = 1.
  Thread counts change rounding too: gptq_threads.py schedules the experts (shape-only thread counts).
* Two-level lazy batch: inside each `blocksize` block, columns run in sub-blocks of SUB_BLOCK; a
  column's rank-1 update touches only its sub-block, and each finished sub-block updates the rest
  of the block with one matmul. Same arithmetic in exact math; the elementwise work per column
  drops from [E, blocksize, N] to [E, SUB_BLOCK, N].
* Group grids: options.static_groups (the default) fixes every group's grid from the ORIGINAL
  weights before any update (the reference's `static_groups`, there for act-order only; here in
  either column order, as llm-compressor's observer does): lower KL to the 16-bit model at every
  width on the bundled model (evals/results/gptq_static_grids_2026-12-08.md). Otherwise a group's
  grid is found on its fully error-updated weights (the reference's default): blocks are aligned to
  groups, and the reference's block-stale read (it passes W, not W1, to find_params, wrong for
  groups starting inside a block when group_size < blocksize) is not reproduced.
* Everything is float32; tests compare with a float64 port of the reference (>= 98% equal codes).
  Scales are float16-rounded before use (see grid.py).
* Damping escalates per expert (x10, up to options.max_damp_tries) when the Cholesky fails.
* The factorisation backends (LAPACK spotrf on CPU, torch elsewhere) are in gptq_factor.py; V is
  stored transposed (row-major V^T), as LAPACK's factor comes out without a transposing copy.

Internally columns come first ([K, E, N]): the column being quantized is one contiguous [E, N]
slice for all experts.
"""

from __future__ import annotations

import logging
import math

import torch

from moequant.config import GPTQOptions, QuantSpec
from moequant.errors import MoEQuantError
from moequant.quantizers.gptq_ops import ops_for
from moequant.quantizers.gptq_threads import _owns_storage, run_expert_chunks
from moequant.quantizers.grid import dequant, find_params, max_code, num_groups, quantize_codes
from moequant.quantizers.result import QuantResult

log = logging.getLogger(__name__)

SUB_BLOCK = 16  # columns per inner lazy-batch sub-block (reduced to divide group_size)


class HessianError(MoEQuantError):
    """A Hessian GPTQ cannot use (not finite, or not positive definite even after damping)."""


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    options: GPTQOptions,
    *,
    consume_hessian: bool = False,
) -> QuantResult:
    """W [E, N, K] (out, in) with Hessians H [E, K, K] -> QuantResult (also W [N, K] with H [K, K]: E = 1), on
    the grid of `spec` (bits, group size, symmetry), solved as `options` say.

    W may be 16-bit: it is read a block of columns at a time into float32 (no float32 copy of W is made).

    H is each expert's input second moment at any positive scale (e.g. 2/n X^T X, see hessian.py);
    input channels with H[k, k] == 0 are dead: their weights are zeroed, as in the reference.

    Experts run in chunks on parallel worker threads (see gptq_threads.py): every expert's arithmetic
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
    ops = ops_for(options.backend, W.device)
    if ops.batched:  # one batched call: the caller's expert chunks bound its memory
        release = consume_hessian and _owns_storage(H)
        return _gptq_chunk(W, H, spec, options, 0, release, ops)
    chunk = lambda Wc, Hc, first, release: _gptq_chunk(Wc, Hc, spec, options, first, release, ops)  # noqa: E731
    return run_expert_chunks(chunk, W, H, options.blocksize, consume_hessian=consume_hessian)


def _gptq_chunk(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    options: GPTQOptions,
    first: int,
    release: bool = False,
    ops=None,
) -> QuantResult:
    """GPTQ of experts first .. first + E - 1: W [E, N, K], H [E, K, K] (`first` names experts in messages;
    `release`: free H's storage after the factorisation, see gptq_quantize; `ops`: the summing steps,
    gptq_ops.py, by default those of options.backend on W's device)."""
    ops = ops or ops_for(options.backend, W.device)
    E, N, K = W.shape
    bits, gs, sym = spec.bits, spec.group_size, spec.sym
    maxq = max_code(bits)
    G = num_groups(K, gs)
    f32 = dict(dtype=torch.float32, device=W.device)

    diag = H.diagonal(dim1=-2, dim2=-1).to(torch.float32)  # [E, K]
    dead = diag == 0  # [E, K] input channels that never saw a non-zero input
    diag = diag.masked_fill(dead, 1.0)  # [E, K]
    perm = None
    if options.act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, K] position -> column
    orig = _Columns(W, dead, perm, ops)  # original weights by position, read from W on demand

    V, Vdiag, damp = _reverse_cholesky(
        H, diag, perm, options, first, ops
    )  # [E, K, K] unit upper, [E, K], [E]
    if release:  # nothing below reads H (diag is a copy)
        H.untyped_storage().resize_(0)

    blocksize = _aligned_blocksize(options.blocksize, gs)
    sub = math.gcd(gs, SUB_BLOCK) if gs <= blocksize else SUB_BLOCK  # sub-blocks never straddle a group
    static = None
    if options.static_groups:
        # grids of the ORIGINAL contiguous groups, fixed before any update (with act-order: no g_idx)
        static = _static_grids(W, dead, gs, bits, sym)  # ([E, N, G], [E, N, G])
        if perm is not None:
            group_of = perm // gs  # [E, K] original group of the column at each position
            ar = torch.arange(E, device=W.device)
        else:  # position = column: a group's grid is one contiguous [E, N] slice
            static_by_group = tuple(t.permute(2, 0, 1).contiguous() for t in static)  # [G, E, N] each
    Corr = torch.zeros(K, E, N, **f32)  # [K, E, N] current minus original weights
    codes = torch.empty(E, N, K, dtype=torch.uint8, device=W.device)  # [E, N, K] by position
    scales = torch.empty(G, E, N, **f32)  # [G, E, N] float16 values
    zeros = torch.empty(G, E, N, **f32)  # [G, E, N] integer values
    Losses = torch.zeros(E, dtype=torch.float64, device=W.device)  # [E]
    Sums = _dead_sums(W, dead)  # [E, 2] (sum (W - Q)^2, sum W^2): dead channels' share, Q = 0 there
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
                if static is not None and perm is not None:  # this column's own (original) group
                    g = group_of[:, col]  # [E]
                    scale, zero = static[0][ar, :, g], static[1][ar, :, g]  # [E, N] each
                elif static is not None:
                    if col % gs == 0:
                        scale, zero = static_by_group[0][col // gs], static_by_group[1][col // gs]  # [E, N]
                elif col % gs == 0:  # grid of the group starting here, on the OBS-updated weights
                    g2 = min(col + gs, K)
                    if g2 <= i2:  # group inside the block
                        Wg0 = W0[i : i + gs]  # [g, E, N]
                        Cg = torch.sub(W1[i : i + gs], Wg0, out=Cgbuf[: g2 - col])  # [g, E, N]
                        Wg = Wgbuf[: g2 - col]  # [g, E, N]
                    else:  # group from this block's start on (group_size > blocksize)
                        Wg0, Cg = orig(col, g2), Corr[col:g2]  # [g, E, N] each
                        Wg = torch.empty_like(Cg)  # [g, E, N]
                    src = Wg0 if col == 0 else _group_weights(Wg0, Cg, V[:, col:g2, col:g2], Wg, ops)
                    scale, zero = find_params(src.permute(1, 2, 0), bits, sym)  # [E, N] each
                    scales[col // gs] = scale
                    zeros[col // gs] = zero
                c = quantize_codes(W1[i], scale, zero, maxq, out=Q1[i])  # [E, N] float codes
                q = dequant(c, scale, zero)  # [E, N] exactly the stored value
                delta = torch.sub(W0[i], q, out=Delta1[i])  # [E, N]
                if i + 1 < j2:
                    W1[i + 1 : j2] += V1[:, i, i + 1 : j2].T[:, :, None] * delta  # [j2-i-1, E, N]
            if j2 < count:  # finished sub-block -> rest of the block
                ops.add_matmul_(W1[j2:], V1[:, j1:j2, j2:], Delta1[j1:j2])

        # codes and Losses += ((w - q) V_ii)^2 / 2 per expert (reference: (w - q)^2 / d^2 / 2)
        ops.store_block(codes, Losses, Sums, Q1, W1, W0, Delta1, Vdiag, i1, i2)
        if i2 < K:  # finished block -> all later columns
            ops.add_matmul_(Corr[i2:], V[:, i1:i2, i2:], Delta1)

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
        err_sums=Sums,
    )


class _Columns:
    """Original weights of positions [c1, c2) as [c, E, N]: dead channels zeroed, act-order applied."""

    def __init__(self, W: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, ops):
        self.W, self.dead, self.perm, self.ops = W, dead, perm, ops  # [E, N, K], [E, K], [E, K] or None

    def __call__(self, c1: int, c2: int) -> torch.Tensor:
        E, N, _ = self.W.shape
        if self.perm is None:
            cols, dead = self.W[:, :, c1:c2], self.dead[:, c1:c2]  # [E, N, c], [E, c]
        else:
            idx = self.perm[:, c1:c2]  # [E, c]
            cols = torch.gather(self.W, 2, idx[:, None, :].expand(E, N, c2 - c1))  # [E, N, c]
            dead = self.dead.gather(1, idx)  # [E, c]
        out = torch.empty(c2 - c1, E, N, dtype=torch.float32, device=self.W.device)  # [c, E, N]
        return self.ops.columns(cols, out).masked_fill_(dead.T[:, :, None], 0.0)


def _reverse_cholesky(
    H: torch.Tensor,
    diag: torch.Tensor,
    perm: torch.Tensor | None,
    options: GPTQOptions,
    first: int = 0,
    ops=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper V with H + damp I = V V^T per expert, as (V D^-1 [E, K, K], D [E, K], damp [E]); D = diag V.

    V = P chol(P H P) P with P the index reversal (V is the inverse of the reference's Hinv).
    diag [E, K] is diag(H) with dead channels set to 1 (it replaces H's diagonal); perm [E, K] the
    act-order permutation or None. damp = percdamp * mean(diag), multiplied by 10 for an expert
    whose Cholesky fails, up to options.max_damp_tries times. Messages name expert e as first + e.
    The factorisations are `ops.factor`'s (gptq_ops.py: per expert through gptq_factor on CPU, batched
    torch elsewhere); on CPU the caller sets scipy's BLAS threads (gptq_threads.run_expert_chunks).
    """
    ops = ops or ops_for(options.backend, H.device)
    E, K, _ = H.shape
    f32 = dict(dtype=torch.float32, device=H.device)
    Vt = torch.empty(E, K, K, **f32)  # [E, K, K] V^T: unit lower triangular, stored row-major
    Vdiag = torch.empty(E, K, **f32)  # [E, K]
    damps = torch.empty(E, **f32)  # [E]
    failed, tries = ops.factor(H, diag, perm, options.percdamp, options.max_damp_tries, Vt, Vdiag, damps)
    failed = [first + e for e in failed]
    escalated = {first + e: options.percdamp * 10.0**t for e, t in tries.items()}
    if failed:
        nonfinite = [e for e in failed if not torch.isfinite(H[e - first]).all()]
        if nonfinite:
            raise HessianError(
                f"Hessian of expert(s) {nonfinite} has non-finite entries (NaN/inf in the inputs?)"
            )
        raise HessianError(
            f"Cholesky of the damped Hessian failed for expert(s) {failed} even at percdamp "
            f"{options.percdamp * 10.0**options.max_damp_tries:g}; raise GPTQOptions.percdamp / max_damp_tries"
        )
    if escalated:
        log.warning(
            "GPTQ: Hessian not positive definite at percdamp=%g; damping escalated for expert(s) %s",
            options.percdamp,
            ", ".join(f"{e} (percdamp {p:g})" for e, p in escalated.items()),
        )
    return Vt.mT, Vdiag, damps  # V [E, K, K] as a transposed view


def _group_weights(
    Wg0: torch.Tensor, Cg: torch.Tensor, Vgg: torch.Tensor, out: torch.Tensor, ops
) -> torch.Tensor:
    """The reference's current weights of a group once all columns before it are quantized: [g, E, N].

    Those are the optimal remaining weights W_b + Delta_a V_ab V_bb^-1 (a: done, b: rest). The
    running correction Cg holds Delta_a V_ab D_b^-1 (D = diag V; the V passed around is the
    unit-diagonal V D^-1), exact for the group's first column only; as V_bb is upper triangular the
    group needs only its own diagonal block: Wg0 + Cg Vgg^-1, one small triangular solve per
    expert. Wg0 [g, E, N] original weights, Cg [g, E, N] correction, Vgg [E, g, g]; written to out [g, E, N].
    """
    return ops.group_weights(Cg, Vgg, out).add_(Wg0)  # X Vgg = Cg^T, then + Wg0: [g, E, N]


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
        wg = W[:, :, c1:c2].to(torch.float32, copy=True).masked_fill_(dead[:, None, c1:c2], 0.0)  # [E, N, c]
        if c2 - c1 < gs:  # a partial last group is padded with zeros, as the grid of the stored group
            wg = torch.nn.functional.pad(wg, (0, gs - (c2 - c1)))  # [E, N, gs]
        scale[:, :, g], zero[:, :, g] = find_params(wg, bits, sym)
    return scale, zero


def _dead_sums(W: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """[E, 2] float64, both columns sum W^2 over each expert's dead input channels: what their zeroed weights
    add to sum (W - Q)^2 and to sum W^2 (the column loop sums the rest, on weights with those channels zeroed)."""
    sums = torch.zeros(W.shape[0], 2, dtype=torch.float64, device=W.device)  # [E, 2]
    for e in dead.any(dim=1).nonzero().flatten().tolist():
        sums[e] = W[e][:, dead[e]].to(torch.float32).square().sum(dtype=torch.float64)  # [N, dead] -> scalar
    return sums


def _aligned_blocksize(blocksize: int, group_size: int) -> int:
    """Largest block <= blocksize that nests in groups or holds whole groups, so blocks align to groups."""
    if group_size <= blocksize:
        return blocksize // group_size * group_size
    return max(d for d in range(1, blocksize + 1) if group_size % d == 0)
