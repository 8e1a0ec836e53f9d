"""What an experts module receives on the calibration batches, and a stand-in that returns precomputed outputs.

`collect_expert_inputs` runs a decoder layer on every calibration batch up to its experts module (a pre-hook
records the experts' inputs and routing, then stops the layer). Passes that compute the experts' outputs
themselves, chunk by chunk (the profile pass on a lazily loaded layer, the quantize pass), let the layer read
them through `PrecomputedExperts` while it computes the next layer's inputs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from moequant.arch import MoEBlockRef, experts_call_args
from moequant.calibration.capture import LayerInputs, run_layer
from moequant.calibration.memo import ForwardMemo


class _StopLayer(Exception):
    pass


@dataclass
class ExpertInputs:
    """What the experts module received, per calibration batch."""

    x: list[torch.Tensor]  # [T, H] in the experts' input dtype (converted to float32 slice by slice)
    idx: list[torch.Tensor]  # [T, k] int64
    w: list[torch.Tensor]  # [T, k] float32
    shapes: list[torch.Size] = field(default_factory=list)  # the experts' input shape per batch
    dtype: torch.dtype = torch.float32  # the experts' input dtype


@torch.no_grad()
def collect_expert_inputs(
    layer, ref: MoEBlockRef, inputs: LayerInputs, memo: ForwardMemo | None = None
) -> ExpertInputs:
    """What the experts receive on this rank's batches; `memo` records what the layer's attention returned, for
    the run of the whole layer that follows (calibration/memo.py)."""
    out = ExpertInputs([], [], [])

    def hook(module, args, kwargs):
        x, idx, w = experts_call_args(args, kwargs)
        out.shapes.append(x.shape)
        out.dtype = x.dtype
        out.x.append(x.reshape(-1, x.shape[-1]))  # as the experts got it (16-bit: half of a float32 copy)
        out.idx.append(idx.reshape(x.shape[0], -1).long())
        out.w.append(w.reshape(x.shape[0], -1).float())
        raise _StopLayer

    handle = ref.experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with memo.recording() if memo is not None else nullcontext():
            for b in inputs.mine():
                try:
                    run_layer(layer, inputs.batch(b), inputs.kwargs[b][ref.layer_idx])
                except _StopLayer:
                    pass
    finally:
        handle.remove()
    return out


def gathered_expert_inputs(feats: ExpertInputs, inputs: LayerInputs, ranks) -> ExpertInputs:
    """What the experts received on every calibration batch, on every rank: `feats` holds this rank's batches
    (inputs.mine(), after LayerInputs.split); the others' travel from their owners as tensors
    (LayerInputs.every_batch). Unsplit inputs: `feats` itself. `shapes` of the result are the
    [T, H] rows (the layer's own shapes matter only for this rank's outputs)."""
    if inputs.owned is None:
        return feats
    own = [list(t) for t in zip(feats.x, feats.idx, feats.w, strict=True)]
    device = feats.x[0].device if feats.x else (inputs.offload_to or torch.device("cpu"))
    every = inputs.every_batch(ranks, own, device)
    x, idx, w = (list(t) for t in zip(*every, strict=True)) if every else ([], [], [])
    return ExpertInputs(x, idx, w, [t.shape for t in x], feats.dtype)


class PrecomputedExperts(torch.nn.Module):
    """Stands in for an experts module while the layer computes the next layer's inputs: returns the
    precomputed output of each batch in turn (see expert_outputs)."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, hidden_states, *args, **kwargs):
        out = self.outputs.pop(0)
        if out.shape != hidden_states.shape:
            raise RuntimeError(
                f"precomputed experts output {tuple(out.shape)} for input {tuple(hidden_states.shape)}"
            )
        return out
