"""One MoE layer's experts inside vLLM: a QuantizedExperts at the checkpoint's widths, filled tensor by tensor.

vLLM hands each per-expert checkpoint tensor to a weight loader with the expert id it read from the key
(names.py). `ExpertStore.load` puts it into that expert's storage only if the storage has a tensor of that name,
shape and dtype (an expert's width fixes its shapes: a 2-bit expert's qweight has half the rows of a 4-bit one),
once; `missing` names what never arrived. Pure torch: nothing here imports vLLM.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moequant.config import proj_specs, spec_label
from moequant.errors import CheckpointError
from moequant.modules.qexperts import QuantizedExperts
from moequant.vllm.names import PROJECTIONS

logger = logging.getLogger(__name__)


class ExpertStore(nn.Module):
    def __init__(self, layer: int, experts: QuantizedExperts):
        super().__init__()
        if experts.gate_up_bias is not None:
            raise CheckpointError("experts with biases are not served by the moequant vLLM plugin")
        self.layer = layer
        self.experts = experts
        self._targets = dict(experts.named_buffers())  # "3.gate_up.qweight" -> the storage tensor
        self._loaded: set[str] = set()

    def tensor_names(self, proj: str) -> list[str]:
        """Every tensor name some expert stores for projection `proj` (qweight, scales, qzeros, dense, ...)."""
        if proj not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {proj!r}")
        names = {key.split(".", 2)[2] for key in self._targets if key.split(".")[1] == proj}
        return sorted(names)

    def load(self, expert: int, proj: str, tensor: str, value: torch.Tensor) -> None:
        """Copy checkpoint tensor `value` into expert `expert`'s `proj`.`tensor`, refusing any mismatch."""
        key = f"{expert}.{proj}.{tensor}"
        where = f"MoE layer {self.layer} expert {expert} ({proj})"
        if not 0 <= expert < self.experts.num_experts:
            raise CheckpointError(f"{where}: the layer has {self.experts.num_experts} experts")
        target = self._targets.get(key)
        label = spec_label(proj_specs(self.experts.specs[expert])[PROJECTIONS.index(proj)])
        if target is None:
            raise CheckpointError(f"{where}: stored as {label}, which has no tensor {tensor!r}")
        if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
            raise CheckpointError(
                f"{where}: checkpoint {tensor} is {value.dtype}{list(value.shape)}, the bit map's {label} "
                f"expects {target.dtype}{list(target.shape)}"
            )
        if key in self._loaded:
            raise CheckpointError(f"{where}: {tensor} arrived twice")
        with torch.no_grad():
            target.copy_(value.to(target.device))
        self._loaded.add(key)

    def missing(self) -> list[str]:
        """The storage tensors no checkpoint tensor has filled, as "<expert>.<proj>.<tensor>"."""
        return sorted(set(self._targets) - self._loaded)

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(
                f"MoE layer {self.layer}: the checkpoint filled no {', '.join(missing[:5])}{more}"
            )
        logger.debug("MoE layer %d: %d expert tensors loaded", self.layer, len(self._loaded))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], the router's topk_ids [T, k] and topk_weights [T, k] -> [T, H] in x's dtype."""
        return self.experts(x, topk_ids, topk_weights)


def stores_of(model: nn.Module) -> dict[int, ExpertStore]:
    """MoE layer -> its ExpertStore, for every one inside `model` (a vLLM model with the plugin's layers)."""
    return {m.layer: m for m in model.modules() if isinstance(m, ExpertStore)}
