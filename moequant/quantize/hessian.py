"""Per-expert Hessians H = 2/n sum_t w_t x_t x_t^T, accumulated chunk by chunk from routed tokens (the upper
triangle, mirrored when finalized)."""

from __future__ import annotations

import torch

_PRODUCT_BYTES = 8 * 2**20  # size of one row slice of X^T X (row slices round like the whole product)
_SLICES = 8  # at least this many row slices: the upper triangle costs (1 + 1/slices) / 2 of the full product
_MIN_ROWS = 128  # fewer rows per slice multiply below the BLAS's best speed


_MIRROR_ROWS = 256  # rows per block when the lower triangle is copied from the upper (_mirror)


def _slice_rows(K: int, element_size: int) -> int:
    """Rows of one slice of X^T X [K, K]: within _PRODUCT_BYTES, and at most K / _SLICES where that leaves
    _MIN_ROWS or more (the triangle's saving against the smaller products' speed)."""
    return max(1, min(_PRODUCT_BYTES // (element_size * K), max(_MIN_ROWS, -(-K // _SLICES))))


class HessianAccumulator:
    """Accumulates the input second moments of E experts with K input features.

    add(e, X) / add(None, X) add a chunk to one expert / every expert; add_routed adds each token to
    the experts the router sent it to (or, with all_experts=True, to every expert: the
    all-experts calibration pass). Token weights (routing weights) are optional; an unweighted
    token weighs 1, so the weight mass equals the token count when nothing is weighted.

    finalize() -> H [E, K, K] = 2 / mass * sum_t w_t x_t x_t^T (the reference's 2/n X^T X); an expert
    with no tokens gets an all-zero H (the caller picks the fallback, e.g. RTN or identity).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        *,
        all_experts: bool = False,
        dtype: torch.dtype = torch.float32,  # float64 for long calibration runs on CPU
        device: torch.device | str | None = None,
    ):
        self.num_experts, self.in_features, self.all_experts = num_experts, in_features, all_experts
        self.dtype = dtype
        self.S = torch.zeros(num_experts, in_features, in_features, dtype=dtype, device=device)  # [E, K, K]
        self.tokens = torch.zeros(num_experts, dtype=torch.int64, device=device)  # [E] tokens seen
        self.mass = torch.zeros(num_experts, dtype=torch.float64, device=device)  # [E] sum of token weights
        self._product: torch.Tensor | None = None  # add's reused product slice (allocated on first use)

    def add(self, expert: int | None, X: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add X [T, K] (with optional weights [T]) to one expert, or to every expert when expert is None."""
        X = self._check(X)  # [T, K]
        Xw = X if weights is None else X * weights.to(self.dtype)[:, None]  # [T, K]
        mass = float(X.shape[0]) if weights is None else float(weights.to(torch.float64).sum())
        S = self.S if expert is None else self.S[expert]  # [E, K, K] (every expert) or [K, K]
        K = self.in_features
        rows = _slice_rows(K, X.element_size())
        if self._product is None:  # one row slice of the product for every add: a fresh one faults in again
            self._product = torch.empty(min(rows, K), K, dtype=self.dtype, device=self.S.device)  # [r, K]
        for r1 in range(0, K, rows):  # Xw^T X in row slices: a bounded temporary instead of a [K, K] one
            r2 = min(r1 + rows, K)
            # the slice's columns from its diagonal block on: X^T X is symmetric, finalize mirrors the rest
            S[..., r1:r2, r1:] += torch.mm(
                Xw[:, r1:r2].T, X[:, r1:], out=self._product[: r2 - r1, : K - r1]
            )  # [r, K - r1] to every expert
        if expert is None:
            self.tokens += X.shape[0]
            self.mass += mass
        else:
            self.tokens[expert] += X.shape[0]
            self.mass[expert] += mass

    def add_routed(
        self,
        X: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor | None = None,
        experts: list[int] | None = None,
    ) -> None:
        """Add tokens X [T, K] to their routed experts top_k_index [T, k] (weights [T, k] optional).

        `experts`: the model's expert ids this accumulator's rows stand for, in order (default 0..E-1);
        slots routed to any other expert are skipped, so a chunk of experts needs only its own Hessians.
        In all_experts mode every token goes to every expert unweighted: routing weights are only
        defined for the experts a token was routed to.
        """
        if self.all_experts:
            self.add(None, X)
            return
        X = self._check(X)  # [T, K]
        k = top_k_index.shape[-1]
        slots = top_k_index.reshape(-1).to(torch.int64)  # [T*k] expert of each (token, slot)
        token = torch.arange(X.shape[0], device=X.device).repeat_interleave(k)  # [T*k]
        w = None if top_k_weights is None else top_k_weights.reshape(-1)  # [T*k]
        if experts is not None and slots.numel():  # model ids -> this accumulator's rows, others dropped
            if int(slots.min()) < 0:
                raise ValueError("top_k_index holds negative expert ids")
            row = torch.full((max(int(slots.max()), *experts) + 1,), -1, dtype=torch.int64, device=X.device)
            row[torch.tensor(experts, device=X.device)] = torch.arange(len(experts), device=X.device)
            slots = row[slots]  # [T*k]
            keep = slots >= 0  # [T*k]
            slots, token = slots[keep], token[keep]
            w = None if w is None else w[keep]
        order = torch.argsort(slots, stable=True)  # [S] grouped by expert
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_experts):
            raise ValueError(f"top_k_index holds experts outside [0, {self.num_experts})")
        counts = torch.bincount(slots, minlength=self.num_experts).tolist()  # [E]
        w = None if w is None else w[order]  # [S]
        token = token[order]
        start = 0
        for e, n in enumerate(counts):
            if n:
                self.add(e, X[token[start : start + n]], None if w is None else w[start : start + n])
            start += n

    def finalize(self, inplace: bool = False) -> torch.Tensor:
        """H [E, K, K] = 2 / mass * S; experts without tokens get zeros. `inplace` scales S itself (no second
        [E, K, K] buffer; the accumulator is spent afterwards)."""
        scale = torch.where(self.mass > 0, 2.0 / self.mass.clamp(min=1e-300), 0.0)  # [E] float64
        self._product = None
        self._mirror()
        if inplace:
            S, self.S = self.S, None
            return S.mul_(scale.to(self.dtype)[:, None, None])  # [E, K, K]
        return self.S * scale.to(self.dtype)[:, None, None]  # [E, K, K]

    def _mirror(self) -> None:
        """S's lower triangle := its upper triangle transposed (add computes the upper triangle and the
        diagonal blocks): every H is exactly symmetric. Once: finalize calls it."""
        if self.S.shape[0] == 0 or self.S.shape[-1] == 0:
            return
        K = self.S.shape[-1]
        for S in self.S:  # [K, K], a block of rows at a time: each lower block is one transposed copy
            for r1 in range(0, K, _MIRROR_ROWS):
                r2 = min(r1 + _MIRROR_ROWS, K)
                D = S[r1:r2, r1:r2]  # [b, b] diagonal block: its lower triangle from its upper
                D.copy_(D.triu() + D.triu(1).T)
                S[r1:r2, :r1] = S[:r1, r1:r2].T  # [b, r1] left of the diagonal block

    def _check(self, X: torch.Tensor) -> torch.Tensor:
        if X.dim() != 2 or X.shape[1] != self.in_features:
            raise ValueError(f"expected X [T, {self.in_features}], got {tuple(X.shape)}")
        return X.to(self.dtype)
