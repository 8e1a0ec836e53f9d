"""`--method signround`: a chunk of experts learns its rounding and clipping against each expert's output on the
tokens routed to it (the grid and the step: quantizers/signround.py).

Loss of expert e, over a sample of its routed tokens t (a fresh sample every step):

    L_e = mean_t  w_t^2 || f_q(x_t) - f(x_t) ||^2

f is the original expert (gate/up, activation, down: arch.apply_activation), f_q the same with fake-quantized
weights, w_t the routing weight (1 when the quantize config does not weight by routing), x_t the input the
quantized model so far gives the expert. Both projections learn at once (a projection at another method, e.g.
an ExpertSpec 'signround:2/gptq:3', stays as its handler stored it). The experts are a batch dimension: one
forward and backward per step for the whole chunk. The learning rate decays linearly to zero and the last step's
parameters are kept (on the bundled model the lowest sampled loss picked earlier, worse parameters:
evals/results/signround.md).
"""

from __future__ import annotations

import torch

from moequant.arch import apply_activation
from moequant.config import QuantizeConfig, QuantSpec, SignRoundOptions
from moequant.modules.qlinear import PackedWeight
from moequant.quantize.expert_hessians import token_sets
from moequant.quantizers.signround import Grid, sign_step


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


def _experts_forward(x, Wgu, Wdn, bgu, bdn, arch, act_params) -> torch.Tensor:
    """Every expert of the chunk on its own tokens: x [Ec, b, H], Wgu [Ec, 2I, H], Wdn [Ec, H, I] -> [Ec, b, H]."""
    h = torch.bmm(x, Wgu.mT)  # [Ec, b, 2I]
    if bgu is not None:
        h = h + bgu[:, None]
    y = torch.bmm(apply_activation(arch.activation, h, act_params), Wdn.mT)  # [Ec, b, H]
    return y if bdn is None else y + bdn[:, None]


def _loss(x, y, rw, grids, params, fixed, bgu, bdn, arch, act_params) -> torch.Tensor:
    """[Ec] sum over the tokens of rw^2 ||f_q(x) - y||^2 (x, y [Ec, b, H], rw [Ec, b]; padding has rw = 0)."""
    Wq = [fixed[i] if grids[i] is None else grids[i].fake(params[i]) for i in range(2)]
    out = _experts_forward(x, *Wq, bgu, bdn, arch, act_params)  # [Ec, b, H]
    return (((out - y) ** 2).sum(-1) * rw**2).sum(1)


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
) -> tuple[list, list, list[bool]]:
    """The chunk's (gate/up, down) storage modules after SignRound, and per expert whether a learned step beat
    the handlers' result (else the expert keeps it). `w`: the chunk's original weights
    (ExpertWeights, row j is expert part[j]); `specs` the projections' specs; `stored` the modules the
    projections' handlers made (the start of a projection that learns: round to nearest; else kept as is);
    `learns` which projections learn; `seed`: the layer index (the token sample depends on it and the chunk)."""
    opts = config.signround
    device = w.down.device
    W = (w.gate_up.to(torch.float32), w.down.to(torch.float32))  # [Ec, 2I, H], [Ec, H, I]
    bgu = None if w.gate_up_bias is None else w.gate_up_bias.to(torch.float32)
    bdn = None if w.down_bias is None else w.down_bias.to(torch.float32)
    X, RW, count = _routed_inputs(part, batches, config, opts, seed, device)
    with torch.no_grad():
        Y = _experts_forward(X, *W, bgu, bdn, arch, act_params)  # [Ec, T, H] the original experts' outputs
    grids = [Grid(W[i], s.bits, s.group_size, s.sym) if learns[i] else None for i, s in enumerate(specs)]
    params = [g.start() if g is not None else None for g in grids]
    lr = opts.lr if opts.lr is not None else 1.0 / max(opts.steps, 1)
    gen = torch.Generator(device=device).manual_seed(seed * 100003 + part[0])
    learned = [p for p in params if p is not None]
    best = [[t.detach().clone() for t in p.tensors()] for p in learned]
    with torch.no_grad():  # the handlers' result (GPTQ) is each expert's first candidate
        stored_w = [
            torch.stack([m.dequantize(torch.float32) for m in stored[i]]).to(device) for i in range(2)
        ]
        fixed = [None if learns[i] else stored_w[i] for i in range(2)]  # [Ec, N, K] projections that stay
        best_loss = _loss(X, Y, RW, [None, None], None, stored_w, bgu, bdn, arch, act_params) / count  # [Ec]
    beaten = torch.zeros(len(part), dtype=torch.bool, device=device)  # [Ec] a learned step did better
    Ec, _, H = X.shape
    for it in range(opts.steps + 1):
        if it % opts.eval_every == 0 or it == opts.steps:  # keep each expert's best on all its kept tokens
            with torch.no_grad():
                full = _loss(X, Y, RW, grids, params, fixed, bgu, bdn, arch, act_params) / count  # [Ec]
                better = full < best_loss  # [Ec]
                best_loss = torch.where(better, full, best_loss)
                beaten |= better
                for b, p in zip(best, learned, strict=True):
                    for bt, t in zip(b, p.tensors(), strict=True):
                        bt[better] = t.detach()[better]
        if it == opts.steps:
            break
        pick = (
            torch.rand(Ec, opts.batch_tokens, generator=gen, device=device) * count[:, None]
        ).long()  # [Ec, b]
        x = X.gather(1, pick[..., None].expand(-1, -1, H))  # [Ec, b, H]
        y = Y.gather(1, pick[..., None].expand(-1, -1, H))  # [Ec, b, H]
        _loss(x, y, RW.gather(1, pick), grids, params, fixed, bgu, bdn, arch, act_params).sum().backward()
        sign_step(learned, lr * (1 - it / opts.steps), opts.clip_min)
    for b, p in zip(best, learned, strict=True):
        with torch.no_grad():
            for bt, t in zip(b, p.tensors(), strict=True):
                t.copy_(bt)
    mods = []
    for i in range(2):
        if learns[i]:
            r = grids[i].result(params[i])
            mods.append(
                [
                    PackedWeight.from_packed(r.packed(j), specs[i]) if beaten[j] else stored[i][j]
                    for j in range(len(part))
                ]
            )
        else:
            mods.append(stored[i])
    return mods[0], mods[1], beaten.tolist()
