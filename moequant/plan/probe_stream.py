"""The streamed layer probe: what rounding one layer's experts costs at the model's output, from one forward and
one backward stream over the layers, one layer in memory at a time.

The whole-model probe (probe.py) measures, per MoE layer L, the calibration loss increase with L's experts
at RTN `low` bits: one full-model forward per layer, the whole model in memory. This probe estimates the same
kind of number, the expected KL between the model's next-token distributions without and with the rounding,
to second order (the Gauss-Newton / Fisher form):

    KL_L ~ 1/2 sum_t (J_t d_L)^T F_t (J_t d_L),   F_t = diag(p_t) - p_t p_t^T

d_L: the change of layer L's output when its experts are rounded; J_t: the Jacobian of token t's logits
with respect to layer L's output (through every later layer, attention and routing weights included);
p_t: the model's next-token distribution. It is estimated without forming J or F: with labels y_t drawn
from p_t, v_t = onehot(y_t) - p_t has covariance F_t, and g = J^T v (one backward pass) gives
E[(g . d_L)^2] = sum_t (J_t d_L)^T F_t (J_t d_L); different sequences give independent draws (their
gradients do not mix), and `draws` label draws per sequence average the noise down.

Cost per layer, on the probe's `samples` sequences (PlanConfig.probe_samples pieces of probe_len tokens,
plan/probe.probe_ids: 16 x 128 by default): the forward stream (one layer forward), then in the backward
stream one forward under autograd (its experts' pre-activations kept), one forward per rounding and, per label
draw, one down and one gate/up product per routed token (probe_experts.py). Each batch of about
`batch_tokens` tokens reads the layer's experts once per forward, rounding and draw, so 2048 tokens make one
batch. The quantize pass, for comparison, runs the layer twice on every calibration token and builds and
solves every expert's Hessians; the probe reads 2048 tokens whatever the calibration size, linear in depth
(the whole-model probe is quadratic). The experts are read chunk by chunk in both streams; the layers' inputs
wait on disk between the streams.

Under torchrun each probe batch is cut into one piece of sequences per rank (sequences are independent):
every rank runs both streams on its own pieces, the final hidden states travel to every rank as tensors so
that each draws the labels of every batch as one process would (the same generator over the same batches),
and the ranks' sums add up at the end. The estimates equal one process's up to float rounding (a layer run on
8 sequences instead of 16).

What a second-order estimate cannot see: routing flips (the top-k choice is held fixed; the routing weights'
derivatives are in), and the first-order term of the cross-entropy on the calibration text itself (zero for
the KL to the model's own predictions).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moequant.arch import MoEArch, MoEBlockRef, block_ref, decoder_layers, experts_swapped
from moequant.calibration.capture import capture_inputs, next_inputs, run_layer
from moequant.calibration.stream import model_device
from moequant.checkpoint.source import Source
from moequant.plan.probe_experts import ChunkedExperts, Rounding
from moequant.quantizers.rtn import rtn_roundtrip
from moequant.runtime.memory import release_free_memory
from moequant.runtime.ranks import Ranks, current

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamProbeConfig:
    rounding: Rounding
    # sequences per forward / backward: as many as hold `batch_tokens` tokens (each batch reads the layer's
    # experts once per forward, rounding and label draw); batch_size set: that many
    batch_tokens: int = 2048
    batch_size: int | None = None
    draws: int = 2  # label draws per sequence (each one backward stream's vector-Jacobian products)
    chunk_mb: float = 256  # experts read per chunk (float32 MB)
    keep_mb: float = (
        256  # experts' pre-activations the clean forward keeps for the label draws' backwards (MB)
    )
    logits_mb: float = 256  # logits computed per slice of tokens at the top
    seed: int = 0
    progress: bool = True


class _no_param_grads:  # noqa: N801
    """Parameters of `module` do not require grad inside the `with` (the probe differentiates activations)."""

    def __init__(self, module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _top_gradients(
    source: Source, final: list[torch.Tensor], cfg: StreamProbeConfig
) -> list[list[torch.Tensor]]:
    """[draw][batch] g = J^T (onehot(y) - p) with respect to the last layer's output [B, S, H], labels y drawn
    from the model's own next-token distribution at every position but the last."""
    model, arch = source.model, source.arch
    norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    gen = torch.Generator().manual_seed(cfg.seed)
    grads: list[list[torch.Tensor]] = [[] for _ in range(cfg.draws)]
    vocab = head.weight.shape[0]
    for h in final:
        B, S, _ = h.shape
        step = max(1, int(cfg.logits_mb * 2**20 // (4 * B * vocab)))
        out = [torch.zeros_like(h) for _ in range(cfg.draws)]  # [B, S, H] each
        for s0 in range(0, S - 1, step):
            s1 = min(s0 + step, S - 1)  # the last position predicts nothing
            hs = h[:, s0:s1].detach().requires_grad_(True)  # [B, s, H]
            with torch.enable_grad(), _no_param_grads(norm), _no_param_grads(head):
                z = head(norm(hs)).float()  # [B, s, V]
                if cap:
                    z = torch.tanh(z / cap) * cap
                p = torch.softmax(z.detach(), dim=-1)  # [B, s, V]
                for d in range(cfg.draws):
                    y = torch.multinomial(p.reshape(-1, vocab), 1, generator=gen)  # [B*s, 1]
                    v = -p.clone()
                    v.view(-1, vocab).scatter_add_(1, y, torch.ones_like(y, dtype=v.dtype))  # onehot(y) - p
                    (g,) = torch.autograd.grad(z, hs, v, retain_graph=d < cfg.draws - 1)
                    out[d][:, s0:s1] = g
        for d in range(cfg.draws):
            grads[d].append(out[d])
    return grads


@dataclass(frozen=True)
class _Pieces:
    """The probe batches (one process's: `batch_tokens` tokens each) and this rank's piece of each: batch b
    is cut into min(world, B) pieces of consecutive sequences, piece j computed by rank j. Unit u of the
    flat list of pieces is (batch, piece); `mine` lists this rank's units."""

    sizes: list[int]  # pieces per batch
    units: list[tuple[int, int]]  # (batch, piece) of every unit, in batch order
    mine: list[int]  # this rank's units
    ids: list[torch.Tensor]  # this rank's pieces [b, S], in `mine` order


def _pieces(ids: torch.Tensor, cfg: StreamProbeConfig, ranks: Ranks) -> _Pieces:
    size = cfg.batch_size or max(1, cfg.batch_tokens // ids.shape[1])
    batches = [ids[b : b + size] for b in range(0, ids.shape[0], size)]  # [B, S] each
    sizes = [min(ranks.world, x.shape[0]) for x in batches]
    units = [(b, j) for b, k in enumerate(sizes) for j in range(k)]
    mine = [u for u, (_, j) in enumerate(units) if j == ranks.rank]
    return _Pieces(sizes, units, mine, [_cut(batches, sizes, units[u]) for u in mine])


def _cut(per_batch: list[torch.Tensor], sizes: list[int], unit: tuple[int, int]) -> torch.Tensor:
    """Piece j of batch b's tensor per_batch[b] [B, ...] (unit (b, j): its consecutive sequences)."""
    b, j = unit
    return torch.tensor_split(per_batch[b], sizes[b])[j]


def _whole_batches(ranks: Ranks, pieces: _Pieces, mine: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Every probe batch's tensor [B, ...] on every rank, from each rank's pieces (`mine`, in pieces.mine
    order) sent as tensors: one process's batches, rejoined."""
    local = {u: [t] for u, t in zip(pieces.mine, mine, strict=True)}
    every = ranks.gather_batches(local, len(pieces.units), device)
    out: list[list[torch.Tensor]] = [[] for _ in pieces.sizes]
    for u, (t,) in enumerate(every):
        out[pieces.units[u][0]].append(t)
    return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in out]


@torch.no_grad()
def _forward_stream(source: Source, batches: list[torch.Tensor], cfg: StreamProbeConfig, stash: Path):
    """Every layer's input on `batches` (this rank's probe pieces), saved under `stash`; returns the kwargs and
    the last output."""
    model, arch = source.model, source.arch
    layers = decoder_layers(model, arch)
    inputs = capture_inputs(model, layers, batches, model_device(model))
    for i in tqdm(range(len(layers)), desc="probe (forward)", disable=not cfg.progress, unit="layer"):
        layer = source.load_layer(i)
        save_file(
            {str(b): h.contiguous().cpu() for b, h in enumerate(inputs.hidden)}, stash / f"{i}.safetensors"
        )
        ref = block_ref(arch, i, layer)
        if ref is None:
            next_inputs(layer, inputs, i)
        else:
            with experts_swapped(arch, ref, ChunkedExperts(source, arch, ref, cfg.chunk_mb)):
                next_inputs(layer, inputs, i)
        source.release_layer(i)
        release_free_memory()
    return inputs


def by_projection(r: Rounding) -> list[Rounding]:
    """`r` on the gate/up projections only, then on the down ones: what a per-projection plan needs, as gate/up
    and down errors are measured in different spaces (the gate/up error reaches the model's output through the
    activation and the down projection)."""
    return [Rounding(r.bits, r.group_size, r.sym, (p,)) for p in ("gate_up", "down")]


def streamed_kl(
    source, ids: torch.Tensor, cfg: StreamProbeConfig, roundings: list[Rounding]
) -> dict[int, list[float]]:
    """{MoE layer: [estimated KL per predicted token with that layer's experts at each of `roundings`]}."""
    return streamed_kl_all(source, ids, cfg, roundings)[0]


class _linears_rounded:  # noqa: N801  (a context manager)
    """Inside the `with`, the Linears `names` of `layer` hold their RTN dequantization at `spec`."""

    def __init__(self, layer, names: list[str], spec):
        self.mods = [layer.get_submodule(n) for n in names]
        self.spec = spec

    def __enter__(self):
        self.saved = [m.weight.data for m in self.mods]
        for m in self.mods:
            s = self.spec
            m.weight.data = rtn_roundtrip(m.weight.data, s.bits, s.group_size, s.sym).to(
                m.weight.device
            )  # [out, in]

    def __exit__(self, *exc):
        for m, w in zip(self.mods, self.saved, strict=True):
            m.weight.data = w


@torch.no_grad()
def _squared_dots(layer, x, kwargs, out, grads: list[torch.Tensor], swap) -> float:
    """sum over label draws and sequences of (g . delta)^2, delta the layer's output change inside `swap`."""
    with swap:
        delta = run_layer(layer, x.detach(), kwargs) - out.detach()  # [B, S, H]
    total = 0.0
    for g in grads:  # [B, S, H] each
        s = (g.float() * delta.float()).sum(dim=(1, 2))  # [B] one draw per sequence
        total += float((s.double() ** 2).sum())
    return total


def streamed_kl_all(
    source: Source,
    ids: torch.Tensor,
    cfg: StreamProbeConfig,
    roundings: list[Rounding],
    linears: dict[int, list[list[str]]] | None = None,
    linear_specs: list = (),
) -> tuple[dict[int, list[float]], dict[int, list[list[float]]]]:
    """({MoE layer: [estimated KL per predicted token with that layer's experts at each of `roundings`]},
    {layer: [[estimated KL with one item of `linears[layer]` (a group of the layer's non-expert Linears, names
    relative to the layer) at RTN of each of `linear_specs`] per item]}). Every estimate shares the clean
    forward and the backward stream; each costs one more forward of its layer."""
    model, arch = source.model, source.arch
    linears = linears or {}
    layers = decoder_layers(model, arch)
    moe = [i for i in range(len(layers)) if block_ref(arch, i, layers[i]) is not None]
    acc = {i: [0.0] * len(roundings) for i in moe}
    lacc = {i: [[0.0] * len(linear_specs) for _ in items] for i, items in linears.items()}
    lowest = min(moe + [i for i, items in linears.items() if items])
    ranks = current()
    pieces = _pieces(ids, cfg, ranks)
    cfg = replace(cfg, progress=cfg.progress and ranks.writes)
    with tempfile.TemporaryDirectory(prefix="moequant-probe-") as tmp:
        stash = Path(tmp)
        # a rank without a piece (fewer sequences per batch than ranks) only joins the collectives
        inputs = _forward_stream(source, pieces.ids, cfg, stash) if pieces.ids else None
        mine = inputs.hidden if inputs is not None else []
        final = _whole_batches(ranks, pieces, mine, model_device(model))  # one process's batches [B, S, H]
        top = _top_gradients(source, final, cfg)  # [draw][batch] at the last layer's output
        grads = [
            [_cut(g, pieces.sizes, pieces.units[u]) for u in pieces.mine] for g in top
        ]  # [draw][my piece]
        del final, top

        for i in tqdm(range(len(layers) - 1, lowest - 1, -1) if inputs is not None else [], desc="probe (backward)",
                      disable=not cfg.progress, unit="layer"):  # fmt: skip
            layer = source.load_layer(i)
            hidden = _stashed_inputs(stash, i, source.device)  # [batch] of [B, S, H]
            probe = _layer_probe(source, i, layer, cfg, roundings, linears.get(i, []), linear_specs)
            with _no_param_grads(layer):
                for b, x in enumerate(hidden):
                    g = [grads[d][b] for d in range(cfg.draws)]
                    g_in = _probe_batch(
                        layer, x, inputs.kwargs[b][i], g, probe, acc.get(i), lacc.get(i), i > lowest
                    )
                    for d, gd in enumerate(g_in):
                        grads[d][b] = gd
            source.release_layer(i)
            release_free_memory()
    if ranks.distributed:  # every rank's sums over its own sequences, added in rank order
        got = ranks.all_gather((acc, lacc))
        acc = {i: [sum(a[i][k] for a, _ in got) for k in range(len(roundings))] for i in moe}
        lacc = {
            i: [
                [sum(la[i][t][k] for _, la in got) for k in range(len(linear_specs))]
                for t in range(len(rows))
            ]
            for i, rows in lacc.items()
        }
    scale = 0.5 / cfg.draws / (ids.shape[0] * (ids.shape[1] - 1))  # per predicted token
    return (
        {i: [scale * a for a in acc[i]] for i in moe},
        {i: [[scale * a for a in row] for row in rows] for i, rows in lacc.items()},
    )


def _stashed_inputs(stash: Path, i: int, device: torch.device) -> list[torch.Tensor]:
    """Layer i's inputs on the probe batches, as the forward stream saved them under `stash`, on `device`."""
    saved = load_file(stash / f"{i}.safetensors")
    return [saved[str(b)].to(device) for b in range(len(saved))]  # [B, S, H] each


@dataclass(frozen=True)
class _LayerProbe:
    """What the backward stream measures at one layer: its experts exact (`clean`) and at each rounding (none
    in a dense layer, `ref` None), and its groups of non-expert Linears (names relative to the layer) at each
    of `linear_specs`."""

    arch: MoEArch
    ref: MoEBlockRef | None
    clean: ChunkedExperts | None
    rounded: list[ChunkedExperts]
    linear_items: list[list[str]]
    linear_specs: list


def _layer_probe(
    source: Source,
    i: int,
    layer,
    cfg: StreamProbeConfig,
    roundings: list[Rounding],
    linear_items: list[list[str]],
    linear_specs: list,
) -> _LayerProbe:
    """The probe of loaded layer i: its experts read chunk by chunk, exact and at each of `roundings`."""
    arch = source.arch
    ref = block_ref(arch, i, layer)
    clean = ChunkedExperts(source, arch, ref, cfg.chunk_mb, keep_mb=cfg.keep_mb) if ref is not None else None
    rounded = (
        [ChunkedExperts(source, arch, ref, cfg.chunk_mb, r) for r in roundings] if ref is not None else []
    )
    return _LayerProbe(arch, ref, clean, rounded, linear_items, linear_specs)


def _probe_batch(
    layer,
    x: torch.Tensor,
    kwargs,
    g: list[torch.Tensor],
    probe: _LayerProbe,
    acc: list[float] | None,
    lacc: list[list[float]] | None,
    propagate: bool,
) -> list[torch.Tensor]:
    """One batch x [B, S, H] through the layer under autograd: adds (g . delta)^2 of each rounding of the
    experts to `acc` and of each item's Linears at each spec to `lacc` (g: [draw] of [B, S, H] at the layer's
    output); returns the gradients at the layer's input ([draw], empty unless `propagate`)."""
    arch, ref, clean = probe.arch, probe.ref, probe.clean
    x = x.detach().requires_grad_(True)  # [B, S, H]
    with torch.enable_grad(), experts_swapped(arch, ref, clean):
        out = run_layer(layer, x, kwargs)  # [B, S, H]
    for k, rexp in enumerate(probe.rounded):
        acc[k] += _squared_dots(layer, x, kwargs, out, g, experts_swapped(arch, ref, rexp))
    for item, names in enumerate(probe.linear_items):
        for k, spec in enumerate(probe.linear_specs):
            with experts_swapped(arch, ref, clean):
                rounded_linears = _linears_rounded(layer, names, spec)
                lacc[item][k] += _squared_dots(layer, x, kwargs, out, g, rounded_linears)
    if not propagate:
        return []
    return [
        torch.autograd.grad(out, x, gd.to(out.dtype), retain_graph=d < len(g) - 1)[0]  # [B, S, H]
        for d, gd in enumerate(g)
    ]
