"""Per-expert and routing drift between an original and a quantized model, on the same calibration tokens.

Both full models run on every calibration batch, so the routing drift of layer i includes the quantization
error of every layer before it. Per expert, the *original* model's expert inputs and routing are replayed
through the quantized expert, so the per-expert error isolates that expert's own quantization:

    rel_error(l, e) = ||y_q - y||_F / ||y||_F   over the tokens the original router sends to e
    top-k agreement = mean |topk_orig ∩ topk_quant| / k        (router indices as the block uses them)
    KL              = mean_t KL(p_orig(t) || p_quant(t))        (arch.router_probs of the router logits)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from moequant.arch import MoEArch, block_of, decoder_layers, expert_forward, experts_call_args, get_arch
from moequant.calibration.data import CalibData
from moequant.calibration.stats import routed_slots
from moequant.errors import MoEQuantError

logger = logging.getLogger(__name__)


@dataclass
class ExpertDrift:
    layer: int
    expert: int
    tokens: int  # calibration tokens the original router sends to the expert
    width: str  # storage label of the quantized expert, e.g. "gptq:3", "bnb-nf4", "keep"
    bits: float
    rel_error: float | None  # None when no calibration token reaches the expert


@dataclass
class RoutingDrift:
    layer: int
    tokens: int
    topk_agreement: float  # mean fraction of the original top-k kept
    top1_agreement: float  # fraction of tokens whose first choice is unchanged
    exact_match: float  # fraction of tokens with an identical top-k set
    kl: float  # mean KL(original || quantized) of the router distributions, nats


@dataclass
class DriftResult:
    experts: list[ExpertDrift]
    routing: list[RoutingDrift]
    tokens: int
    logits_kl: float  # mean KL of the next-token distributions (the end-to-end effect)
    next_token_agreement: float  # fraction of positions with the same argmax
    description: str = ""
    layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "calibration": self.description,
            "logits_kl": self.logits_kl,
            "next_token_agreement": self.next_token_agreement,
            "routing": [asdict(r) for r in self.routing],
            "experts": [asdict(e) for e in self.experts],
        }

    def matrix(self, key: str = "rel_error") -> tuple[list[int], torch.Tensor]:
        """(layers, [L, E] tensor of `key`, NaN where undefined) for heatmaps."""
        layers = sorted({e.layer for e in self.experts})
        n_exp = max(e.expert for e in self.experts) + 1
        m = torch.full((len(layers), n_exp), float("nan"))  # [L, E]
        for e in self.experts:
            v = getattr(e, key)
            m[layers.index(e.layer), e.expert] = float("nan") if v is None else float(v)
        return layers, m


# ---- locating the MoE blocks of both models ---------------------------------------------------------


@dataclass
class _Block:
    router: torch.nn.Module
    experts: torch.nn.Module


def moe_modules(model, arch: MoEArch | None = None) -> dict[int, _Block]:
    """layer -> (router, experts) for original (fused) and quantized (QuantizedExperts) models alike."""
    arch = arch or get_arch(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model, arch)):
        block = block_of(layer, arch)
        router, experts = getattr(block, arch.router, None), getattr(block, arch.experts, None)
        if router is not None and experts is not None:
            out[i] = _Block(router, experts)
    if not out:
        raise MoEQuantError(f"{type(model).__name__} has no MoE block to measure")
    return out


def expert_fn(arch: MoEArch, experts: torch.nn.Module):
    """(e, x [T, H]) -> y [T, H] (no routing weight) in fp32, for fused and QuantizedExperts modules."""
    from moequant.modules.qexperts import QuantizedExperts

    if isinstance(experts, QuantizedExperts):  # its own reference arithmetic (what runs it on CPU)
        return lambda e, x: experts.expert_forward(e, [x.float()])[0]
    w = arch.expert_weights(experts)
    params = arch.activation_params(experts)
    return lambda e, x: expert_forward(w, e, x.float(), arch.activation, params)


def expert_label(experts: torch.nn.Module, e: int) -> tuple[str, float]:
    from moequant.config import spec_bits, spec_label
    from moequant.modules.qexperts import QuantizedExperts

    if isinstance(experts, QuantizedExperts):
        spec = experts.specs[e]
        return spec_label(spec), spec_bits(spec)
    return "original", float(torch.finfo(experts.gate_up_proj.dtype).bits)


# ---- accumulators --------------------------------------------------------------------------------------


class _ExpertErr:
    """Pre-hook on an original experts module: replays its inputs through the quantized twin."""

    def __init__(self, ref_fn, q_fn, num_experts: int):
        self.ref_fn, self.q_fn = ref_fn, q_fn
        self.err = torch.zeros(num_experts, dtype=torch.float64)  # [E] sum ||y_q - y||^2
        self.ref = torch.zeros(num_experts, dtype=torch.float64)  # [E] sum ||y||^2
        self.tokens = torch.zeros(num_experts, dtype=torch.int64)  # [E]

    @torch.no_grad()
    def __call__(self, module, args, kwargs):
        x, idx, w = experts_call_args(args, kwargs)
        x = x.reshape(-1, x.shape[-1])  # [T, H]
        idx = idx.reshape(x.shape[0], -1).masked_fill(~routed_slots(w.reshape(x.shape[0], -1)), -1)  # [T, k]
        for e in torch.unique(idx).tolist():
            if not 0 <= e < self.err.numel():
                continue  # slots that route nowhere: weight 0 (-1 here), or marked -1 / E by the family
            rows = torch.nonzero((idx == e).any(-1)).flatten()  # [Te]
            y = self.ref_fn(e, x[rows])  # [Te, H]
            yq = self.q_fn(e, x[rows])  # [Te, H]
            self.err[e] += float(((yq - y) ** 2).sum())
            self.ref[e] += float((y**2).sum())
            self.tokens[e] += rows.numel()


class _RouterTap:
    """Forward hook on a router: keeps the last call's logits [T, C] (where the adapter says the router's output
    holds them: arch.router_logits) and top-k indices [T, k]."""

    def __init__(self, arch: MoEArch, top_k: int):
        self.arch, self.top_k = arch, top_k
        self.logits = self.index = None

    def __call__(self, module, args, out):
        self.logits = self.arch.router_logits(out).detach().float()  # [T, C]
        if isinstance(out, tuple) and len(out) >= 3:
            self.index = out[2].detach().reshape(self.logits.shape[0], -1)  # [T, k]
        else:
            self.index = self.logits.topk(self.top_k, dim=-1).indices  # [T, k]


@dataclass
class _RoutingSums:
    tokens: int = 0
    overlap: float = 0.0
    top1: float = 0.0
    exact: float = 0.0
    kl: float = 0.0

    def add(self, arch: MoEArch, a: _RouterTap, b: _RouterTap) -> None:
        k = a.index.shape[1]
        same = (a.index[:, :, None] == b.index[:, None, :]).any(-1)  # [T, k]
        self.tokens += a.index.shape[0]
        self.overlap += float(same.float().sum()) / k
        self.top1 += float((a.index[:, 0] == b.index[:, 0]).float().sum())
        self.exact += float(same.all(-1).float().sum())
        p = arch.router_probs(a.logits).clamp_min(1e-12)  # [T, C]
        q = arch.router_probs(b.logits).clamp_min(1e-12)  # [T, C]
        self.kl += float((p * (p.log() - q.log())).sum())

    def result(self, layer: int) -> RoutingDrift:
        n = max(self.tokens, 1)
        return RoutingDrift(layer, self.tokens, self.overlap / n, self.top1 / n, self.exact / n, self.kl / n)


def _router_top_k(router, experts) -> int:
    for obj in (router, experts):
        k = getattr(obj, "top_k", None)
        if isinstance(k, int):
            return k
    return 2


# ---- the measurement -----------------------------------------------------------------------------------


@torch.no_grad()
def measure_drift(
    original, quantized, data: CalibData, batch_size: int = 8, progress: bool = True
) -> DriftResult:
    """Run both models on `data`; per-expert output error and per-layer routing drift."""
    arch = get_arch(original)
    if get_arch(quantized) != arch:
        raise MoEQuantError("the baseline and the quantized model are different model families")
    ref_blocks, q_blocks = moe_modules(original, arch), moe_modules(quantized, arch)
    if sorted(ref_blocks) != sorted(q_blocks):
        raise MoEQuantError(
            f"MoE layers differ: baseline {sorted(ref_blocks)}, quantized {sorted(q_blocks)}; "
            "is --baseline the model this checkpoint was quantized from?"
        )
    device_o = next(original.parameters()).device
    device_q = next(quantized.parameters()).device
    accs, taps, sums, handles = {}, {}, {}, []
    try:
        for i, rb in ref_blocks.items():
            qb = q_blocks[i]
            n_exp = getattr(qb.experts, "num_experts", None) or rb.experts.gate_up_proj.shape[0]
            accs[i] = _ExpertErr(expert_fn(arch, rb.experts), expert_fn(arch, qb.experts), n_exp)
            handles.append(rb.experts.register_forward_pre_hook(accs[i], with_kwargs=True))
            k = arch.top_k or _router_top_k(rb.router, rb.experts)
            taps[i] = (_RouterTap(arch, k), _RouterTap(arch, k))
            handles.append(rb.router.register_forward_hook(taps[i][0]))
            handles.append(qb.router.register_forward_hook(taps[i][1]))
            sums[i] = _RoutingSums()
        n_batches = math.ceil(data.input_ids.shape[0] / batch_size)
        logit_kl, agree, positions = 0.0, 0.0, 0
        for ids, _ in tqdm(data.batches(batch_size), total=n_batches, desc="drift", disable=not progress):
            lo = original(input_ids=ids.to(device_o), use_cache=False).logits.float().cpu()  # [B, L, V]
            lq = quantized(input_ids=ids.to(device_q), use_cache=False).logits.float().cpu()  # [B, L, V]
            lp, lqp = lo.log_softmax(-1), lq.log_softmax(-1)  # [B, L, V]
            logit_kl += float((lp.exp() * (lp - lqp)).sum())
            agree += float((lo.argmax(-1) == lq.argmax(-1)).float().sum())
            positions += lo.shape[0] * lo.shape[1]
            for i, (a, b) in taps.items():
                sums[i].add(arch, a, b)
    finally:
        for h in handles:
            h.remove()
    experts = []
    for i, acc in sorted(accs.items()):
        for e in range(acc.err.numel()):
            width, bits = expert_label(q_blocks[i].experts, e)
            n = int(acc.tokens[e])
            rel = math.sqrt(float(acc.err[e]) / float(acc.ref[e])) if n and float(acc.ref[e]) > 0 else None
            experts.append(ExpertDrift(i, e, n, width, bits, rel))
    routing = [sums[i].result(i) for i in sorted(sums)]
    return DriftResult(
        experts,
        routing,
        data.tokens,
        logit_kl / max(positions, 1),
        agree / max(positions, 1),
        data.description,
        sorted(accs),
    )
