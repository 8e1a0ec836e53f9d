"""Capture what every decoder layer receives, without running the layers.

Each decoder layer is temporarily replaced by a `_Catcher` that records its keyword arguments (attention mask
for its layer type, position embeddings, ...) and passes the hidden states through unchanged; the last one
stops the forward pass. One pass per calibration batch gives layer 0's inputs and every layer's kwargs,
whatever the family (sliding-window layers included), using only the model's own embedding code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, index: int, last: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        kwargs = {
            k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "output_attentions")
        }
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor per calibration batch) and per-layer kwargs."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch [B, L, H]
    kwargs: list[dict[int, dict]] = field(default_factory=list)  # per batch: layer index -> kwargs


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches, device) -> LayerInputs:
    """Run the embedding part of `model` on each batch of input ids and capture every layer's inputs."""
    originals = list(layers)
    out = LayerInputs()
    sink: dict = {}
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, i == len(layers) - 1, sink)
        for ids in batches:
            sink.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            out.hidden.append(sink["hidden"])
            out.kwargs.append(sink["kwargs"])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return out


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def next_inputs(layer: nn.Module, inputs: LayerInputs, layer_idx: int, before_batch=None) -> None:
    """Replace inputs.hidden by this layer's outputs (in place, batch by batch); `before_batch(b)` runs first."""
    with torch.no_grad():
        for b, (hidden, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs, strict=True)):
            if before_batch is not None:
                before_batch(b)
            inputs.hidden[b] = run_layer(layer, hidden, kwargs[layer_idx])
