"""Per-layer calibration of the planner's damage proxy with a direct measurement.

The proxy (damage.py) ranks experts within a layer well, but layers differ in how much an error in their
experts costs the model's loss (an early layer's error propagates through every later layer and changes
later routing). The probe prices it: for each MoE layer, what rounding all of that layer's experts to the
lowest candidate width (RTN) costs, everything else exact. The damage rows of that layer are then scaled so
that their sum at that width equals that cost. Two ways to get it (PlanConfig.probe):

* streamed (the default): the expected KL to the model's own predictions, to second order, from one forward
  and one backward stream over the layers, a layer at a time (probe_stream.py): any checkpoint size, linear
  in depth;
* measured: the calibration loss increase, one forward pass of `samples` sequences per MoE layer with the
  whole model in memory (quadratic in depth): run when its float32 copy is at most
  `PlanConfig.probe_max_gb` (a fixed size, not the machine's free memory), skipped with a warning and a
  record in the plan otherwise. Kept as the reference the streamed probe is compared with
  (evals/bench/probe_agreement.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from moequant.arch import MoEArch, resolve
from moequant.calibration.data import CalibData
from moequant.plan.damage import DamageTable
from moequant.plan.probe_experts import Rounding
from moequant.quantizers.rtn import rtn_roundtrip

logger = logging.getLogger(__name__)


class rtn_swapped:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Inside the `with`, experts `ids` of one fused experts module hold their RTN dequantization at `bits`
    (group-wise on the canonical [out, in] matrices, as the quantizers see them); the weights are restored on
    exit. Shared by the planner's layer probe and the evaluation's sensitivity probe."""

    def __init__(self, arch: MoEArch, experts, ids: list[int], bits: int, group_size: int, sym: bool = False):
        self.arch, self.experts, self.ids = arch, experts, ids
        self.bits, self.gs, self.sym = bits, group_size, sym

    def __enter__(self):
        self.saved = {n: p.data.clone() for n, p in self.experts.named_parameters(recurse=False)}
        w = self.arch.expert_weights(self.experts)
        gate_up, down = w.gate_up.clone(), w.down.clone()  # [E, 2I, H], [E, H, I]
        for e in self.ids:
            gate_up[e] = rtn_roundtrip(gate_up[e], self.bits, self.gs, self.sym)  # [2I, H]
            down[e] = rtn_roundtrip(down[e], self.bits, self.gs, self.sym)  # [H, I]
        w.gate_up, w.down = gate_up, down
        for name, t in self.arch.fused_from_canonical(w).items():
            getattr(self.experts, name).data.copy_(t)
        return self

    def __exit__(self, *exc):
        for n, t in self.saved.items():
            getattr(self.experts, n).data.copy_(t)


@torch.no_grad()
def _loss(model, ids: torch.Tensor, batch_size: int) -> float:
    total, n = 0.0, 0
    for b in range(0, ids.shape[0], batch_size):
        x = ids[b : b + batch_size]
        logits = model(input_ids=x, use_cache=False).logits.float()  # [B, L, V]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
        )
        n += x[:, 1:].numel()
    return total / n


@torch.no_grad()
def layer_loss_increase(model, ids: torch.Tensor, bits: int, group_size: int, sym: bool, batch_size: int = 8):
    """{layer: calibration-loss increase with that layer's experts at RTN `bits`}, and the base loss."""
    arch, blocks = resolve(model)
    base = _loss(model, ids, batch_size)
    out = {}
    for ref in blocks:
        with rtn_swapped(arch, ref.experts, list(range(ref.num_experts)), bits, group_size, sym):
            out[ref.layer_idx] = _loss(model, ids, batch_size) - base
    return out, base


def calibrate_damage(
    damage: np.ndarray,
    keys: list[tuple[int, int]],
    col: int,
    increase: dict[int, float],
) -> tuple[np.ndarray, dict[int, float]]:
    """Scale each layer's damage rows ([n, n_cols] or [n, 2, n_cols]) so their sum in column `col` (the
    probe's rounding: the lowest width) equals the measured loss increase."""
    layers = sorted({i for i, _ in keys})
    rows = {i: [r for r, (j, _) in enumerate(keys) if j == i] for i in layers}
    raw = {i: float(damage[rows[i]][..., col].sum()) for i in layers}
    positive = [increase[i] for i in layers if increase[i] > 0]
    floor = min(positive) if positive else 1.0  # a layer whose loss did not rise gets the smallest rise seen
    scales = {i: max(increase[i], floor) / raw[i] if raw[i] > 0 else 1.0 for i in layers}
    out = damage.copy()
    for i in layers:
        out[rows[i]] *= scales[i]
    return out, scales


def whole_model(model, source, max_gb: float):
    """The whole model in memory for the probe, or None when its float32 copy would exceed `max_gb` (a fixed
    limit, so the same command plans the same on every machine), with the reason as a warning."""
    if isinstance(model, torch.nn.Module):
        return model, ""
    size = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
    need = size * 4 / max(torch.finfo(source.checkpoint_dtype).bits // 8, 1)  # fp32 copy
    if need > max_gb * 1e9:
        reason = (
            f"layer sensitivity probe skipped: the model needs {need / 1e9:.1f} GB in float32, above "
            f"probe_max_gb={max_gb:g}; the plan uses the uncalibrated proxy"
        )
        logger.warning(reason)
        return None, reason
    from moequant.checkpoint.loading import load_model

    return load_model(str(source.path), trust_remote_code=source.trust_remote_code), ""


def _scaled(table: DamageTable, increase: dict[int, float], record: dict) -> DamageTable:
    damage, scales = calibrate_damage(table.damage, table.keys, table.config.probe_column(), increase)
    record |= {"layer_scales": {str(i): float(f"{v:.6g}") for i, v in scales.items()}}
    return dataclasses.replace(table, damage=damage, probe=record)


def probe_ids(data: CalibData, config) -> torch.Tensor:
    """The probe's sequences [n, L]: the calibration windows cut into pieces of config.probe_len tokens (whole
    windows when 0 or longer), the first config.probe_samples pieces."""
    ids = data.input_ids  # [N, S]
    n, s = ids.shape
    length = config.probe_len if 0 < config.probe_len < s else s
    per = s // length  # pieces per window (a shorter tail is left out)
    pieces = ids[: -(-config.probe_samples // per), : per * length]  # [n', per * L] the windows needed
    return pieces.reshape(-1, length)[: config.probe_samples]  # [samples, L]


def calibrate(table: DamageTable, full_model, data: CalibData) -> DamageTable:
    """The table with each layer's rows scaled by its measured loss increase (see module docstring)."""
    config = table.config
    low = min(config.widths)
    inc, base = layer_loss_increase(full_model, probe_ids(data, config), low, config.group_size, config.sym)
    record = {
        "probe": f"calibration loss increase with one layer's experts at RTN {low}-bit, {config.probe_samples} "
        "sequences (measured, whole model)",
        "base_loss": round(base, 6),
        "loss_increase": {str(i): round(v, 6) for i, v in inc.items()},
    }
    logger.info("layer sensitivity (loss increase at %d bits): %s", low, record["loss_increase"])
    return _scaled(table, inc, record)


def calibrate_streamed(table: DamageTable, source, data: CalibData) -> DamageTable:
    """The table with each layer's rows scaled by the streamed probe's expected KL (probe_stream.py); with
    per-projection items, each projection's rows by the KL of rounding that projection alone; with
    --non-expert auto, the non-expert items priced at every candidate by the same probe."""
    from moequant.plan.probe_stream import StreamProbeConfig, by_projection, streamed_kl_all

    config = table.config
    low = min(config.widths)
    cfg = StreamProbeConfig(Rounding(low, config.group_size, config.sym), draws=config.probe_draws,
                            progress=config.progress)  # fmt: skip
    ids = probe_ids(data, config)
    what = f"{ids.shape[0]} sequences of {ids.shape[1]} tokens x {config.probe_draws} label draws (streamed, second order)"
    split = table.per_projection and config.items_per_expert == 2
    cols = config.columns()
    ints = [c for c, s in enumerate(cols) if s.method.is_integer]
    roundings = by_projection(cfg.rounding) if split else [cfg.rounding]
    kl, lin = streamed_kl_all(source, ids, cfg, roundings, _linears_by_layer(table), [cols[c] for c in ints])
    out = _scaled_by_projection(table, kl, low, what) if split else _scaled_by_layer(table, kl, low, what)
    if not table.linear_items:
        return out
    return _with_linear_damage(out, lin, ints)


def _linears_by_layer(table: DamageTable) -> dict[int, list[list[str]]]:
    """{layer: [the Linear names of each of its non-expert items, in table order]} (what the probe rounds)."""
    by_layer: dict[int, list[list[str]]] = {}
    for item in table.linear_items:
        by_layer.setdefault(item.layer, []).append([n for n, _, _ in item.linears])
    return by_layer


def _scaled_by_layer(table: DamageTable, kl: dict[int, list[float]], low: int, what: str) -> DamageTable:
    """The table with each layer's rows scaled by the expected KL of its experts at RTN `low` bits."""
    inc = {i: v[0] for i, v in kl.items()}
    record = {
        "probe": f"expected KL per token with one layer's experts at RTN {low}-bit, " + what,
        "loss_increase": {str(i): float(f"{v:.6g}") for i, v in inc.items()},
    }
    logger.info("layer sensitivity (expected KL at %d bits): %s", low, record["loss_increase"])
    return _scaled(table, inc, record)


def _scaled_by_projection(table: DamageTable, kl: dict[int, list[float]], low: int, what: str) -> DamageTable:
    """The table with each layer's gate/up rows scaled by the expected KL of its gate/up projections at RTN
    `low` bits, and its down rows by that of its down projections."""
    config = table.config
    both = {i: (v[0], v[1]) for i, v in kl.items()}
    record = {
        "probe": f"expected KL per token with one layer's gate/up (then down) projections at RTN {low}-bit, "
        + what,
        "loss_increase": {str(i): float(f"{g + d:.6g}") for i, (g, d) in both.items()},
        "loss_increase_gate_up": {str(i): float(f"{g:.6g}") for i, (g, _) in both.items()},
        "loss_increase_down": {str(i): float(f"{d:.6g}") for i, (_, d) in both.items()},
    }
    logger.info("layer sensitivity (expected KL at %d bits, gate/up, down): %s", low, both)
    col = config.probe_column()
    damage = table.damage.copy()
    scales = {}
    for p, name in enumerate(("gate_up", "down")):
        damage[:, p], scales[name] = calibrate_damage(
            table.damage[:, p], table.keys, col, {i: v[p] for i, v in both.items()}
        )
    record["layer_scales"] = {
        str(i): {n: float(f"{scales[n][i]:.6g}") for n in scales} for i in scales["gate_up"]
    }  # per layer: the gate/up and the down scale
    return dataclasses.replace(table, damage=damage, probe=record)


def _with_linear_damage(
    table: DamageTable, lin: dict[int, list[list[float]]], ints: list[int]
) -> DamageTable:
    """The table with its non-expert items priced by the probe's KL `lin` at the integer candidates `ints`
    (keeping an item in 16 bits costs nothing), recorded per module under "non_expert_kl"."""
    cols = table.config.columns()
    rows = {i: iter(v) for i, v in lin.items()}  # each layer's items, in table order
    ld = np.zeros((len(table.linear_items), len(cols)))  # [items, cols]; keep (16-bit) costs nothing
    for m, item in enumerate(table.linear_items):
        ld[m, ints] = next(rows[item.layer])
    labels = [f"rtn:{cols[c].bits} g{cols[c].group_size}" for c in ints]  # what the probe rounds with
    kl_record = {  # per module: expected KL per token at each candidate
        item.name: {lab: float(f"{v:.4g}") for lab, v in zip(labels, ld[m, ints], strict=True)}
        for m, item in enumerate(table.linear_items)
    }
    return dataclasses.replace(table, linear_damage=ld, probe=table.probe | {"non_expert_kl": kl_record})
