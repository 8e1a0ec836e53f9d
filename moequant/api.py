"""The Python API, one entry point per step; the CLI is a thin layer over it.

data = calibration(tokenizer, CalibConfig(...))
prof = profile(model, data)                       # routing statistics
plan = make_plan_for(model, prof, PlanConfig(Budget(bits=3.0)))
summary = quantize(model, plan, data, out="out")  # checkpoint folder
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moequant.calibration.data import CalibConfig, CalibData, build_calibration
from moequant.calibration.profiler import Profile
from moequant.calibration.report import save_profile
from moequant.checkpoint.format import FORMAT_VERSION, MoEQuantConfig
from moequant.checkpoint.source import CheckpointSource, InMemorySource
from moequant.checkpoint.writer import CheckpointWriter
from moequant.config import QuantizeConfig, QuantSpec
from moequant.errors import MoEQuantError, PlanError
from moequant.plan.allocate import plan_from_damage, uniform_plan
from moequant.plan.schema import Plan, PlanConfig
from moequant.quantize.memory import return_large_frees_at_once
from moequant.quantize.passes import (
    checkpoint_tensors,
    non_expert_modules,
    non_expert_nbytes,
    profile_pass,
    quantize_pass,
    replay_pass,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CalibConfig",
    "calibration",
    "open_source",
    "profile",
    "make_plan_for",
    "quantize",
    "QuantizeSummary",
]


def calibration(tokenizer, config: CalibConfig = CalibConfig()) -> CalibData:
    return build_calibration(tokenizer, config)


def open_source(
    model, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, lazy_experts: bool = False
):
    """A model object (kept in memory) or a checkpoint path / name (streamed layer by layer; with
    `lazy_experts` a layer loads without its fused expert weights, which the quantizer reads chunk by chunk
    in the checkpoint's 16-bit dtype: see CheckpointSource)."""
    if isinstance(model, torch.nn.Module):
        return InMemorySource(model)
    if isinstance(model, InMemorySource | CheckpointSource):
        return model
    from moequant.checkpoint.loading import resolve_model_path

    path = resolve_model_path(model)
    if not Path(path).is_dir():
        raise MoEQuantError(
            f"{model} is not a local folder; moequant quantizes local checkpoints (download it first, e.g. "
            "`huggingface-cli download <repo> --local-dir <folder>`)"
        )
    return CheckpointSource(
        path, dtype=dtype, trust_remote_code=trust_remote_code, lazy_experts=lazy_experts
    )


def profile(
    model, data: CalibData, batch_size: int = 8, min_tokens: int = 32, progress: bool = True
) -> Profile:
    """Routing profile of a model (object or checkpoint), layer by layer."""
    source = open_source(model)
    return profile_pass(
        source, data, batch_size, min_tokens, progress=progress, model_id=_model_id(model)
    ).profile


def make_plan_for(
    model,
    data: CalibData,
    config: PlanConfig,
    act_order: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Plan, Profile]:
    """Profile + damage table in one streaming pass, the per-layer sensitivity probe when the model fits in
    memory, then the exact knapsack. Returns (plan, profile)."""
    source = open_source(model)
    res = profile_pass(
        source, data, batch_size, plan_config=config, progress=progress, model_id=_model_id(model)
    )
    damage, probe = res.damage, {}
    if config.layer_probe:
        full = _whole_model(model, source)
        if full is not None:
            from moequant.plan.probe import calibrate_damage, layer_loss_increase

            low = min(config.widths)
            inc, base = layer_loss_increase(
                full, data.input_ids[: config.probe_samples], low, config.group_size, config.sym
            )
            damage, scales = calibrate_damage(damage, res.damage_keys, config.widths, inc)
            probe = {
                "probe": f"calibration loss increase with one layer's experts at RTN {low}-bit, {config.probe_samples} sequences",
                "base_loss": round(base, 6),
                "loss_increase": {str(i): round(v, 6) for i, v in inc.items()},
                "layer_scales": {str(i): float(f"{v:.6g}") for i, v in scales.items()},
            }
            logger.info("layer sensitivity (loss increase at %d bits): %s", low, probe["loss_increase"])
    hidden, inter = _dims(source)
    plan = plan_from_damage(
        source.arch.model_type,
        res.damage_keys,
        damage,
        hidden,
        inter,
        config,
        res.non_expert_bytes,
        act_order,
    )
    plan.estimate |= probe
    return plan, res.profile


def _whole_model(model, source):
    """The whole model in memory for the sensitivity probe, or None (with a log line) when it would not fit."""
    if isinstance(model, torch.nn.Module):
        return model
    import psutil

    size = sum(f.stat().st_size for f in Path(source.path).glob("*.safetensors"))
    need = size * 4 / max(torch.finfo(source.checkpoint_dtype).bits // 8, 1)  # fp32 copy
    if need > 0.5 * psutil.virtual_memory().available:
        logger.info(
            "layer sensitivity probe skipped: the model needs %.1f GB in fp32; the plan uses the uncalibrated proxy",
            need / 1e9,
        )
        return None
    from moequant.checkpoint.loading import load_model

    return load_model(str(source.path))


def make_uniform_plan(model, spec: QuantSpec, act_order: bool = False) -> Plan:
    source = open_source(model)
    layer_experts = {b.layer_idx: b.num_experts for b in source.blocks}
    hidden, inter = _dims(source)
    return uniform_plan(source.arch.model_type, layer_experts, hidden, inter, spec, act_order)


def _dims(source) -> tuple[int, int]:
    experts = source.blocks[0].experts
    w = source.arch.expert_weights(experts) if experts.gate_up_proj.device.type != "meta" else None
    if w is not None:
        return w.hidden, w.intermediate
    shape = experts.gate_up_proj.shape  # meta tensors still know their shapes
    if source.arch.layout.value == "gate_up_concat":
        return shape[2], shape[1] // 2
    return shape[1], shape[2] // 2


def _model_id(model) -> str:
    if isinstance(model, torch.nn.Module):
        return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return str(model or "bundled")


@dataclass
class QuantizeSummary:
    out: Path
    seconds: float
    bytes_before: int
    bytes_after: int
    expert_bytes_before: int
    expert_bytes_after: int
    average_bits: float
    histogram: dict[str, int]
    fallbacks: int
    report: list[dict] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("model size", f"{self.bytes_before / 1e6:.2f} MB", f"{self.bytes_after / 1e6:.2f} MB"),
            (
                "expert weights",
                f"{self.expert_bytes_before / 1e6:.2f} MB",
                f"{self.expert_bytes_after / 1e6:.2f} MB",
            ),
            ("bits / expert weight", "16.00", f"{self.average_bits:.3f}"),
        ]
        lines = [f"{'':22s}{'before':>14s}{'after':>14s}"] + [f"{a:22s}{b:>14s}{c:>14s}" for a, b, c in rows]
        lines.append("experts per width: " + ", ".join(f"{k} x{v}" for k, v in self.histogram.items()))
        if self.fallbacks:
            lines.append(f"experts that fell back to RTN (too few routed tokens): {self.fallbacks}")
        lines.append(f"time: {self.seconds:.1f} s -> {self.out}")
        return "\n".join(lines)


def quantize(
    model,
    plan: Plan,
    data: CalibData,
    out: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    tokenizer=None,
    profile_result: Profile | None = None,
    overwrite: bool = False,
    save_dtype: torch.dtype | None = None,
    resume: bool = False,
) -> QuantizeSummary:
    """Quantize `model` (object: quantized in place; path: streamed) per `plan` into the folder `out`.

    Everything is written to `out.partial/` and renamed at the end. With `resume`, a run interrupted after some
    layers continues from the first unfinished one (the finished layers are replayed from their shards to
    rebuild the activations) and produces the same bytes as an uninterrupted run.
    """
    t0 = time.perf_counter()
    return_large_frees_at_once()  # freed layer temporaries leave the resident set (moequant/quantize/memory.py)
    source = open_source(model, lazy_experts=True)  # experts read chunk by chunk, never a whole layer of them
    arch = source.arch
    hidden, inter = _dims(source)
    plan.validate(arch.model_type, {b.layer_idx: b.num_experts for b in source.blocks}, hidden, inter)
    if plan.act_order != config.stores_g_idx:
        raise PlanError(
            f"the plan {'stores' if plan.act_order else 'does not store'} g_idx but the quantize config "
            f"{'does' if config.stores_g_idx else 'does not'} (act_order={config.act_order}, "
            f"static_groups={config.static_groups})"
        )
    save_dtype = save_dtype or _source_dtype(source)
    act_params = arch.activation_params(source.blocks[0].experts)
    extra = {}
    if plan.non_expert is not None:
        extra["non_expert"] = {"spec": plan.non_expert.to_json(), "modules": non_expert_modules(source)}
    model_config = source.model.config.to_dict()
    model_config["dtype"] = str(save_dtype).removeprefix("torch.")
    fingerprint = _fingerprint(plan, data, config, save_dtype, model_config)
    writer = CheckpointWriter(out, overwrite=overwrite, resume=resume)

    def config_json(p: Plan, status: str) -> dict:
        qc = MoEQuantConfig.from_plan(
            p, arch.activation, act_params, arch.has_bias, save_dtype, **extra
        ).to_dict()
        qc |= {"status": status, "format_version": FORMAT_VERSION}
        if status != "complete":
            qc["resume_hint"] = (
                f"rerun the same moequant quantize command with --resume (folder {writer.partial})"
            )
        return model_config | {"quantization_config": qc}

    progress = writer.read_progress() if resume else {}
    if resume:
        if progress.get("fingerprint") != fingerprint:
            raise MoEQuantError(
                f"{writer.partial} was started with other inputs (model, plan, calibration or options); "
                "rerun with the same arguments, or remove the folder to start again"
            )
        logger.info("resuming after layers %s", progress["completed_layers"])
    else:
        progress = {"fingerprint": fingerprint, "completed_layers": [], "report": [], "used": {}}
        writer.write_json("config.json", config_json(plan, "incomplete"))
        writer.write_json("plan.json", plan.to_json())
        if profile_result is not None:
            writer.copy_in(lambda d: save_profile(profile_result, d))
        writer.write_progress(progress)

    def on_layer_done(i, tensors, rows, specs):
        writer.write_shard(f"model-layer-{i:05d}.safetensors", tensors)
        progress["completed_layers"].append(i)
        progress["report"].extend(rows)
        if specs is not None:
            progress["used"][str(i)] = [s.to_json() for s in specs]
        writer.write_progress(progress)

    start, inputs = 0, None
    done = progress["completed_layers"]
    if done:
        start = max(done) + 1
        used = {int(i): [QuantSpec.from_json(d) for d in v] for i, v in progress["used"].items()}
        inputs = replay_pass(source, plan, used, data, config, writer.partial, start, save_dtype)
    result = quantize_pass(
        source, plan, data, config, save_dtype, on_layer_done, start_layer=start, inputs=inputs
    )
    report = progress["report"]
    used = {int(i): [QuantSpec.from_json(d) for d in v] for i, v in progress["used"].items()}
    requested = plan
    # what is stored: experts that fell back to RTN are recorded as such (the bit map must match the tensors)
    plan = dataclasses.replace(plan, layers={**plan.layers, **used}, estimate=dict(plan.estimate))
    base = _base_tensors(source, save_dtype)
    writer.write_shard("model-base.safetensors", base)
    if tokenizer is not None:
        writer.copy_in(tokenizer.save_pretrained)
    gen = getattr(source.model, "generation_config", None)
    if gen is not None:
        writer.copy_in(gen.save_pretrained)
    writer.write_json("plan.json", plan.to_json())
    fallbacks = sum(1 for r in report if "note" in r)
    bytes_after = sum(v.numel() * v.element_size() for v in base.values()) + _shard_bytes(writer)
    expert_before = plan.num_expert_params() * 2
    before = non_expert_nbytes(source) + expert_before
    summary = QuantizeSummary(
        writer.out,
        0.0,
        before,
        bytes_after,
        expert_before,
        plan.total_expert_bytes(),
        plan.average_bits(),
        plan.histogram(),
        fallbacks,
        report,
    )
    writer.write_json(
        "quant_report.json",
        {
            "model": _model_id(model),
            "calibration": data.description,
            "config": {k: (v.value if hasattr(v, "value") else v) for k, v in config.__dict__.items()},
            "bytes_before": before,
            "bytes_after": bytes_after,
            "average_bits": round(plan.average_bits(), 4),
            "requested_plan": requested.to_json()["layers"],
            "histogram": plan.histogram(),
            "fallbacks": fallbacks,
            "experts": report,
            "non_expert": result.non_expert_report,
        },
    )
    from moequant.evals.card import write_card  # README.md model card + bit map, from the files written above

    writer.copy_in(write_card)
    writer.finalize(config_json(plan, "complete"))
    summary.seconds = time.perf_counter() - t0
    if isinstance(source, InMemorySource):
        source.model.config.quantization_config = MoEQuantConfig.from_plan(
            plan, arch.activation, act_params, arch.has_bias, save_dtype, **extra
        )
    return summary


def _fingerprint(plan: Plan, data: CalibData, config: QuantizeConfig, save_dtype, model_config: dict) -> dict:
    """What must match for --resume to continue a run (hashes, so progress.json stays small)."""
    import hashlib
    import json

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {
        "plan": digest({k: v for k, v in plan.to_json().items() if k != "estimate"}),
        "calibration": hashlib.sha256(data.input_ids.numpy().tobytes()).hexdigest()[:16],
        "config": digest({k: v for k, v in config.__dict__.items() if k not in ("progress",)}),
        "save_dtype": str(save_dtype),
        "model": digest(model_config),
    }


def _source_dtype(source) -> torch.dtype:
    if isinstance(source, CheckpointSource):
        return source.checkpoint_dtype
    dt = getattr(source.model.config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


def _base_tensors(source, save_dtype) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (embeddings, final norm, lm_head unless tied)."""
    prefix = f"{source.arch.layers}."
    tied = set(getattr(source.model, "all_tied_weights_keys", {}) or {})
    skip = {k for k in source.model.state_dict() if k.startswith(prefix) or k in tied}
    return checkpoint_tensors(source.model, "", save_dtype, skip)


def _shard_bytes(writer: CheckpointWriter) -> int:
    from moequant.checkpoint.format import read_headers

    files = sorted(
        {str(writer.partial / f) for f in writer.weight_map.values()}
        - {str(writer.partial / "model-base.safetensors")}
    )
    total = 0
    sizes = {"I32": 4, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8, "I16": 2, "I8": 1, "F64": 8}
    for shape, dt in read_headers(files).values():
        n = 1
        for d in shape:
            n *= d
        total += n * sizes.get(dt, 4)
    return total
