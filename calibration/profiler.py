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

from moequant.arch import MoEArch, apply_activation, block_ref, experts_call_args
from moequant.calibration.capture import LayerInputs
from moequant.calibration.data import CalibData
from moequant.calibration.stats import LayerStats
from moequant.calibration.stream import LayerHooks, sequential_pass

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


class _LayerRecorder:
    """Forward pre-hook on one experts module."""

    def __init__(self, arch: MoEArch, ref, stats: LayerStats, sources: list):
        self.arch, self.ref, self.stats, self.sources = arch, ref, stats, sources
        self.weights = arch.expert_weights(ref.experts)
        self.act_params = arch.activation_params(ref.experts)

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        x, idx, w = experts_call_args(args, kwargs)
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


def profile_pass(
    source, calib: CalibData, config: ProfileConfig = ProfileConfig(), model_id: str = ""
) -> Profile:
    """Routing profile of the model behind `source` (checkpoint/source.py), streaming its layers. The model's
    outputs are not changed."""
    arch = source.arch
    profile = Profile(model_id, calib.description, calib.tokens, {}, config.min_tokens)

    def on_layer(i: int, layer, inputs: LayerInputs):
        ref = block_ref(arch, i, layer)
        if ref is None:
            return None
        hidden, inter = arch.expert_dims(ref.experts)
        stats = LayerStats(ref.num_experts, ref.top_k, hidden, inter)
        profile.layers[i] = stats
        labels: list[str] = []  # the calibration source of each sequence of the batch being run
        handle = ref.experts.register_forward_pre_hook(
            _LayerRecorder(arch, ref, stats, labels), with_kwargs=True
        )

        def before_batch(b: int):
            n = inputs.hidden[b].shape[0]
            labels[:] = calib.labels[b * config.batch_size : b * config.batch_size + n]

        return LayerHooks(before_batch, handle.remove)

    sequential_pass(source, calib, config.batch_size, on_layer, "profile", config.progress)
    return profile
