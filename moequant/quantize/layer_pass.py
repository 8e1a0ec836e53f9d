"""The quantize pass: every decoder layer in order, streamed (calibration/stream.py), quantized at its planned
specs on the activations the already quantized layers before it produce ("sequential" GPTQ).

Per layer: the non-expert Linears first when the plan asks (so the experts' Hessians see the quantized
attention), then the MoE block's experts (experts.py), whose outputs the layer reads while it computes the
next layer's inputs; the finished layer's tensors go to `on_layer_done`. lm_head last, when it is quantized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moequant.arch import block_ref, decoder_layers, experts_swapped, non_expert_linears, set_experts
from moequant.calibration.capture import LayerInputs
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import PrecomputedExperts
from moequant.calibration.stream import LayerHooks, sequential_pass
from moequant.checkpoint.source import Source, tied_names
from moequant.checkpoint.writer import checkpoint_tensors, fp32_names
from moequant.config import QuantizeConfig
from moequant.plan.probe_experts import ChunkedExperts
from moequant.plan.schema import Plan
from moequant.quantize.experts import quantize_block
from moequant.quantize.linears import layer_linear_specs, quantize_layer_linears, quantize_linears
from moequant.runtime.ranks import current


@dataclass
class QuantizeResult:
    report: list[dict]
    seconds: float
    inputs: LayerInputs | None = None  # hidden states after the last layer
    non_expert_report: list[dict] = field(default_factory=list)
    used: dict[int, list] = field(default_factory=dict)  # layer -> QuantSpecs actually stored (fallbacks)


def use_precomputed(source: Source, ref, outputs: list[torch.Tensor]) -> None:
    """Free the original experts (quantized by now) and let the block read the quantized experts' outputs."""
    ref.experts.to("meta")
    set_experts(source.arch, ref, PrecomputedExperts(outputs))


def non_expert_modules(source: Source) -> list[str]:
    """Full names of the Linears `--non-expert` quantizes: in every decoder layer, all but experts, routers
    and gates; plus lm_head when it is not tied to the embeddings."""
    arch = source.arch
    names = []
    for i, layer in enumerate(decoder_layers(source.model, arch)):
        names += [f"{arch.layers}.{i}.{n}" for n in non_expert_linears(layer, arch)]
    if f"{arch.lm_head}.weight" not in tied_names(source.model):
        names.append(arch.lm_head)
    return names


def quantize_pass(
    source: Source,
    plan: Plan,
    calib: CalibData,
    config: QuantizeConfig,
    save_dtype: torch.dtype,
    on_layer_done: Callable[[int, dict[str, torch.Tensor], list[dict], list | None], None] | None = None,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
) -> QuantizeResult:
    """Quantize every MoE layer at its planned specs, streaming; `on_layer_done(i, tensors, report_rows, specs)`
    gets each finished layer's tensors (checkpoint names, storage dtypes) and the specs actually stored."""
    arch = source.arch
    report: list[dict] = []
    ne_report: list[dict] = []
    used: dict[int, list] = {}
    t0 = time.perf_counter()

    def on_layer(i, layer, inputs: LayerInputs):
        ref = block_ref(arch, i, layer)
        specs = layer_linear_specs(plan, arch, i, layer)
        if specs:  # first, so the experts' Hessians see the quantized attention
            # the experts read chunk by chunk through moequant's reference forward, as the probe runs them
            experts = experts_swapped(
                arch, ref, ChunkedExperts(source, arch, ref, config.gptq_chunk_mb) if ref else None
            )
            ne_report.extend(
                quantize_layer_linears(layer, arch, i, inputs, specs, config, save_dtype, experts)
            )
        qe, rows = None, []
        if ref is not None:
            if i not in plan.layers:
                raise ValueError(f"plan has no entry for MoE layer {i}")
            read = (lambda part: source.read_experts(i, part)) if source.lazy_experts else None
            qe, rows, outputs = quantize_block(
                arch, layer, ref, inputs, plan.layers[i], config, save_dtype, read_experts=read
            )
            use_precomputed(source, ref, outputs)  # the driver's forward (next inputs) reads them

        def finish():
            specs = None
            if qe is not None:
                set_experts(arch, ref, qe)
                used[i] = specs = list(qe.specs)
                report.extend(rows)
            tensors = checkpoint_tensors(
                layer, f"{arch.layers}.{i}.", save_dtype, keep_fp32=fp32_names(source.model)
            )
            with current().guard(f"writing layer {i}"):  # a write failing on rank 0 stops every rank
                if on_layer_done is not None:
                    on_layer_done(i, tensors, rows, specs)

        return LayerHooks(after=finish)

    inputs = sequential_pass(
        source,
        calib,
        config.batch_size,
        on_layer,
        "quantize",
        config.progress,
        start_layer=start_layer,
        inputs=inputs,
        offload=config.offload_activations,
    )
    head = plan.linear_specs([arch.lm_head]) if arch.lm_head in non_expert_modules(source) else {}
    if head:
        norm = source.model.get_submodule(arch.final_norm)

        def feed():
            lm_head = source.model.get_submodule(arch.lm_head)
            for b in range(len(inputs.hidden)):
                lm_head(norm(inputs.batch(b)))

        ne_report.extend(quantize_linears(source.model, head, feed, config, save_dtype))
    return QuantizeResult(report, time.perf_counter() - t0, inputs, ne_report, used)
