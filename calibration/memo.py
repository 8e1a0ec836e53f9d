"""Replay what a decoder layer's attention returned, when a pass runs the layer twice on the same inputs.

The profile and quantize passes run each layer twice on every calibration batch: first up to its experts
(expert_io.collect_expert_inputs records what they receive), then whole, with the experts' outputs
precomputed, to produce the next layer's inputs (capture.next_inputs). Everything before the experts sees
the same inputs both times, so the second run need not compute the attention again: a `ForwardMemo` keeps
what the layer's memoizable children (arch.memoizable_children: attention, mixers, dense MLPs beside the MoE
block) returned on the first run and gives it back, call by call, on the second. The outputs are the same
tensors' values, so the next layer's inputs are the same bits; the cost is one attention output per
calibration batch held between the two runs, where the batches' hidden states are held.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from moequant.arch import MoEArch, memoizable_children
from moequant.calibration.capture import LayerInputs
from moequant.runtime.devices import pinned


class ForwardMemo:
    """What `modules` (name -> child of one decoder layer) returned while `recording`, call by call, given
    back in the same order while `replaying` (a call past the recorded ones runs the module). `host`: keep the
    outputs in host memory (the pass offloads its hidden states) and move each back where it was computed."""

    def __init__(self, modules: dict[str, nn.Module], host: bool = False):
        self.modules = modules
        self.host = host
        self.calls: dict[str, deque[tuple[torch.Size, Any]]] = {name: deque() for name in modules}

    @classmethod
    def for_layer(cls, layer: nn.Module, arch: MoEArch, inputs: LayerInputs) -> ForwardMemo:
        """The memo of `layer`'s memoizable children, in host memory when `inputs` are offloaded there."""
        return cls(memoizable_children(layer, arch), host=inputs.offload_to is not None)

    @contextmanager
    def recording(self):
        """Keep each output of the modules (copied: the layer may write into what a module returned)."""
        handles = [
            module.register_forward_hook(self._recorder(name), with_kwargs=True)
            for name, module in self.modules.items()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self):
        """The modules return their recorded outputs, in order, instead of computing them; what is replayed
        is dropped. A call with another input shape than the one recorded is an error (not the same run)."""
        saved = {name: module.__dict__.get("forward") for name, module in self.modules.items()}
        for name, module in self.modules.items():
            module.forward = self._replayer(name, module.forward)
        try:
            yield self
        finally:
            for name, module in self.modules.items():
                if saved[name] is None:
                    del module.forward
                else:
                    module.forward = saved[name]
            for calls in self.calls.values():
                calls.clear()

    def _recorder(self, name: str):
        def hook(module, args, kwargs, output):
            self.calls[name].append((_input_shape(args, kwargs), _tensors(output, self._copy)))

        return hook

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """What is kept of one output tensor: a copy (in host memory when `host`, a copy even where .to("cpu")
        would hand back the tensor itself, on a CPU run)."""
        return pinned(t.detach().to("cpu", copy=True)) if self.host else t.detach().clone()

    def _replayer(self, name: str, compute):
        calls = self.calls[name]

        def forward(*args, **kwargs):
            if not calls:
                return compute(*args, **kwargs)
            shape, output = calls.popleft()
            got = _input_shape(args, kwargs)
            if got != shape:
                raise RuntimeError(f"{name} replayed for an input of shape {got}, recorded for {shape}")
            device = _input_device(args, kwargs)
            return output if not self.host else _tensors(output, lambda t: t.to(device, non_blocking=True))

        return forward


def _tensors(tree, fn):
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, tree)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """The module's input hidden states: its first positional tensor, else `hidden_states`, else the first
    tensor among its keywords."""
    if isinstance(kwargs.get("hidden_states"), torch.Tensor) and not any(
        isinstance(a, torch.Tensor) for a in args
    ):
        return kwargs["hidden_states"]
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def _input_shape(args, kwargs) -> torch.Size | None:
    t = _first_tensor(args, kwargs)
    return None if t is None else t.shape


def _input_device(args, kwargs) -> torch.device:
    t = _first_tensor(args, kwargs)
    return torch.device("cpu") if t is None else t.device
