"""The unquantized model's stream beside the quantized one, and each layer's drift between them: what
`--method signround` with the block target (SignRoundTarget.BLOCK, quantize/signround.py) learns to cancel.

For layer i, with h the unquantized model's input to the layer and h_q the quantized model's (the layers
before i quantized), both through layer i as it is before its experts are quantized:

    drift_i = layer_i(h) - layer_i(h_q)            [tokens, H]

The layer's output is the residual plus the routed sum of its experts, so experts whose quantized outputs add
drift_i to that sum give the unquantized model's output at layer i: AutoRound's target (the block's output on
the unquantized inputs, learned from the quantized inputs), read at the routed sum.
"""

from __future__ import annotations

import torch

from moequant.calibration.capture import LayerInputs, run_layer


def unquantized_stream(inputs: LayerInputs) -> LayerInputs:
    """A copy of the calibration inputs' hidden states (the kwargs are shared: masks, positions); the same
    batches as `inputs` (LayerInputs.split)."""
    hidden = [None if h is None else h.clone() for h in inputs.hidden]
    return LayerInputs(
        hidden, inputs.kwargs, inputs.offload_to, inputs.mine() if inputs.owned is not None else None
    )


def unquantized_inputs(source, arch, calib, config, start_layer: int) -> LayerInputs:
    """The unquantized model's inputs to layer `start_layer` (a resumed pass): the original layers before it
    run on the calibration batches, streamed as every pass streams them (experts read by chunk when lazy), so
    the resumed run learns against the drift an uninterrupted run sees."""
    from moequant.arch import block_ref
    from moequant.calibration.stream import first_inputs, stream_layers
    from moequant.runtime.ranks import current

    stream = first_inputs(source, calib, config.batch_size, config.offload_activations)
    stream.split(current())  # this rank's batches, as the pass it feeds
    for step in stream_layers(source, stream, "unquantized stream", config.progress, stop_layer=start_layer):
        with original_experts(source, block_ref(arch, step.index, step.layer), config.gptq_chunk_mb):
            step.advance()
    return stream


def original_experts(source, ref, chunk_mb: int):
    """A context in which the layer of MoE block `ref` (None: a dense layer) runs its original experts: those it
    holds, or, when the source reads experts lazily (meta in the layer), a chunk at a time from the source."""
    from moequant.arch import experts_swapped
    from moequant.plan.probe_experts import ChunkedExperts

    lazy = ref is not None and source.lazy_experts
    return experts_swapped(
        source.arch,
        ref if lazy else None,
        ChunkedExperts(source, source.arch, ref, chunk_mb) if lazy else None,
    )


@torch.no_grad()
def layer_drift(layer, layer_idx: int, stream: LayerInputs, inputs: LayerInputs) -> list[torch.Tensor]:
    """Per calibration batch of this rank (inputs.mine()), drift_i [B*L, H] float32 (the experts' token order); advances `stream` through
    the layer (its output is the next layer's unquantized input). State a family carries from layer to layer
    comes from the quantized stream's kwargs for both."""
    out = []
    for b in inputs.mine():
        kwargs = inputs.kwargs[b]
        y = run_layer(layer, stream.batch(b), kwargs[layer_idx])  # [B, L, H]
        y_q = run_layer(layer, inputs.batch(b), kwargs[layer_idx])  # [B, L, H]
        out.append((y.float() - y_q.float()).reshape(-1, y.shape[-1]))  # [B*L, H]
        stream.put(b, y)
    return out
