"""`--method signround`: a chunk of experts learns its rounding and clipping against the layer's output (the
grid and the step: quantizers/signround.py).

The block target (SignRoundTarget.BLOCK, the default): over a sample S of the tokens routed to the chunk (a fresh
sample every step),

    L = sum_{t in S} || sum_{e routed t} w_te (f_q,e(x_t) - f_e(x_t)) - drift_t ||^2

f_e is the original expert (gate/up, activation, down: arch.apply_activation), f_q,e the same with fake-quantized
weights, w_te the routing weight, x_t the input the quantized model so far gives the experts, and drift_t the
difference between the unquantized model's layer output and the quantized model's (the layer's experts still
unquantized; quantize/drift.py). So the quantized routed sum learns to give the unquantized model's output, as
AutoRound's block target does (experts of other chunks count as exact). The expert target (SignRoundTarget.EXPERT)
learns each expert alone, L_e = mean_t w_t^2 || f_q(x_t) - f(x_t) ||^2 over its routed tokens; on the bundled
model it closes less of the gap (evals/results/signround.md).

Both projections learn at once from round-to-nearest (a projection at another method, e.g. an ExpertSpec
'signround:2/gptq:3', stays as its handler stored it). The experts are a batch dimension: one forward and
backward per step for the whole chunk; the learning rate decays linearly to zero.

Candidates: the handlers' result (GPTQ, the signround handler) and the parameters every `eval_every` steps,
each scored over all kept tokens (not the step's sample: on the bundled model the lowest sampled loss picked
worse parameters): by L_e, or for the block target by the mean over the expert's tokens of their terms of L; each
expert stores its best (quant_report.json: "signround": "learned" or "start"). Sign steps on straight-through
rounding drift to rounding boundaries, so the last step alone can be worse than its start
(tests/quantizers/test_signround.py measures the kept best).

Bytes depend on the chunking (the batched products and the chunk's token sample): unlike GPTQ's, a signround
checkpoint written with another --gptq-chunk-mb or world size is a different (equally valid) result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moequant.arch import apply_activation
from moequant.config import QuantizeConfig, QuantSpec, SignRoundOptions, SignRoundTarget
from moequant.modules.qlinear import PackedWeight
from moequant.quantize.expert_hessians import token_sets
from moequant.quantizers.signround import Grid, sign_step

logger = logging.getLogger(__name__)


def _routed_inputs(part, batches, config: QuantizeConfig, opts: SignRoundOptions, seed: int, device):
    """X [Ec, T, H] float32 the routed inputs of each expert (a seeded subset of at most opts.max_tokens, zero
    padded), RW [Ec, T] their routing weights (0 on padding), count [Ec] real tokens (at least 1)."""
    xs, ws = [], []
    for e in part:
        sel = token_sets(e, batches, config)
        x = (
            torch.cat([t.take() for t in sel])
            if sel
            else torch.zeros(0, batches[0][0].shape[-1], device=device)
        )
        w = (
            torch.cat([t.weights.float() if t.weights is not None else x.new_ones(t.size) for t in sel])
            if sel
            else x.new_zeros(0)
        )  # [Te]
        if x.shape[0] > opts.max_tokens:
            g = torch.Generator().manual_seed(seed * 100003 + e)
            keep = torch.randperm(x.shape[0], generator=g)[: opts.max_tokens].sort().values.to(device)
            x, w = x[keep], w[keep]
        xs.append(x)
        ws.append(w)
    T = max(1, max(x.shape[0] for x in xs))
    X = torch.zeros(len(part), T, xs[0].shape[-1], device=device)  # [Ec, T, H]
    RW = torch.zeros(len(part), T, device=device)  # [Ec, T]
    for j, (x, w) in enumerate(zip(xs, ws, strict=True)):
        X[j, : x.shape[0]] = x
        RW[j, : w.shape[0]] = w
    count = torch.tensor([max(1, x.shape[0]) for x in xs], device=device)  # [Ec]
    return X, RW, count


def _pooled_inputs(part, batches, drift, opts: SignRoundOptions, seed: int, device):
    """The block target's tokens: the pool of tokens routed to at least one expert of `part` (a seeded subset
    of at most opts.max_tokens per expert), X [Ec, T, H] each expert's routed inputs from the pool (zero
    padded), RW [Ec, T] their routing weights (0 on padding), count [Ec], tok [Ec, T] their pool rows, D [P, H]
    the pool's drift."""
    x = torch.cat([b[0] for b in batches]).to(device)  # [N, H]
    idx = torch.cat([b[1] for b in batches]).to(device)  # [N, k]
    w = torch.cat([b[2] for b in batches]).to(device)  # [N, k]
    D = torch.cat(drift).to(device)  # [N, H]
    rows = torch.where(torch.isin(idx, torch.tensor(part, device=device)).any(1))[0]  # [P]
    cap = opts.max_tokens * len(part) // idx.shape[1]
    if rows.numel() > cap:
        g = torch.Generator().manual_seed(seed * 100003 + part[0])
        rows = rows[torch.randperm(rows.numel(), generator=g)[:cap].sort().values.to(device)]
    x, idx, w, D = x[rows].float(), idx[rows], w[rows].float(), D[rows]
    pairs = [torch.where(idx == e) for e in part]  # (pool rows, top-k slot) per expert
    T = max(1, max(r.numel() for r, _ in pairs))
    tok = torch.zeros(len(part), T, dtype=torch.long, device=device)  # [Ec, T]
    RW = torch.zeros(len(part), T, device=device)  # [Ec, T]
    for j, (r, c) in enumerate(pairs):
        tok[j, : r.numel()] = r
        RW[j, : r.numel()] = w[r, c]
    X = x[tok]  # [Ec, T, H]
    count = torch.tensor([max(1, r.numel()) for r, _ in pairs], device=device)  # [Ec]
    return X, RW, count, tok, D


def _experts_forward(x, Wgu, Wdn, bgu, bdn, arch, act_params) -> torch.Tensor:
    """Every expert of the chunk on its own tokens: x [Ec, b, H], Wgu [Ec, 2I, H], Wdn [Ec, H, I] -> [Ec, b, H]."""
    h = torch.bmm(x, Wgu.mT)  # [Ec, b, 2I]
    if bgu is not None:
        h = h + bgu[:, None]
    y = torch.bmm(apply_activation(arch.activation, h, act_params), Wdn.mT)  # [Ec, b, H]
    return y if bdn is None else y + bdn[:, None]


@dataclass
class _Problem:
    """What every step of one chunk reads: routed inputs X [Ec, T, H], the original outputs Y [Ec, T, H],
    routing weights RW [Ec, T], real tokens count [Ec], the grids and parameters of the projections that learn
    (None for one that stays) and the fixed weights of one that stays ([Ec, N, K] or None), the biases, the
    activation."""

    X: torch.Tensor
    Y: torch.Tensor
    RW: torch.Tensor
    count: torch.Tensor
    grids: list
    params: list
    fixed: list
    bias: tuple
    arch: object
    act_params: dict

    def current(self) -> list[torch.Tensor]:
        """(gate/up, down) weights now: the fake-quantized parameters of a projection that learns, else its fixed
        weights."""
        return [
            self.fixed[i] if self.grids[i] is None else self.grids[i].fake(self.params[i]) for i in (0, 1)
        ]

    def loss(self, x, y, rw, weights=None) -> torch.Tensor:
        """[Ec] sum over the tokens of rw^2 ||f_q(x) - y||^2 (x, y [Ec, b, H], rw [Ec, b]; padding has rw = 0);
        f_q from `weights` (gate/up, down) when given, else from the parameters."""
        weights = self.current() if weights is None else weights
        out = _experts_forward(x, *weights, *self.bias, self.arch, self.act_params)  # [Ec, b, H]
        return (((out - y) ** 2).sum(-1) * rw**2).sum(1)

    def full_loss(self, weights=None) -> torch.Tensor:
        """[Ec] the mean loss per token over all kept tokens."""
        with torch.no_grad():
            return self.loss(self.X, self.Y, self.RW, weights) / self.count

    def sample_loss(self, batch_tokens: int, gen) -> torch.Tensor:
        """The summed loss over `batch_tokens` routed tokens per expert, drawn with replacement."""
        Ec, _, H = self.X.shape
        u = torch.rand(Ec, batch_tokens, generator=gen, device=self.X.device)  # [Ec, b]
        pick = (u * self.count[:, None]).long()  # [Ec, b] token indices, with replacement
        x = self.X.gather(1, pick[..., None].expand(-1, -1, H))  # [Ec, b, H]
        y = self.Y.gather(1, pick[..., None].expand(-1, -1, H))  # [Ec, b, H]
        return self.loss(x, y, self.RW.gather(1, pick)).sum()


@dataclass
class _BlockProblem(_Problem):
    """The block target: a pool of P tokens routed to the chunk's experts, each expert's routed pairs
    (tok [Ec, T] the pool row of each pair, RW its routing weight, 0 on padding) and the layer's drift on the
    pool D [P, H]. The loss of a token set S is sum over t in S of

        || sum_{e routed t} w_te (f_q,e(x_t) - f_e(x_t)) - D_t ||^2

    (experts of other chunks count as exact). An expert's score is the mean of that over its tokens."""

    tok: torch.Tensor = None
    D: torch.Tensor = None

    def residual(self, cols, rw, weights=None) -> torch.Tensor:
        """[P, H] the routed sum's error minus the drift, from the pairs `cols` [Ec, b] weighted by rw [Ec, b]."""
        H = self.X.shape[-1]
        weights = self.current() if weights is None else weights
        x = self.X.gather(1, cols[..., None].expand(-1, -1, H))  # [Ec, b, H]
        y = self.Y.gather(1, cols[..., None].expand(-1, -1, H))  # [Ec, b, H]
        d = (_experts_forward(x, *weights, *self.bias, self.arch, self.act_params) - y) * rw[..., None]
        t = self.tok.gather(1, cols)  # [Ec, b]
        return torch.zeros_like(self.D).index_add(0, t.reshape(-1), d.reshape(-1, H)) - self.D  # [P, H]

    def full_loss(self, weights=None) -> torch.Tensor:
        with torch.no_grad():
            cols = torch.arange(self.X.shape[1], device=self.X.device).expand(self.X.shape[0], -1)  # [Ec, T]
            per_token = (self.residual(cols, self.RW, weights) ** 2).sum(-1)  # [P]
            return (per_token[self.tok] * (self.RW > 0)).sum(1) / self.count  # [Ec]

    def sample_loss(self, batch_tokens: int, gen) -> torch.Tensor:
        """The loss over a sample of pool tokens (about `batch_tokens` routed pairs per expert)."""
        P, device = self.D.shape[0], self.X.device
        k = max(1, round(float((self.RW > 0).sum()) / P))  # routed pairs per pool token
        S = min(P, batch_tokens * self.X.shape[0] // k)
        chosen = torch.zeros(P, dtype=torch.bool, device=device)
        chosen[torch.randperm(P, generator=gen, device=device)[:S]] = True
        sel = chosen[self.tok] & (self.RW > 0)  # [Ec, T]
        b = max(1, int(sel.sum(1).max()))
        cols = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :b]  # [Ec, b] selected pairs first
        rw = self.RW.gather(1, cols) * sel.gather(1, cols)  # [Ec, b] (0: not in the sample)
        return (self.residual(cols, rw)[chosen] ** 2).sum()


@torch.enable_grad()
def signround_chunk(
    arch,
    w,
    part: list[int],
    specs: tuple[QuantSpec, QuantSpec],
    stored: tuple[list, list],
    learns: tuple[bool, bool],
    batches,
    config: QuantizeConfig,
    act_params: dict,
    seed: int,
    drift: list[torch.Tensor] | None = None,
) -> tuple[list, list, list[bool]]:
    """The chunk's (gate/up, down) storage modules after SignRound, and per expert whether a learned step beat
    the handlers' result (else the expert keeps that result). `w`: the chunk's original weights (ExpertWeights,
    row j is expert part[j]); `specs` the projections' specs; `stored` the modules the projections' handlers
    made (GPTQ's for signround); `learns` which projections learn; `seed`: the layer index (the token sample
    depends on it and on the chunk's first expert)."""
    opts = config.signround
    device = w.down.device
    W = (w.gate_up.to(torch.float32), w.down.to(torch.float32))  # [Ec, 2I, H], [Ec, H, I]
    bias = tuple(None if b is None else b.to(torch.float32) for b in (w.gate_up_bias, w.down_bias))
    block = opts.target is SignRoundTarget.BLOCK
    if block and drift is None:
        raise ValueError("signround's block target needs the layer's drift (quantize/drift.py)")
    if block:
        X, RW, count, tok, D = _pooled_inputs(part, batches, drift, opts, seed, device)
    else:
        X, RW, count = _routed_inputs(part, batches, config, opts, seed, device)
    with torch.no_grad():
        Y = _experts_forward(X, *W, *bias, arch, act_params)  # [Ec, T, H] the original experts' outputs
        stored_w = [torch.stack([m.dequantize(torch.float32) for m in stored[i]]).to(device) for i in (0, 1)]
    grids = [Grid(W[i], s.bits, s.group_size, s.sym) if learns[i] else None for i, s in enumerate(specs)]
    prob = _Problem(
        X, Y, RW, count, grids, [g and g.start() for g in grids],
        [None if learns[i] else stored_w[i] for i in (0, 1)], bias, arch, act_params,
    )  # fmt: skip
    if block:
        prob = _BlockProblem(**vars(prob), tok=tok, D=D)
    gen = torch.Generator(device=device).manual_seed(seed * 100003 + part[0])
    beaten = _learn(prob, opts, prob.full_loss(stored_w), gen)  # [Ec]
    logger.debug("signround: %d of %d experts keep a learned result", int(beaten.sum()), len(part))
    mods = []
    for i in (0, 1):
        r = grids[i].result(prob.params[i]) if learns[i] else None
        mods.append(
            [
                PackedWeight.from_packed(r.packed(j), specs[i])
                if r is not None and beaten[j]
                else stored[i][j]
                for j in range(len(part))
            ]
        )
    return mods[0], mods[1], beaten.tolist()


def _learn(prob: _Problem, opts: SignRoundOptions, best_loss: torch.Tensor, gen) -> torch.Tensor:
    """opts.steps signed steps on fresh token samples; every opts.eval_every steps (and after the last) each
    expert whose loss over all its kept tokens is below its best so far keeps these parameters. Leaves the best
    parameters in prob.params; returns [Ec] bool: the expert beat `best_loss` (the stored result's) at all."""
    learned = [p for p in prob.params if p is not None]
    best = [[t.detach().clone() for t in p.tensors()] for p in learned]
    beaten = torch.zeros_like(best_loss, dtype=torch.bool)  # [Ec]
    lr = opts.lr if opts.lr is not None else 1.0 / max(opts.steps, 1)
    for it in range(opts.steps + 1):
        if it % opts.eval_every == 0 or it == opts.steps:
            full = prob.full_loss()  # [Ec]
            better = full < best_loss  # [Ec]
            best_loss = torch.where(better, full, best_loss)
            beaten |= better
            for b, p in zip(best, learned, strict=True):
                for bt, t in zip(b, p.tensors(), strict=True):
                    bt[better] = t.detach()[better]
        if it == opts.steps:
            break
        prob.sample_loss(opts.batch_tokens, gen).backward()
        sign_step(learned, lr * (1 - it / opts.steps), opts.clip_min)  # linear decay to 0
    with torch.no_grad():
        for b, p in zip(best, learned, strict=True):
            for bt, t in zip(b, p.tensors(), strict=True):
                t.copy_(bt)
    return beaten
