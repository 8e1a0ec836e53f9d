"""Routing profiler: run calibration text through a MoE model, layer by layer, and record per-expert statistics.

A hook reads (never modifies) what each experts module receives: the hidden states, the top-k expert ids and
their routing weights. From those we accumulate, per MoE layer (see stats.LayerStats): routed counts,
routing-weight mass, co-activation, and per-channel second moments of each expert's inputs and of its
down-projection inputs (the planner weights quantization error with them). The model streams one decoder
layer at a time (stream.py), so a checkpoint larger than memory profiles too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from moequant.arch import MoEArch, apply_activation, block_ref, experts_call_args, experts_swapped
from moequant.calibration.capture import LayerInputs
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import (
    PrecomputedExperts,
    collect_expert_inputs,
    gathered_expert_inputs,
)
from moequant.calibration.memo import ForwardMemo
from moequant.calibration.stats import LayerStats, routed_slots
from moequant.calibration.stream import first_inputs, stream_layers
from moequant.kernels.reference import add_terms, routed_terms
from moequant.runtime.ranks import current

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileConfig:
    batch_size: int = 8  # sequences per forward pass
    min_tokens: int = 32  # experts routed fewer tokens than this are listed under `coverage`
    progress: bool = True
    chunk_mb: float = 256  # a lazily loaded layer's experts are read in chunks of about this many float32 MB


@dataclass
class Profile:
    model_id: str
    calibration: str
    tokens: int
    layers: dict[int, LayerStats]  # decoder layer index -> statistics
    min_tokens: int = 32
    extra: dict = field(default_factory=dict)

    def merge(self, other: Profile) -> Profile:
        if sorted(self.layers) != sorted(other.layers):
            raise ValueError("profiles cover different layers")
        return Profile(
            self.model_id,
            self.calibration,
            self.tokens + other.tokens,
            {i: s.merge(other.layers[i]) for i, s in self.layers.items()},
            self.min_tokens,
        )

    def coverage(self) -> dict[int, list[int]]:
        """layer -> experts routed fewer than `min_tokens` tokens."""
        return {
            i: [e for e, c in enumerate(s.counts.tolist()) if c < self.min_tokens]
            for i, s in self.layers.items()
        }


def record_routing(s: LayerStats, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, sources: list[str]):
    """Add one batch's routing to `s`: x [T, H] float32, idx [T, k], w [T, k]; `sources` labels the batch's
    sequences (or is empty). Returns onehot [T, E], the slots each token gives each expert (slots of weight 0
    route nowhere: stats.routed_slots). The statistics stay in host memory whatever device computes: the
    batch's routing is read there."""
    x, idx, w = x.cpu(), idx.long().cpu(), w.double().cpu()
    E = s.num_experts
    onehot = torch.zeros(x.shape[0], E, dtype=torch.int64)  # [T, E] slots per expert
    onehot.scatter_add_(1, idx, routed_slots(w).long())
    s.tokens += x.shape[0]
    s.counts += onehot.sum(0)
    s.weight_mass.index_add_(0, idx.reshape(-1), w.reshape(-1))
    hit = (onehot > 0).long()  # [T, E]
    s.coact += hit.T @ hit
    xsq = x.double() ** 2  # [T, H]
    s.sq_all += xsq.sum(0)
    s.sq_in += onehot.T.double() @ xsq
    if sources:
        names = sorted(set(sources))
        row_src = torch.tensor([names.index(n) for n in sources])  # [B]
        tok_src = row_src.repeat_interleave(x.shape[0] // len(sources))  # [T]
        per_src = torch.zeros(len(names), E, dtype=torch.int64)  # [S, E]
        per_src.index_add_(0, tok_src, onehot)
        for j, src in enumerate(names):
            s.by_source[src] = s.by_source[src] + per_src[j] if src in s.by_source else per_src[j]
    return onehot


def expert_mid(arch: MoEArch, x: torch.Tensor, gate_up: torch.Tensor, bias, act_params) -> torch.Tensor:
    """act(gate_up x (+ bias)): the down projection's input [Te, I] for tokens x [Te, H] of one expert."""
    h = x @ gate_up.float().T  # [Te, 2I] ([Te, I] non-gated)
    if bias is not None:
        h = h + bias.float()
    return apply_activation(arch.activation, h, act_params)  # [Te, I]


class _LabelSetter:
    """before_batch for the recorder: the calibration sources of batch b's sequences into `labels`."""

    def __init__(self, labels: list[str], batch_labels):
        self.labels, self.batch_labels = labels, batch_labels

    def __call__(self, b: int) -> None:
        self.labels[:] = self.batch_labels(b)


class _LayerRecorder:
    """Forward pre-hook on one experts module whose weights are loaded: statistics of what it receives."""

    def __init__(self, arch: MoEArch, ref, stats: LayerStats, sources: list):
        self.arch, self.ref, self.stats, self.sources = arch, ref, stats, sources
        self.weights = arch.expert_weights(ref.experts)
        self.act_params = arch.activation_params(ref.experts)

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        x, idx, w = experts_call_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1]).float()  # [T, H]
        onehot = record_routing(
            self.stats, x, idx.reshape(x.shape[0], -1), w.reshape(x.shape[0], -1), self.sources
        )
        gub = self.weights.gate_up_bias
        for e in torch.nonzero(onehot.sum(0)).flatten().tolist():
            rows = torch.nonzero(onehot[:, e]).flatten()
            mult = onehot[rows, e].double()  # a token listing e twice counts twice, as in counts
            a = expert_mid(
                self.arch,
                x[rows.to(x.device)],
                self.weights.gate_up[e],
                None if gub is None else gub[e],
                self.act_params,
            ).double()  # [Te, I]
            self.stats.sq_mid[e] += (a**2 * mult.to(a.device)[:, None]).sum(0).cpu()


@torch.no_grad()
def _profile_chunked(
    source, arch: MoEArch, ref, layer, inputs: LayerInputs, stats: LayerStats, labels, chunk_mb: float,
    memo: ForwardMemo | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """The statistics of a layer whose experts are not loaded (CheckpointSource with lazy_experts), and the
    experts' outputs on this rank's batches: the experts are read chunk by chunk (source.read_experts), each
    expert's tokens go through it once, and the outputs are accumulated as the experts module would.

    Under torchrun the calibration batches are split across the ranks (LayerInputs.split, as in the quantize
    pass): each rank runs the layer's attention and router on its own batches, what the experts received on
    every batch travels to every rank as tensors (routing statistics need every batch), and each rank runs
    every expert on its own batches' tokens only. The down-projection moments travel per batch and are added
    in batch order: the same statistics and outputs, bit for bit, as one process."""
    ranks = current()
    feats = gathered_expert_inputs(collect_expert_inputs(layer, ref, inputs, memo), inputs, ranks)
    xs = [x.float() for x in feats.x]  # [T, H] per batch, every batch
    for b, (x, idx, w) in enumerate(zip(xs, feats.idx, feats.w, strict=True)):
        record_routing(stats, x, idx, w, labels(b))
    own = inputs.mine()
    # slots that route nowhere name no expert here (-1): their term is 0, and sq_mid sums the tokens counts does
    idxs = [feats.idx[b].masked_fill(~routed_slots(feats.w[b]), -1) for b in own]  # [T, k]
    xs, ws = [xs[b] for b in own], [feats.w[b] for b in own]
    act_params = arch.activation_params(ref.experts)
    outs = [torch.zeros_like(x) for x in xs]  # [T, H] per own batch
    E = stats.num_experts
    rows_in = arch.activation.in_rows(stats.intermediate)  # the input projection: 2I, or I (up alone)
    per_expert = 4 * stats.hidden * (rows_in + stats.intermediate)  # float32 input projection and down
    size = max(1, int(chunk_mb * 2**20 // per_expert))
    # per own batch: each expert's sum over its tokens there of act(gate_up x)^2 [E, I] float64
    sq = [torch.zeros(E, stats.intermediate, dtype=torch.float64) for _ in own]
    with ranks.guard(f"profiling the experts of layer {ref.layer_idx}"):
        for c in range(0, E, size):
            part = list(range(c, min(c + size, E)))
            fused = source.read_experts(ref.layer_idx, part)
            for name in (f"{arch.in_proj}_bias", "down_proj_bias") if arch.has_bias else ():
                fused[name] = getattr(ref.experts, name)[part]  # biases load with the layer (small)
            w = arch.canonical_from_fused(fused)  # [Ec, 2I (I non-gated), H], [Ec, H, I]
            run = _ExpertRun(arch, w, part, act_params, stats.intermediate)
            add_terms(outs, run.moments_into(sq, routed_terms(xs, idxs, ws, run, part)))
            del fused, w, run
    every = inputs.every_batch(ranks, [[t] for t in sq], ranks.wire)  # [E, I] per batch, every batch
    for (t,) in every:  # batch order: one process's order of addition (adding 0.0 changes nothing)
        stats.sq_mid += t.cpu()
    return [o.to(feats.dtype).reshape(feats.shapes[b]) for o, b in zip(outs, own, strict=True)]


class _ExpertRun:
    """An ExpertFn (kernels/reference.py) over one chunk's canonical weights `w` (row j: expert part[j]) that
    also keeps, per expert and per batch it ran, the sum over those tokens of act(gate_up x)^2 [I] (float64,
    on the host): the moments the plan reads."""

    def __init__(self, arch, w, part: list[int], act_params, intermediate: int):
        self.arch, self.w, self.act_params, self.intermediate = arch, w, act_params, intermediate
        self.row = {e: j for j, e in enumerate(part)}
        self.sq: dict[int, list[torch.Tensor]] = {}  # expert -> [I] float64 per batch, in the order run

    def __call__(self, e: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        j, w = self.row[e], self.w
        gub = None if w.gate_up_bias is None else w.gate_up_bias[j]
        ys = []
        for x in xs:  # [Te, H] float32
            a = expert_mid(self.arch, x, w.gate_up[j], gub, self.act_params)  # [Te, I]
            self.sq.setdefault(e, []).append((a.double() ** 2).sum(0).cpu())
            y = a @ w.down[j].float().T  # [Te, H]
            ys.append(y if w.down_bias is None else y + w.down_bias[j].float())
        return ys

    def moments_into(self, sq: list[torch.Tensor], terms):
        """The routed terms (e, b, rows, y) of this run, passed on unchanged, each batch's moments of expert e
        set into sq[b][e] [I] as its term goes by (terms come in the order the expert ran its batches)."""
        for e, b, tok, y in terms:
            sq[b][e] = self.sq[e].pop(0)
            yield e, b, tok, y


def profile_pass(
    source, calib: CalibData, config: ProfileConfig = ProfileConfig(), model_id: str = ""
) -> Profile:
    """Routing profile of the model behind `source` (checkpoint/source.py), streaming its layers. The model's
    outputs are not changed."""
    arch = source.arch
    profile = Profile(model_id, calib.description, calib.tokens, {}, config.min_tokens)

    inputs = first_inputs(source, calib, config.batch_size)
    if source.lazy_experts:  # under torchrun each rank runs the layer forwards on its own batches
        inputs.split(current())
    for step in stream_layers(source, inputs, "profile", config.progress):
        ref = block_ref(arch, step.index, step.layer)
        if ref is None:
            continue
        hidden, inter = arch.expert_dims(ref.experts)
        stats = LayerStats(ref.num_experts, ref.top_k, hidden, inter)
        profile.layers[step.index] = stats

        def batch_labels(b: int) -> list[str]:  # the calibration source of each sequence of batch b
            return list(calib.labels[b * config.batch_size : (b + 1) * config.batch_size])

        if source.lazy_experts:  # experts read chunk by chunk, never a whole layer
            memo = ForwardMemo.for_layer(step.layer, arch, inputs)
            outputs = _profile_chunked(
                source, arch, ref, step.layer, inputs, stats, batch_labels, config.chunk_mb, memo
            )
            with experts_swapped(arch, ref, PrecomputedExperts(outputs)):  # the layer reads them
                step.advance(memo=memo)  # the attention's outputs from the run up to the experts, replayed
            continue
        labels: list[str] = []
        recorder = _LayerRecorder(arch, ref, stats, labels)
        handle = ref.experts.register_forward_pre_hook(recorder, with_kwargs=True)
        step.advance(before_batch=_LabelSetter(labels, batch_labels))
        handle.remove()
    return profile
