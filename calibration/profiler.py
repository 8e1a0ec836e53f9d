"""Routing profiler: run calibration text through a MoE model and record per-expert statistics.

Hooks read (never modify) what each experts module receives: the hidden states, the top-k expert ids and
their routing weights. From those we accumulate, per MoE layer (see stats.LayerStats): routed counts,
routing-weight mass, co-activation, and per-channel second moments of each expert's inputs and of its
down-projection inputs (the planner weights quantization error with them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moequant.arch import MoEArch, apply_activation, resolve
from moequant.calibration.data import CalibData
from moequant.calibration.stats import LayerStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileConfig:
    batch_size: int = 8  # sequences per forward pass
    min_tokens: int = 32  # experts routed fewer tokens than this are listed under `coverage`
    progress: bool = True


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


def _experts_inputs(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [None] * (3 - len(args))
    alt = {"top_k_index": ("router_indices",), "top_k_weights": ("routing_weights",)}
    for i, n in enumerate(names):
        if vals[i] is None:
            for key in (n, *alt.get(n, ())):
                if key in kwargs:
                    vals[i] = kwargs[key]
    return vals


class _LayerRecorder:
    """Forward pre-hook on one experts module."""

    def __init__(self, arch: MoEArch, ref, stats: LayerStats, sources: list):
        self.arch, self.ref, self.stats, self.sources = arch, ref, stats, sources
        self.weights = arch.expert_weights(ref.experts)
        self.act_params = arch.activation_params(ref.experts)

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        x, idx, w = _experts_inputs(args, kwargs)
        s = self.stats
        x = x.reshape(-1, x.shape[-1]).float()  # [T, H]
        idx = idx.reshape(x.shape[0], -1)  # [T, k]
        w = w.reshape(x.shape[0], -1).double()  # [T, k]
        E = s.num_experts
        onehot = torch.zeros(x.shape[0], E, dtype=torch.int64)  # [T, E] slots per expert
        onehot.scatter_add_(1, idx, torch.ones_like(idx))
        s.tokens += x.shape[0]
        s.counts += onehot.sum(0)
        s.weight_mass.index_add_(0, idx.reshape(-1), w.reshape(-1))
        hit = (onehot > 0).long()  # [T, E]
        s.coact += hit.T @ hit
        xsq = x.double() ** 2  # [T, H]
        s.sq_all += xsq.sum(0)
        s.sq_in += onehot.T.double() @ xsq
        if self.sources:
            names = sorted(set(self.sources))
            row_src = torch.tensor([names.index(n) for n in self.sources])  # [B]
            tok_src = row_src.repeat_interleave(x.shape[0] // len(self.sources))  # [T]
            per_src = torch.zeros(len(names), E, dtype=torch.int64)  # [S, E]
            per_src.index_add_(0, tok_src, onehot)
            for j, src in enumerate(names):
                s.by_source[src] = s.by_source[src] + per_src[j] if src in s.by_source else per_src[j]
        for e in torch.nonzero(onehot.sum(0)).flatten().tolist():
            rows = torch.nonzero(onehot[:, e]).flatten()
            mult = onehot[rows, e].double()  # a token listing e twice counts twice, as in counts
            gu = self.weights.gate_up[e].float()  # [2I, H]
            h = x[rows] @ gu.T  # [Te, 2I]
            if self.weights.gate_up_bias is not None:
                h = h + self.weights.gate_up_bias[e].float()
            a = apply_activation(self.arch.activation, h, self.act_params).double()  # [Te, I]
            s.sq_mid[e] += (a**2 * mult[:, None]).sum(0)


@torch.no_grad()
def profile_model(
    model, data: CalibData, config: ProfileConfig = ProfileConfig(), model_id: str = ""
) -> Profile:
    """Run `data` through `model` and return its routing profile. The model's outputs are not changed."""
    arch, blocks = resolve(model)
    device = next(model.parameters()).device
    sources: list[str] = []
    layers, handles = {}, []
    for ref in blocks:
        w = arch.expert_weights(ref.experts)
        stats = LayerStats(ref.num_experts, ref.top_k, w.hidden, w.intermediate)
        layers[ref.layer_idx] = stats
        rec = _LayerRecorder(arch, ref, stats, sources)
        handles.append(ref.experts.register_forward_pre_hook(rec, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        n_batches = (data.input_ids.shape[0] + config.batch_size - 1) // config.batch_size
        for ids, labels in tqdm(
            data.batches(config.batch_size), total=n_batches, desc="profile", disable=not config.progress
        ):
            sources[:] = labels
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Profile(model_id, data.description, data.tokens, layers, config.min_tokens)
