"""One quantize run, from a model and a plan to a finished checkpoint folder.

    check the plan against the model -> open <out>.partial/ (or resume it) -> the quantize pass, one shard per
    layer (layer_pass.py) -> base shard, tokenizer, plan as stored, quant_report.json, extra documents (the
    model card) -> finalize: config.json complete, folder renamed to <out>

Nothing half-written looks finished: until the rename, config.json says `status: incomplete` with a resume hint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moequant.calibration.coverage import coverage, expert_tokens, warn_if_short
from moequant.calibration.coverage import to_json as coverage_json
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile
from moequant.calibration.report import save_profile
from moequant.checkpoint.format import FORMAT_VERSION, MoEQuantConfig, tensor_bytes
from moequant.checkpoint.source import (
    InMemorySource,
    Source,
    expert_dims,
    layer_experts,
    model_id,
    non_expert_nbytes,
    open_source,
    storage_dtype,
)
from moequant.checkpoint.writer import CheckpointWriter, base_tensors, partial_dir
from moequant.config import CalibMode, QuantizeConfig, proj_specs
from moequant.errors import PlanError
from moequant.plan.schema import Plan
from moequant.quantize.layer_pass import LayerDone, non_expert_modules, quantize_pass
from moequant.quantize.methods import needs_hessian
from moequant.quantize.resume import fingerprint, replay_pass, resumed_progress, used_specs
from moequant.quantize.summary import QuantizeSummary, quant_report
from moequant.runtime.memory import return_large_frees_at_once
from moequant.runtime.ranks import current
from moequant.runtime.timing import timed

logger = logging.getLogger(__name__)


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
    documents: Sequence[Callable[[Path], object]] = (),
    trust_remote_code: bool = False,
) -> QuantizeSummary:
    """Quantize `model` (object: quantized in place; path: streamed) per `plan` into the folder `out`.

    Everything is written to `out.partial/` and renamed at the end. With `resume`, a run interrupted after some
    layers continues from the first unfinished one (the finished layers are replayed from their shards to
    rebuild the activations) and produces the same bytes as an uninterrupted run; with no `out.partial/` to
    continue it starts a fresh run (with a warning). `trust_remote_code`: a model folder whose config names
    its own code (`auto_map`) may run it. `documents`: functions
    called with the folder once everything else is written, before it is finalized (the model card).
    """
    t0 = time.perf_counter()
    return_large_frees_at_once()  # freed layer temporaries leave the resident set (moequant/runtime/memory.py)
    ranks = current()  # under torchrun: every rank runs this; rank 0 alone writes files
    # experts read chunk by chunk, never a whole layer of them; layers compute on config.device
    source = open_source(model, trust_remote_code=trust_remote_code, lazy_experts=True, device=config.device)
    check_plan(source, plan, config)
    save_dtype = save_dtype or storage_dtype(source)
    header = _ConfigHeader(source, plan, save_dtype)
    expected = fingerprint(plan, data, config, save_dtype, header.model_config)
    writer, progress = None, None
    with ranks.guard("opening the output folder"):
        if ranks.writes:
            writer = CheckpointWriter(out, overwrite=overwrite, resume=resume)
            if writer.resuming:  # `resume` with no <out>.partial/ to continue starts afresh (check_target)
                progress = resumed_progress(writer, expected)
            else:
                progress = {"fingerprint": expected, "completed_layers": [], "report": [], "used": {}}
                writer.write_json("config.json", header.config_json(plan, "incomplete", writer.partial))
                writer.write_json("plan.json", plan.to_json())
                if profile_result is not None:
                    writer.copy_in(lambda d: save_profile(profile_result, d))
                writer.write_progress(progress)
    progress = ranks.broadcast(progress)  # what rank 0 resumes from, every rank resumes from

    start, inputs = 0, None
    if progress["completed_layers"]:
        start = max(progress["completed_layers"]) + 1
        with timed("replay"):
            inputs = replay_pass(
                source, plan, used_specs(progress), data, config, partial_dir(out), start, save_dtype
            )
    linear_rows: list[dict] = []
    with timed("quantize"):
        for done in quantize_pass(source, plan, data, config, save_dtype, start_layer=start, inputs=inputs):
            linear_rows += done.linear_rows
            if done.layer is not None:
                with ranks.guard(f"writing layer {done.layer}"):  # a write failing on rank 0 stops every rank
                    _record_layer(writer, progress, done)
    # what is stored: experts that fell back to RTN are recorded as such (the bit map must match the tensors)
    stored = dataclasses.replace(
        plan, layers={**plan.layers, **used_specs(progress)}, estimate=dict(plan.estimate)
    )
    summary = None
    with ranks.guard("writing the checkpoint"), timed("write"):
        if writer is not None:
            summary = _write_rest(
                writer,
                source,
                model,
                plan,
                stored,
                data,
                config,
                save_dtype,
                tokenizer,
                progress,
                linear_rows,
            )
            # the documents (the model card, its bit map) read the stored specs (RTN fallbacks), not the plan's
            writer.write_json("config.json", header.config_json(stored, "incomplete", writer.partial))
            for document in documents:
                writer.copy_in(document)
            writer.finalize(header.config_json(stored, "complete", writer.partial))
            summary.seconds = time.perf_counter() - t0
    summary = ranks.broadcast(summary)
    if isinstance(source, InMemorySource):
        source.model.config.quantization_config = header.quantization_config(stored)
    return summary


def _record_layer(writer: CheckpointWriter | None, progress: dict, done: LayerDone) -> None:
    """A finished layer: its shard (rank 0), and progress.json saying it is done (what --resume reads)."""
    if writer is not None:
        writer.write_shard(f"model-layer-{done.layer:05d}.safetensors", done.tensors)
    progress["completed_layers"].append(done.layer)
    progress["report"].extend(done.rows)
    if done.specs is not None:
        progress["used"][str(done.layer)] = [s.to_json() for s in done.specs]
    if writer is not None:
        writer.write_progress(progress)


def check_plan(source: Source, plan: Plan, config: QuantizeConfig) -> None:
    """The plan must fit the model (layers, expert counts, shapes) and the config's g_idx choice."""
    hidden, inter = expert_dims(source)
    plan.validate(source.arch.model_type, layer_experts(source), hidden, inter)
    if plan.linears:
        names = set(non_expert_modules(source))
        for n, lin in plan.linears.items():
            mod = source.model.get_submodule(n) if n in names else None
            if mod is None or (mod.out_features, mod.in_features) != (lin.out_features, lin.in_features):
                got = "is not a non-expert Linear of the model" if mod is None else (
                    f"is [{mod.out_features}, {mod.in_features}] in the model")  # fmt: skip
                raise PlanError(f"the plan's Linear {n} [{lin.out_features}, {lin.in_features}] {got}")
    if plan.act_order != config.stores_g_idx:
        raise PlanError(
            f"the plan {'stores' if plan.act_order else 'does not store'} g_idx but the quantize config "
            f"{'does' if config.stores_g_idx else 'does not'} (act_order={config.act_order}, "
            f"static_groups={config.static_groups})"
        )


class _ConfigHeader:
    """config.json of the output: the model's config, saved dtype, and the quantization_config of a plan."""

    def __init__(self, source: Source, plan: Plan, save_dtype: torch.dtype):
        arch = source.arch
        self.arch, self.save_dtype = arch, save_dtype
        self.act_params = arch.activation_params(source.blocks[0].experts)
        self.extra = {}
        specs = plan.linear_specs(non_expert_modules(source))
        if specs:  # each quantized non-expert Linear and its spec (format.install_quantized_linears)
            self.extra["non_expert"] = {"modules": {n: s.to_json() for n, s in specs.items()}}
        self.model_config = source.model.config.to_dict()
        self.model_config["dtype"] = str(save_dtype).removeprefix("torch.")

    def quantization_config(self, plan: Plan) -> MoEQuantConfig:
        arch = self.arch
        return MoEQuantConfig.from_plan(
            plan, arch.activation, self.act_params, arch.has_bias, self.save_dtype, **self.extra
        )

    def config_json(self, plan: Plan, status: str, partial: Path) -> dict:
        qc = self.quantization_config(plan).to_dict()
        qc |= {"status": status, "format_version": FORMAT_VERSION}
        if status != "complete":
            qc["resume_hint"] = f"rerun the same moequant quantize command with --resume (folder {partial})"
        return self.model_config | {"quantization_config": qc}


def _write_rest(
    writer, source, model, requested, stored, data, config, save_dtype, tokenizer, progress, linear_rows
) -> QuantizeSummary:
    """The files after the layers: base shard, tokenizer, generation config, stored plan, quant_report.json."""
    base = base_tensors(source.model, source.arch.layers, save_dtype)
    writer.write_shard("model-base.safetensors", base)
    if tokenizer is not None:
        writer.copy_in(tokenizer.save_pretrained)
    gen = getattr(source.model, "generation_config", None)
    if gen is not None:
        writer.copy_in(gen.save_pretrained)
    if "auto_map" in source.model.config.to_dict() and source.path is not None:
        writer.copy_code(source.path)  # remote-code model: the output needs the same code to load
    writer.write_json("plan.json", stored.to_json())
    report = progress["report"]
    layer_files = sorted(
        {str(writer.partial / f) for f in writer.weight_map.values()}
        - {str(writer.partial / "model-base.safetensors")}
    )
    bytes_after = sum(v.numel() * v.element_size() for v in base.values()) + tensor_bytes(layer_files)
    expert_before = stored.num_expert_params() * 2
    before = non_expert_nbytes(source) + expert_before
    rep = quant_report(
        model_id(model),
        data,
        config,
        before,
        bytes_after,
        requested,
        stored,
        report,
        linear_rows,
    )
    rep["calibration_coverage"] = _coverage(source, report, data, config, requested)
    rep["world_size"] = current().world  # each expert row's `rank` names the rank that quantized it
    writer.write_json("quant_report.json", rep)
    return QuantizeSummary(
        writer.out,
        0.0,
        before,
        bytes_after,
        expert_before,
        stored.total_expert_bytes(),
        stored.average_bits(),
        stored.histogram(),
        rep["fallbacks"],
        report,
        stored.linear_histogram(),
    )


def _coverage(source: Source, rows: list[dict], data: CalibData, config: QuantizeConfig, plan: Plan) -> dict:
    """quant_report.json's `calibration_coverage`: per layer, the tokens each expert's Hessians were built
    from against the gate/up and down input widths; one warning names the layers short of them among those
    the plan quantizes with a Hessian method (GPTQ; RTN and bnb use no calibration)."""
    hidden, inter = expert_dims(source)
    tokens = expert_tokens(rows)
    if config.calib_mode is CalibMode.ALL:  # every expert's Hessians see every calibration token
        tokens = {i: [data.tokens] * len(c) for i, c in tokens.items()}
    layers = coverage(tokens, hidden, inter)
    warn_if_short(
        [
            c
            for c in layers
            if any(needs_hessian(p.method) for s in plan.layers.get(c.layer, ()) for p in proj_specs(s))
        ]
    )
    return coverage_json(layers)
