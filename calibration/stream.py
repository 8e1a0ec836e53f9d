"""The layer-streaming driver shared by the profile, quantize and replay passes.

Capture what layer 0 and every layer's kwargs receive (capture.py), then for each decoder layer in order: load
it (from memory or from safetensors: see checkpoint/source.py), let the pass do its work on the calibration
activations, run the layer to produce the next layer's inputs, and release it. Peak memory is one layer plus
the calibration activations, whatever the checkpoint's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from moequant.arch import decoder_layers
from moequant.calibration.capture import LayerInputs, capture_inputs, next_inputs
from moequant.calibration.data import CalibData
from moequant.checkpoint.source import Source
from moequant.runtime.devices import free_bytes
from moequant.runtime.memory import release_free_memory
from moequant.runtime.ranks import current

logger = logging.getLogger(__name__)


@dataclass
class LayerStep:
    """One decoder layer of a streamed pass, loaded, with the calibration activations that reach it."""

    index: int
    layer: torch.nn.Module
    inputs: LayerInputs  # this layer's inputs; advance() turns them into the next layer's
    advanced: bool = False

    def advance(self, before_batch: Callable[[int], None] | None = None, memo=None) -> None:
        """Run the layer on every calibration batch (`before_batch(b)` first): inputs become its outputs.
        `memo`: what the layer's attention returned on these inputs (calibration/memo.py), replayed."""
        next_inputs(self.layer, self.inputs, self.index, before_batch, memo)
        self.advanced = True


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's materialised parameters live (the skeleton's meta tensors do not count)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


_ACTIVATION_SHARE = 0.25  # of an accelerator's free memory, what the calibration activations may take


def first_inputs(
    source: Source, calib: CalibData, batch_size: int, offload: bool | None = None
) -> LayerInputs:
    """Layer 0's inputs and every layer's kwargs for the calibration batches, on the model's device; with
    `offload` (None: when they would take more than a quarter of the device's free memory, said in the log)
    the hidden states are kept in host memory and moved to the device a batch at a time."""
    model = source.model
    device = model_device(model)
    batches = [ids for ids, _ in calib.batches(batch_size)]
    free = free_bytes(device)
    if offload is None and free is not None:
        hidden = getattr(model.config.get_text_config(), "hidden_size", None) or 0
        need = calib.input_ids.numel() * hidden * 4  # float32 [tokens, H]
        offload = need > _ACTIVATION_SHARE * free
        if offload:
            logger.info(
                "calibration activations (%.2f GB) exceed a quarter of %s's free memory (%.2f GB): kept in "
                "host memory, moved to the device a batch at a time (--offload-activations)",
                need / 1e9, device, free / 1e9,
            )  # fmt: skip
    inputs = capture_inputs(model, decoder_layers(model, source.arch), batches, device)
    if offload:  # (on CPU the same tensors: the path stays covered by the CPU tests)
        inputs.offload(device)
    return inputs


def stream_layers(
    source: Source,
    inputs: LayerInputs,
    desc: str,
    progress: bool = True,
    start_layer: int = 0,
    stop_layer: int | None = None,
) -> Iterator[LayerStep]:
    """The decoder layers from `start_layer` in order, each loaded while the caller works on it: a pass is a
    plain loop,

        inputs = first_inputs(source, calib, batch_size)
        for step in stream_layers(source, inputs, "quantize"):
            ...                # work on step.layer with step.inputs
            step.advance()     # the next layer's inputs (done after the body when the body does not)
            ...                # work that needs the layer's outputs (write it)

    and the layer is released when the loop moves on; `stop_layer`: the layers before it only. Progress bars
    show on rank 0 only."""
    layers = decoder_layers(source.model, source.arch)
    progress = progress and current().writes
    stop = len(layers) if stop_layer is None else min(stop_layer, len(layers))
    for i in tqdm(range(start_layer, stop), desc=desc, disable=not progress, unit="layer"):
        source.load_layer(i)
        step = LayerStep(i, layers[i], inputs)
        yield step
        if not step.advanced:
            step.advance()
        source.release_layer(i)
        release_free_memory()
