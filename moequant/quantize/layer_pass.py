"""The quantize pass: every decoder layer in order, streamed (calibration/stream.py), quantized at its planned
specs on the activations the already quantized layers before it produce ("sequential" GPTQ).

Per layer: the non-expert Linears first when the plan asks (so the experts' Hessians see the quantized
attention), then the MoE block's experts (experts.py), whose outputs the layer reads while it computes the
next layer's inputs; each finished layer is yielded to the caller (run.py writes it). lm_head last, when it
is quantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moequant.arch import block_ref, experts_swapped, set_experts
from moequant.calibration.capture import LayerInputs
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import PrecomputedExperts
from moequant.calibration.memo import ForwardMemo
from moequant.calibration.stream import first_inputs, stream_layers
from moequant.checkpoint.source import Source, non_expert_modules
from moequant.checkpoint.writer import checkpoint_tensors, fp32_names
from moequant.config import QuantizeConfig, SignRoundTarget, proj_specs
from moequant.plan.probe_experts import ChunkedExperts
from moequant.plan.schema import Plan
from moequant.quantize.drift import layer_drift, original_experts, unquantized_stream
from moequant.quantize.experts import quantize_block
from moequant.quantize.linears import layer_linear_specs, quantize_layer_linears, quantize_linears
from moequant.quantize.methods import learns_experts
from moequant.quantize.rows import ExpertRow, LinearRow
from moequant.runtime.ranks import Ranks, current


def use_precomputed(source: Source, ref, outputs: list[torch.Tensor]) -> None:
    """Free the original experts' own weights (quantized by now; the child modules a QuantizedExperts carries,
    arch.carried_modules, stay) and let the block read the quantized experts' outputs."""
    ref.experts._apply(lambda t: t.to("meta"), recurse=False)
    set_experts(source.arch, ref, PrecomputedExperts(outputs))


def quantize_pass(
    source: Source,
    plan: Plan,
    calib: CalibData,
    config: QuantizeConfig,
    save_dtype: torch.dtype,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
    unquantized: LayerInputs | None = None,
) -> Iterator[LayerDone]:
    """Quantize every MoE layer at its planned specs, streaming: yields each finished layer (its checkpoint
    tensors, report rows and the specs actually stored), then lm_head's when the plan quantizes it. A resumed
    pass (start_layer > 0) gets its layer's quantized `inputs` and, where needs_unquantized_stream, the
    unquantized model's (quantize/drift.unquantized_inputs, built before the replay swaps layers in)."""
    arch = source.arch
    ranks = current()
    if inputs is None:
        inputs = first_inputs(source, calib, config.batch_size, config.offload_activations)
    inputs.split(ranks)  # under torchrun, each rank runs the layer forwards on its own batches
    # signround's block target: the unquantized model's stream beside the quantized one (quantize/drift.py)
    stream = None
    if needs_unquantized_stream(plan, config):
        if start_layer and unquantized is None:
            raise ValueError(
                "a resumed pass at signround's block target needs the unquantized stream's inputs"
            )
        stream = unquantized if start_layer else unquantized_stream(inputs)
        stream.split(ranks)
    for step in stream_layers(source, inputs, "quantize", config.progress, start_layer):
        i, layer = step.index, step.layer
        ref = block_ref(arch, i, layer)
        drift = None
        if stream is not None:  # before anything of the layer is quantized
            with original_experts(source, ref, config.gptq_chunk_mb):
                drift = layer_drift(layer, i, stream, inputs)  # this rank's batches
            drift = gathered_drift(drift, inputs, ranks)  # every batch: every expert learns on all tokens
        specs = layer_linear_specs(plan, arch, i, layer)
        linear_rows = []
        if specs:  # first, so the experts' Hessians see the quantized attention
            inputs.gather(ranks, layer, i)  # their Hessians read every batch (one rank: nothing to do)
            # the experts read chunk by chunk through moequant's reference forward, as the probe runs them
            experts = experts_swapped(
                arch, ref, ChunkedExperts(source, arch, ref, config.gptq_chunk_mb) if ref else None
            )
            linear_rows = quantize_layer_linears(layer, arch, i, inputs, specs, config, save_dtype, experts)
            inputs.split(ranks)
        qe, rows, memo = None, [], None
        if ref is not None:
            if i not in plan.layers:
                raise ValueError(f"plan has no entry for MoE layer {i}")
            read = (lambda part, i=i: source.read_experts(i, part)) if source.lazy_experts else None
            memo = ForwardMemo.for_layer(layer, arch, inputs)
            qe, rows, outputs = quantize_block(
                arch, layer, ref, inputs, plan.layers[i], config, save_dtype, read_experts=read, drift=drift,
                memo=memo,
            )  # fmt: skip
            use_precomputed(source, ref, outputs)  # the layer's forward (next inputs) reads them
        step.advance(memo=memo)  # the attention's outputs from quantize_block's run, replayed
        if qe is not None:
            set_experts(arch, ref, qe)
        tensors = checkpoint_tensors(
            layer, f"{arch.layers}.{i}.", save_dtype, keep_fp32=fp32_names(source.model)
        )
        yield LayerDone(i, tensors, rows, None if qe is None else list(qe.specs), linear_rows)
    head = plan.linear_specs([arch.lm_head]) if arch.lm_head in non_expert_modules(source) else {}
    if head:
        inputs.gather(ranks)  # lm_head reads every batch
        norm = source.model.get_submodule(arch.final_norm)

        def feed():
            lm_head = source.model.get_submodule(arch.lm_head)
            for b in range(len(inputs.hidden)):
                lm_head(norm(inputs.batch(b)))

        yield LayerDone(None, {}, [], None, quantize_linears(source.model, head, feed, config, save_dtype))


def gathered_drift(drift: list[torch.Tensor], inputs: LayerInputs, ranks: Ranks) -> list[torch.Tensor]:
    """The layer's drift on every calibration batch from each rank's own (inputs.mine())."""
    device = drift[0].device if drift else torch.device("cpu")
    return [d for (d,) in inputs.every_batch(ranks, [[d] for d in drift], device)]


def needs_unquantized_stream(plan: Plan, config: QuantizeConfig) -> bool:
    """Some expert of the plan learns against the layer's output (signround's block target): the pass carries
    the unquantized model's stream beside the quantized one."""
    return config.signround.target is SignRoundTarget.BLOCK and any(
        learns_experts(p.method) for specs in plan.layers.values() for s in specs for p in proj_specs(s)
    )


@dataclass
class LayerDone:
    """One finished layer of the quantize pass (layer None: lm_head, whose tensors go with the base shard)."""

    layer: int | None
    tensors: dict[str, torch.Tensor]  # checkpoint names -> tensors in their storage dtypes
    rows: list[ExpertRow]  # the experts' report rows
    specs: list | None  # the specs stored per expert (RTN fallbacks included); None: no MoE block
    linear_rows: list[LinearRow]  # the non-expert Linears' report rows
