"""Capture what every decoder layer receives, without running the layers.

Each decoder layer is temporarily replaced by a `_Catcher` that records its keyword arguments (attention mask
for its layer type, position embeddings, ...) and passes the hidden states through unchanged; the last one
stops the forward pass. One pass per calibration batch gives layer 0's inputs and every layer's kwargs,
whatever the family (sliding-window layers included), using only the model's own embedding code.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from moequant.arch.registry import carried_input
from moequant.errors import UnsupportedModelError
from moequant.runtime.devices import pinned


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, index: int, last: bool, sink: dict, carries: bool):
        super().__init__()
        self.index, self.last, self.sink, self.carries = index, last, sink, carries
        object.__setattr__(self, "_layer", layer)  # not a submodule: only for the attributes below

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model's forward reads off its layers (e.g. attention_type)
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:  # inputs the model's loop passes by position (Gemma 4's per-layer inputs): kept by name
            names = list(inspect.signature(self.__dict__["_layer"].forward).parameters)[1 : 1 + len(args)]
            kwargs.update(zip(names, args, strict=True))
            self.sink.setdefault("positional", {})[self.index] = names
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        kwargs = {
            k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "output_attentions")
        }
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise _Stop
        hidden_states = hidden_states + self.sink.get("shift", 0)  # see _check_positional
        return (
            (hidden_states, None) if self.carries else hidden_states
        )  # no state carried yet: see next_inputs


def _run(model, ids, sink: dict, shift: float = 0) -> None:
    sink.clear()
    sink["shift"] = shift
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


def _check_positional(model, ids, sink: dict, layers) -> None:
    """Positional inputs are captured once, like keyword ones; that is only right when they do not depend on
    what earlier layers output (Inkling-2's block states do). Checked by shifting every layer's output."""
    first = {i: {n: sink["kwargs"][i][n] for n in names} for i, names in sink["positional"].items()}
    _run(model, ids, sink, shift=1.0)
    for i, values in first.items():
        for name, value in values.items():
            again = sink["kwargs"][i][name]
            same = torch.equal(value, again) if torch.is_tensor(value) else value is again or value == again
            if not same:
                raise UnsupportedModelError(
                    f"{type(layers[i]).__name__} receives {name!r} from the model's own layer loop, built from "
                    "the earlier layers' outputs: moequant streams layers one at a time and cannot rebuild it"
                )


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor per calibration batch) and per-layer kwargs.

    With `offload_to` set, the hidden states live in host memory (pinned when CUDA is there) and each batch
    moves to that compute device when a layer reads it (`batch`), its output back when stored (`put`): the
    calibration activations of a large run need not fit on the device beside the layer."""

    hidden: list[torch.Tensor | None] = field(
        default_factory=list
    )  # per batch [B, L, H]; None: another rank's
    kwargs: list[dict[int, dict]] = field(default_factory=list)  # per batch: layer index -> kwargs
    offload_to: torch.device | None = None  # the compute device, when the hidden states are offloaded
    owned: list[int] | None = None  # the batches this torchrun rank computes (split); None: every batch

    def mine(self) -> list[int]:
        """The batches the layer passes run here: every batch, or this rank's share after `split`."""
        return list(range(len(self.kwargs))) if self.owned is None else list(self.owned)

    def split(self, ranks) -> None:
        """Keep this rank's batches only (runtime/ranks.Ranks.batch_owner): under torchrun the ranks run the
        layer forwards on their own batches, and share what the experts receive (gathered) instead."""
        if not ranks.distributed or self.owned is not None:
            return
        self.owned = [b for b in range(len(self.kwargs)) if ranks.batch_owner(b) == ranks.rank]
        self.hidden = [h if b in self.owned else None for b, h in enumerate(self.hidden)]

    def every_batch(self, ranks, own: list[list[torch.Tensor]], device) -> list[list[torch.Tensor]]:
        """Per-batch tensors of every batch on every rank, from `own`: this rank's, one list per batch of
        mine() (runtime/ranks.Ranks.gather_batches). Unsplit: `own` itself."""
        if self.owned is None:
            return own
        return ranks.gather_batches(dict(zip(self.owned, own, strict=True)), len(self.kwargs), device)

    def gather(self, ranks, layer: nn.Module | None = None, layer_idx: int | None = None) -> None:
        """Every batch's hidden states on every rank, from their owners, with the state a family carries into
        layer `layer_idx` from the layer before (arch.carried_input: only the owner computed it): what a pass
        over all batches (the non-expert Linears, lm_head) needs after `split`. `split` again to drop them."""
        if self.owned is None:
            return
        device = self.offload_to or next(h.device for h in self.hidden if h is not None)
        for b, (h,) in enumerate(self.every_batch(ranks, [[self.hidden[b]] for b in self.owned], device)):
            self.put(b, h)
        name = None if layer is None else carried_input(layer)
        for b in range(len(self.kwargs) if name else 0):
            kw = self.kwargs[b].get(layer_idx, {})
            if name in kw:
                kw[name] = ranks.broadcast(kw[name], src=ranks.batch_owner(b))
        self.owned = None

    def batch(self, b: int) -> torch.Tensor:
        """Batch b's hidden states [B, L, H] on the compute device."""
        h = self.hidden[b]
        return h if self.offload_to is None else h.to(self.offload_to, non_blocking=True)

    def put(self, b: int, h: torch.Tensor) -> None:
        self.hidden[b] = h if self.offload_to is None else pinned(h.to("cpu"))

    def offload(self, device: torch.device) -> None:
        """Move the hidden states to host memory; layers compute on `device`."""
        self.offload_to = device
        for b, h in enumerate(self.hidden):
            self.hidden[b] = pinned(h.to("cpu"))


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches, device) -> LayerInputs:
    """Run the embedding part of `model` on each batch of input ids and capture every layer's inputs."""
    originals = list(layers)
    carries = any(carried_input(layer) for layer in originals)
    out = LayerInputs()
    sink: dict = {}
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(originals[i], i, i == len(layers) - 1, sink, carries)
        for b, ids in enumerate(batches):
            ids = ids.to(device)
            _run(model, ids, sink)
            if b == 0 and "positional" in sink:
                _check_positional(model, ids, sink, originals)
                _run(model, ids, sink)
            out.hidden.append(sink["hidden"])
            out.kwargs.append(sink["kwargs"])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return out


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def next_inputs(layer: nn.Module, inputs: LayerInputs, layer_idx: int, before_batch=None, memo=None) -> None:
    """Replace inputs.hidden by this layer's outputs (in place, batch by batch); `before_batch(b)` runs first.
    State a family carries from layer to layer (arch.carried_input) goes into the next layer's kwargs. `memo`
    (calibration/memo.ForwardMemo): what the layer's attention returned on these inputs, replayed."""
    with torch.no_grad(), memo.replaying() if memo is not None else nullcontext():
        for b in inputs.mine():
            kwargs = inputs.kwargs[b]
            if before_batch is not None:
                before_batch(b)
            out = layer(inputs.batch(b), **kwargs[layer_idx])
            inputs.put(b, out[0] if isinstance(out, tuple) else out)
            nxt = kwargs.get(layer_idx + 1)
            if nxt is not None and isinstance(out, tuple) and (name := carried_input(layer)) and name in nxt:
                nxt[name] = out[1]
