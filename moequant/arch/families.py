"""The MoE families of the installed transformers, and how moequant handles each.

A family here is a model type with an AutoModelForCausalLM whose modeling code defines a fused experts class
(`@use_experts_implementation`): found by reading the installed modeling sources, not from a list of ours.
Multimodal families count through their text model (`<type>_text`), which is what a CausalLM loads. A family
whose experts do not follow the interface counts when a file of ours makes them (lookup.register: Llama 4).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from moequant.arch.lookup import _OVERRIDES, get_arch
from moequant.errors import MoEQuantError

_MARK = "@use_experts_implementation"


@functools.lru_cache(maxsize=1)
def moe_model_types() -> list[str]:
    """Model types (as AutoModelForCausalLM knows them) whose modeling module has a fused experts class, and those
    a family file of ours registers."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        module = model_type_to_module_name(model_type)
        if (
            model_type.endswith("_text")
            and model_type.removesuffix("_text") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        ):
            continue  # counted under the family's own name
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
        if spec is None or spec.origin is None:
            continue
        with open(spec.origin, encoding="utf-8") as fh:
            if _MARK in fh.read():
                out.append(model_type)
    hand = [t for t in _OVERRIDES if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]  # experts outside the interface
    return sorted(set(out) | set(hand))


def supported_model_types() -> list[str]:
    """The MoE families of the installed transformers (describe() tells how moequant handles each)."""
    return moe_model_types()


@dataclass(frozen=True)
class FamilyInfo:
    model_type: str
    status: str  # "derived" | "hand-written" | "unsupported" | "error"
    experts_class: str = ""
    layout: str = ""
    activation: str = ""
    routing: str = ""
    paths: str = ""  # layers / block / experts / router
    reason: str = ""


def describe(model_type: str) -> FamilyInfo:
    """How moequant handles `model_type` in this install: the adapter derived from a tiny twin, or why not."""

    try:
        arch = get_arch(model_type)
    except MoEQuantError as err:
        return FamilyInfo(model_type, "unsupported", reason=str(err))
    except Exception as err:  # noqa: BLE001 - a family's own code failing on the tiny config is reported, not raised
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return FamilyInfo(model_type, "error", reason=f"its code fails on the shrunk tiny config ({msg})")
    return FamilyInfo(
        model_type,
        "hand-written" if model_type in _OVERRIDES else "derived",
        experts_class=arch.experts_class,
        layout=arch.layout.value,
        activation=arch.activation.value,
        routing=arch.router_facts.describe() if arch.router_facts else "",
        paths=f"{arch.layers}.N.{arch.experts_path} (router {arch.router_path})",
    )
