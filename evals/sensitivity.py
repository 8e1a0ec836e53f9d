"""Sensitivity probe: how much perplexity moves when ONE expert (or one layer's experts) drops to a low width.

Each probe replaces, inside the *original* model, the chosen experts' weights by their round-to-nearest
dequantization at `bits` (group-wise, the plan's group size), measures token perplexity on a small slice of
the held-out test split, and restores the weights. Everything else stays at full precision, so the change is
that expert's own contribution. Probed: the most- and least-routed experts (calibration token counts) and
whole layers spread over the depth.

Cost bound (stated in the report): at most `max_probes` probes, each one perplexity pass over `windows`
windows of `seq_len` tokens per corpus domain, plus one baseline pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from moequant.arch import get_arch
from moequant.calibration.corpus import DOMAINS
from moequant.errors import MoEQuantError
from moequant.evals.drift import moe_modules
from moequant.evals.perplexity import perplexity
from moequant.plan.probe import rtn_swapped

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    bits: int = 2  # the low width every probe pushes its experts to (RTN)
    group_size: int = 128
    experts_per_end: int = 2  # most-routed and least-routed experts probed (each)
    layers: int = 2  # whole-layer probes, spread from the first to the last MoE layer
    max_probes: int = 6  # hard cap on the number of probes
    windows: int = 2  # perplexity windows per domain per probe
    seq_len: int = 256
    batch_size: int = 8

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise MoEQuantError(f"probe width must be 2, 3, 4 or 8 bits, got {self.bits}")
        if min(self.experts_per_end, self.layers, self.max_probes) < 0 or self.windows < 1:
            raise MoEQuantError("probe counts must be >= 0 and windows >= 1")

    def cost(self) -> str:
        n_tok = self.windows * self.seq_len * len(DOMAINS)
        return (
            f"at most {self.max_probes} probes (+1 baseline), each a perplexity pass over {self.windows} "
            f"window(s) x {self.seq_len} tokens x {len(DOMAINS)} domains = {n_tok} tokens"
        )


@dataclass
class Probe:
    kind: str  # "expert" | "layer"
    layer: int
    experts: list[int]
    tokens: int  # calibration tokens routed to the probed experts
    reason: str  # "most-routed" | "least-routed" | "layer"
    ppl: float = float("nan")
    delta: float = float("nan")
    rel_delta: float = float("nan")  # delta / baseline ppl
    seconds: float = 0.0


@dataclass
class ProbeResult:
    config: ProbeConfig
    baseline_ppl: float
    probes: list[Probe]

    def to_json(self) -> dict:
        return {
            "bits": self.config.bits,
            "method": "rtn",
            "group_size": self.config.group_size,
            "cost_bound": self.config.cost(),
            "baseline_ppl": self.baseline_ppl,
            "probes": [asdict(p) for p in self.probes],
        }


def choose_probes(tokens: dict[tuple[int, int], int], config: ProbeConfig) -> list[Probe]:
    """Most- and least-routed experts, then whole layers evenly spread over depth, capped at max_probes."""
    ranked = sorted(tokens.items(), key=lambda kv: (-kv[1], kv[0]))
    n = min(config.experts_per_end, len(ranked) // 2)
    most = [Probe("expert", l, [e], t, "most-routed") for (l, e), t in ranked[:n]]
    least = [Probe("expert", l, [e], t, "least-routed") for (l, e), t in ranked[::-1][:n]]
    layers = sorted({l for l, _ in tokens})
    whole = []
    if config.layers and layers:
        step = (len(layers) - 1) / max(config.layers - 1, 1)
        chosen = sorted({layers[round(j * step)] for j in range(min(config.layers, len(layers)))})
        for l in chosen:
            es = sorted(e for ll, e in tokens if ll == l)
            whole.append(Probe("layer", l, es, sum(tokens[(l, e)] for e in es), "layer"))
    picks = []  # round robin, so that a small cap still probes every kind
    for j in range(max(len(most), len(least), len(whole))):
        picks += [group[j] for group in (most, least, whole) if j < len(group)]
    return picks[: config.max_probes]


@torch.no_grad()
def run_probes(
    model, tokenizer, tokens: dict[tuple[int, int], int], config: ProbeConfig = ProbeConfig()
) -> ProbeResult:
    """`model`: the original (fused-experts) model; `tokens`: (layer, expert) -> routed calibration tokens."""
    arch = get_arch(model)
    blocks = moe_modules(model, arch)
    if not all(hasattr(b.experts, "gate_up_proj") for b in blocks.values()):
        raise MoEQuantError(
            "the sensitivity probe needs the original model (fused experts), not a quantized one"
        )

    def ppl() -> float:
        return perplexity(
            model, tokenizer, "test", config.seq_len, max_windows=config.windows, batch_size=config.batch_size
        )["overall"]

    base = ppl()
    probes = choose_probes(tokens, config)
    for p in probes:
        t0 = time.perf_counter()
        with rtn_swapped(arch, blocks[p.layer].experts, p.experts, config.bits, config.group_size):
            p.ppl = ppl()
        p.delta = p.ppl - base
        p.rel_delta = p.delta / base
        p.seconds = time.perf_counter() - t0
        logger.info(
            "probe %s layer %d experts %s @ %d bits: ppl %.3f (%+.2f%%)",
            p.reason,
            p.layer,
            p.experts,
            config.bits,
            p.ppl,
            100 * p.rel_delta,
        )
    return ProbeResult(config, base, probes)
