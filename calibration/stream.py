"""The layer-streaming driver shared by the profile, quantize and replay passes.

Capture what layer 0 and every layer's kwargs receive (capture.py), then for each decoder layer in order: load
it (from memory or from safetensors: see checkpoint/source.py), let the pass do its work on the calibration
activations, run the layer to produce the next layer's inputs, and release it. Peak memory is one layer plus
the calibration activations, whatever the checkpoint's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moequant.arch import decoder_layers
from moequant.calibration.capture import LayerInputs, capture_inputs, next_inputs
from moequant.calibration.data import CalibData
from moequant.memory import release_free_memory


@dataclass
class LayerHooks:
    """What a pass wants around the driver's forward of one layer."""

    before_batch: Callable[[int], None] | None = None  # called with the batch index before each batch
    after: Callable[[], None] | None = None  # called once the layer's outputs are computed


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's materialised parameters live (the skeleton's meta tensors do not count)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def first_inputs(source, calib: CalibData, batch_size: int) -> LayerInputs:
    """Layer 0's inputs and every layer's kwargs for the calibration batches."""
    model = source.model
    batches = [ids for ids, _ in calib.batches(batch_size)]
    return capture_inputs(model, decoder_layers(model, source.arch), batches, model_device(model))


def sequential_pass(
    source,
    calib: CalibData,
    batch_size: int,
    on_layer: Callable[[int, torch.nn.Module, LayerInputs], LayerHooks | None],
    desc: str,
    progress: bool = True,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
) -> LayerInputs:
    """Stream the layers from `start_layer` (with `inputs` captured or rebuilt up to it); returns the hidden
    states after the last layer."""
    layers = decoder_layers(source.model, source.arch)
    if inputs is None:
        inputs = first_inputs(source, calib, batch_size)
    for i in tqdm(range(start_layer, len(layers)), desc=desc, disable=not progress, unit="layer"):
        source.load_layer(i)
        hooks = on_layer(i, layers[i], inputs) or LayerHooks()
        next_inputs(layers[i], inputs, i, hooks.before_batch)
        if hooks.after is not None:
            hooks.after()
        source.release_layer(i)
        release_free_memory()
    return inputs
