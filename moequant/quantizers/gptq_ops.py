"""The summing steps of GPTQ's column loop (moequant/quantizers/gptq.py), in two backends.

gptq.py writes the algorithm once; the steps that add things up are taken from one of these:

* PerExpertOps (backend "lapack", the CPU default): one expert at a time (LAPACK spotrf per expert, one mm per
  expert), so an expert of a fused [E, N, K] call gets bit for bit what a call on it alone gets (batch
  invariance; see gptq.py). Only the exact elementwise work of the column loop is batched.
* BatchedOps (backend "torch", the default off the CPU): every step batched over the chunk's experts
  (torch.linalg.cholesky_ex on [E, K, K], batched triangular solves, bmm for the lazy-batch updates, one
  reduction): no per-expert Python loop on the hot path. Deterministic for a given device, chunk and config;
  batch invariance is not bought here with per-expert loops. Runs on CPU too, which is how CI tests it.

Shapes (gptq.py's internal column-major layout): W [E, N, K], columns [c, E, N], V [E, K, K] unit upper.
"""

from __future__ import annotations

import torch

from moequant.config import GPTQBackend
from moequant.quantizers.gptq_factor import _reverse_factor

_MATMUL_OUT_BYTES = 8 * 2**20  # the per-expert product is formed in row slices of about this size


class PerExpertOps:
    """Batch-invariant steps: every sum runs on one expert's matrices."""

    batched = False

    @staticmethod
    def columns(cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [c, E, N] = cols [E, N, c] transposed, one 2-D transpose per expert (faster than one copy:
        evals/results/figures_from_code_comments.md)."""
        for e in range(cols.shape[0]):
            out[:, e] = cols[e].T
        return out

    @staticmethod
    def factor(
        H, diag, perm, percdamp: float, tries: int, Vt, Vdiag, damps
    ) -> tuple[list[int], dict[int, int]]:
        """Per expert e: Vt[e] = (V D^-1)^T, Vdiag[e] = D for H[e] + damp I = V V^T, damp = percdamp *
        mean(diag[e]) x 10^t for the first t in [0, tries] whose factorisation succeeds. Returns (experts that
        failed at every t, {expert: t > 0 it needed})."""
        failed, escalated = [], {}
        for e in range(H.shape[0]):
            He = H[e].to(torch.float32)  # [K, K] (no copy for a float32 H)
            pe = None if perm is None else perm[e]  # [K]
            base = percdamp * diag[e].mean()  # scalar float32, on the unpermuted diagonal
            for t in range(tries + 1):
                damp = base * 10.0**t
                if _reverse_factor(He, diag[e] + damp, pe, Vt[e], Vdiag[e]):  # writes V^T D^-1 and D
                    break
            else:
                failed.append(e)
                continue
            damps[e] = damp
            if t > 0:
                escalated[e] = t
        return failed, escalated

    @staticmethod
    def group_weights(Cg: torch.Tensor, Vgg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [g, E, N] = X with X Vgg = Cg^T per expert (Vgg [E, g, g] unit upper), solved on the right
        (faster than the left solve)."""
        for e in range(Cg.shape[1]):
            out[:, e] = torch.linalg.solve_triangular(
                Vgg[e], Cg[:, e].T, upper=True, left=False, unitriangular=True
            ).T
        return out

    @staticmethod
    def store_block(codes, Losses, Sums, Q1, W1, W0, Delta1, Vdiag, i1: int, i2: int) -> None:
        """codes[:, :, i1:i2] = the block's codes Q1 [B, E, N]; Losses [E] += sum ((w - q) V_ii)^2 / 2;
        Sums [E, 2] += (sum (w0 - q)^2, sum w0^2)."""
        for e in range(Q1.shape[1]):  # per expert: a batched reduction may order the additions differently
            codes[e, :, i1:i2] = Q1[:, e].T  # [N, B] float codes -> uint8
            Err1 = (W1[:, e] - W0[:, e]).add_(Delta1[:, e]).mul_(Vdiag[e, i1:i2, None])  # [B, N] (w-q) V_ii
            Losses[e] += Err1.pow_(2).sum(dtype=torch.float64) / 2  # reference: (w - q)^2 / d^2 / 2
            Sums[e, 0] += Delta1[:, e].square().sum(dtype=torch.float64)
            Sums[e, 1] += W0[:, e].square().sum(dtype=torch.float64)

    @staticmethod
    def add_matmul_(target: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
        """target[:, e] += A[e]^T @ B[:, e] for every expert: one mm per expert, so rounding never depends on E.

        target [m, E, N], A [E, n, m], B [n, E, N]. The product is formed in row slices (bounded temporary: a
        whole [m, N] product of a large expert is tens of MB); slices depend on N only, never on E.
        """
        m, N = target.shape[0], target.shape[2]
        rows = max(1, _MATMUL_OUT_BYTES // (4 * N))
        buf = A.new_empty(min(rows, m), N)  # one product slice for all: a fresh one faults its pages in again
        for e in range(A.shape[0]):  # (addmm_ into the strided target rounds differently per E)
            for r1 in range(0, m, rows):
                r2 = min(r1 + rows, m)
                target[r1:r2, e] += torch.mm(A[e, :, r1:r2].T, B[:, e], out=buf[: r2 - r1])  # [r, n] @ [n, N]


class BatchedOps:
    """The same steps as PerExpertOps, each one batched call over the experts (accelerators)."""

    batched = True

    @staticmethod
    def columns(cols: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(cols.permute(2, 0, 1))  # [c, E, N]

    @staticmethod
    def factor(
        H, diag, perm, percdamp: float, tries: int, Vt, Vdiag, damps
    ) -> tuple[list[int], dict[int, int]]:
        """PerExpertOps.factor with one batched Cholesky per damping step over the experts still failing."""
        E, K, _ = H.shape
        base = percdamp * diag.mean(dim=-1)  # [E]
        rev = torch.arange(K - 1, -1, -1, device=H.device)  # [K] index reversal P
        order = rev.expand(E, K) if perm is None else perm.flip(-1)  # [E, K] permutation then reversal
        todo = torch.arange(E, device=H.device)  # experts not factored yet
        escalated: dict[int, int] = {}
        for t in range(tries + 1):
            o = order[todo]  # [n, K]
            A = torch.gather(H[todo].to(torch.float32), 1, o[:, :, None].expand(-1, K, K))  # [n, K, K] rows
            A = torch.gather(A, 2, o[:, None, :].expand(-1, K, K))  # [n, K, K] P A P
            d = (diag[todo] + (base[todo] * 10.0**t)[:, None]).gather(
                1, o
            )  # [n, K] damped, permuted diagonal
            A.diagonal(dim1=-2, dim2=-1).copy_(d)
            L, info = torch.linalg.cholesky_ex(A)  # [n, K, K] lower
            V = L.mT.flip(-2, -1)  # [n, K, K] P L^T P = V^T (lower)
            Vd = V.diagonal(dim1=-2, dim2=-1)  # [n, K]
            ok = (info == 0) & torch.isfinite(Vd).all(dim=-1)  # [n]
            done = todo[ok]
            Vdiag[done] = Vd[ok]
            Vt[done] = V[ok] / Vd[ok][:, :, None]
            damps[done] = base[done] * 10.0**t
            if t > 0:
                escalated.update({int(e): t for e in done.tolist()})
            todo = todo[~ok]
            if not todo.numel():
                break
        return todo.tolist(), escalated

    @staticmethod
    def group_weights(Cg: torch.Tensor, Vgg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        X = torch.linalg.solve_triangular(
            Vgg, Cg.permute(1, 2, 0), upper=True, left=False, unitriangular=True
        )
        return out.copy_(X.permute(2, 0, 1))  # [E, N, g] -> [g, E, N]

    @staticmethod
    def store_block(codes, Losses, Sums, Q1, W1, W0, Delta1, Vdiag, i1: int, i2: int) -> None:
        codes[:, :, i1:i2] = Q1.permute(1, 2, 0)  # [E, N, B] float codes -> uint8
        Err1 = (W1 - W0).add_(Delta1).mul_(Vdiag[:, i1:i2].T[:, :, None])  # [B, E, N] (w - q) V_ii
        Losses += Err1.pow_(2).sum(dim=(0, 2), dtype=torch.float64) / 2  # [E]
        Sums[:, 0] += Delta1.square().sum(dim=(0, 2), dtype=torch.float64)  # [E]
        Sums[:, 1] += W0.square().sum(dim=(0, 2), dtype=torch.float64)  # [E]

    @staticmethod
    def add_matmul_(target: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
        target += torch.bmm(A.mT, B.transpose(0, 1)).transpose(0, 1)  # [E, m, n] @ [E, n, N] -> [m, E, N]


def ops_for(backend: GPTQBackend, device: torch.device) -> type[PerExpertOps] | type[BatchedOps]:
    """The steps for `backend` (AUTO: per-expert LAPACK on CPU, batched torch elsewhere)."""
    if backend is GPTQBackend.AUTO:
        backend = GPTQBackend.LAPACK if device.type == "cpu" else GPTQBackend.TORCH
    if backend is GPTQBackend.LAPACK and device.type != "cpu":
        raise ValueError(f"the lapack GPTQ backend runs on CPU only, not {device}")
    return PerExpertOps if backend is GPTQBackend.LAPACK else BatchedOps
