"""What a quantize run writes besides the layer shards: config.json's header (the model's config and the
quantization_config of a plan), and after the layers the base shard, tokenizer, generation config, the plan
as stored, and quant_report.json with its calibration coverage."""

from __future__ import annotations

import torch

from moequant.calibration.coverage import coverage, expert_tokens, warn_if_short
from moequant.calibration.coverage import to_json as coverage_json
from moequant.calibration.data import CalibData
from moequant.checkpoint.format import FORMAT_VERSION, MoEQuantConfig, tensor_bytes
from moequant.checkpoint.source import Source, expert_dims, model_id, non_expert_modules, non_expert_nbytes
from moequant.checkpoint.writer import CheckpointWriter, base_tensors
from moequant.config import CalibMode, QuantizeConfig, proj_specs
from moequant.plan.schema import Plan
from moequant.quantize.methods import needs_hessian
from moequant.quantize.progress import Progress
from moequant.quantize.rows import ExpertRow
from moequant.quantize.summary import QuantizeSummary, quant_report
from moequant.runtime.ranks import current


class ConfigHeader:
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

    def config_json(self, plan: Plan, status: str, partial) -> dict:
        qc = self.quantization_config(plan).to_dict()
        qc |= {"status": status, "format_version": FORMAT_VERSION}
        if status != "complete":
            qc["resume_hint"] = f"rerun the same moequant quantize command with --resume (folder {partial})"
        return self.model_config | {"quantization_config": qc}


def write_rest(
    writer: CheckpointWriter, source: Source, model, requested: Plan, stored: Plan, data: CalibData,
    config: QuantizeConfig, save_dtype: torch.dtype, tokenizer, progress: Progress,
) -> QuantizeSummary:  # fmt: skip
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
        progress.rows,
        progress.linear_rows,
    )
    rep["calibration_coverage"] = _coverage(source, progress.rows, data, config, requested)
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
        progress.rows,
        stored.linear_histogram(),
    )


def _coverage(
    source: Source, rows: list[ExpertRow], data: CalibData, config: QuantizeConfig, plan: Plan
) -> dict:
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
