"""The sequential, layer-streaming passes: profile (+ damage table) and quantize.

Both passes share one driver: capture what layer 0 and every layer's kwargs receive, then for each decoder
layer in order: load it (from memory or from safetensors), let the pass do its work on the calibration
activations, run the layer to produce the next layer's inputs, and release it. Peak memory is one layer plus
the calibration activations, whatever the checkpoint's size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from moequant.arch import decoder_layers, is_moe_block
from moequant.calibration.capture import LayerInputs, capture_inputs
from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile, _LayerRecorder
from moequant.calibration.stats import LayerStats
from moequant.config import QuantizeConfig
from moequant.plan.schema import Plan
from moequant.quantize.experts import (
    PrecomputedExperts,
    collect_expert_inputs,
    expert_outputs,
    next_inputs,
    quantize_block,
)
from moequant.quantize.memory import release_free_memory

logger = logging.getLogger(__name__)


def _block_ref(source, i: int, layer):
    from moequant.arch.registry import MoEBlockRef

    arch = source.arch
    block = getattr(layer, arch.block, None)
    if not is_moe_block(block, arch):
        return None
    return MoEBlockRef(i, layer, block, getattr(block, arch.router), getattr(block, arch.experts))


@dataclass
class LayerHooks:
    """What a pass wants around the driver's forward of one layer."""

    before_batch: Callable[[int], None] | None = None  # called with the batch index before each batch
    after: Callable[[], None] | None = None  # called once the layer's outputs are computed


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
    model = source.model
    layers = decoder_layers(model, source.arch)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    if inputs is None:
        batches = [ids for ids, _ in calib.batches(batch_size)]
        inputs = capture_inputs(model, layers, batches, device)
    for i in tqdm(range(start_layer, len(layers)), desc=desc, disable=not progress, unit="layer"):
        source.load_layer(i)
        hooks = on_layer(i, layers[i], inputs) or LayerHooks()
        next_inputs(layers[i], inputs, i, hooks.before_batch)
        if hooks.after is not None:
            hooks.after()
        source.release_layer(i)
        release_free_memory()
    return inputs


def _use_precomputed(source, ref, outputs: list[torch.Tensor]) -> None:
    """Free the original experts (quantized by now) and let the block read the quantized experts' outputs."""
    ref.experts.to("meta")
    setattr(ref.block, source.arch.experts, PrecomputedExperts(outputs))


# ---- profile pass -----------------------------------------------------------------------------------


@dataclass
class ProfilePassResult:
    profile: Profile
    damage_keys: list[tuple[int, int]] = field(default_factory=list)
    damage: np.ndarray | None = None  # [n_experts, n_widths] for the plan config's widths
    non_expert_bytes: int = 0


def profile_pass(
    source,
    calib: CalibData,
    batch_size: int = 8,
    min_tokens: int = 32,
    plan_config=None,
    progress: bool = True,
    model_id: str = "",
) -> ProfilePassResult:
    """Routing profile of the original model, layer by layer; with `plan_config`, the damage table too."""
    from moequant.plan.allocate import damage_table

    arch = source.arch
    result = ProfilePassResult(Profile(model_id, calib.description, calib.tokens, {}, min_tokens))
    tables = []

    def on_layer(i, layer, inputs: LayerInputs):
        ref = _block_ref(source, i, layer)
        if ref is None:
            return None
        w = arch.expert_weights(ref.experts)
        stats = LayerStats(ref.num_experts, ref.top_k, w.hidden, w.intermediate)
        result.profile.layers[i] = stats
        labels: list[str] = []
        handle = ref.experts.register_forward_pre_hook(
            _LayerRecorder(arch, ref, stats, labels), with_kwargs=True
        )

        def before_batch(b: int):
            n = inputs.hidden[b].shape[0]
            labels[:] = calib.labels[b * batch_size : b * batch_size + n]

        def after():
            handle.remove()
            if plan_config is not None:
                tables.append(damage_table([(i, w)], result.profile, plan_config))

        return LayerHooks(before_batch, after)

    sequential_pass(source, calib, batch_size, on_layer, "profile", progress)
    if tables:
        result.damage_keys = [k for keys, _ in tables for k in keys]
        result.damage = np.concatenate([d for _, d in tables])
    result.non_expert_bytes = non_expert_nbytes(source)
    return result


def non_expert_nbytes(source, dtype_bytes: int = 2) -> int:
    """Bytes of everything but the routed experts, stored at 16 bits (embeddings, attention, norms, ...)."""
    total = 0
    experts_tag = f".{source.arch.block}.{source.arch.experts}."
    tied = set(getattr(source.model, "all_tied_weights_keys", {}) or {})
    for name, t in source.model.state_dict().items():
        if experts_tag in name or name in tied:
            continue
        total += t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())
    return total


# ---- quantize pass ----------------------------------------------------------------------------------


@dataclass
class QuantizeResult:
    report: list[dict]
    seconds: float
    inputs: LayerInputs | None = None  # hidden states after the last layer
    non_expert_report: list[dict] = field(default_factory=list)
    used: dict[int, list] = field(default_factory=dict)  # layer -> QuantSpecs actually stored (fallbacks)


def checkpoint_tensors(module: torch.nn.Module, prefix: str, save_dtype: torch.dtype, skip=()) -> dict:
    """State dict of `module` under checkpoint names: 16-bit tensors in `save_dtype`, quantized storage (inside
    QuantizedExperts / QuantLinear modules) in its own dtypes; names in `skip` left out."""
    from moequant.modules.qexperts import QuantizedExperts
    from moequant.modules.qlinear import QuantLinear

    quantized = [n + "." for n, m in module.named_modules() if isinstance(m, QuantizedExperts | QuantLinear)]
    out = {}
    for k, v in module.state_dict().items():
        if k in skip:
            continue
        if v.is_floating_point() and not any(k.startswith(q) for q in quantized):
            v = v.to(save_dtype)
        out[prefix + k] = v
    return out


def non_expert_modules(source) -> list[str]:
    """Full names of the Linears `--non-expert` quantizes: in every decoder layer, all but experts, routers
    and gates; plus lm_head when it is not tied to the embeddings."""
    from moequant.quantize.linears import target_linears

    arch = source.arch
    names = []
    for i, layer in enumerate(decoder_layers(source.model, arch)):
        names += [f"{arch.layers}.{i}.{n}" for n in target_linears(layer, arch)]
    tied = set(getattr(source.model, "all_tied_weights_keys", {}) or {})
    if f"{arch.lm_head}.weight" not in tied:
        names.append(arch.lm_head)
    return names


def quantize_pass(
    source,
    plan: Plan,
    calib: CalibData,
    config: QuantizeConfig,
    save_dtype: torch.dtype,
    on_layer_done: Callable[[int, dict[str, torch.Tensor], list[dict], list | None], None] | None = None,
    start_layer: int = 0,
    inputs: LayerInputs | None = None,
) -> QuantizeResult:
    """Quantize every MoE layer at its planned specs, streaming; `on_layer_done(i, tensors, report_rows, specs)`
    gets each finished layer's tensors (checkpoint names, storage dtypes) and the specs actually stored."""
    from moequant.quantize.linears import quantize_layer_linears

    arch = source.arch
    report: list[dict] = []
    ne_report: list[dict] = []
    used: dict[int, list] = {}
    t0 = time.perf_counter()
    prefix = arch.layers

    def on_layer(i, layer, inputs: LayerInputs):
        if plan.non_expert is not None:  # first, so the experts' Hessians see the quantized attention
            ne_report.extend(
                quantize_layer_linears(layer, arch, i, inputs, plan.non_expert, config, save_dtype)
            )
        ref = _block_ref(source, i, layer)
        qe, rows = None, []
        if ref is not None:
            if i not in plan.layers:
                raise ValueError(f"plan has no entry for MoE layer {i}")
            read = (lambda part: source.read_experts(i, part)) if source.lazy_experts else None
            qe, rows, outputs = quantize_block(
                arch, layer, ref, inputs, plan.layers[i], config, save_dtype, read_experts=read
            )
            _use_precomputed(source, ref, outputs)  # the driver's forward (next inputs) reads them

        def finish():
            specs = None
            if qe is not None:
                setattr(ref.block, arch.experts, qe)
                used[i] = specs = list(qe.specs)
                report.extend(rows)
            tensors = checkpoint_tensors(layer, f"{prefix}.{i}.", save_dtype)
            if on_layer_done is not None:
                on_layer_done(i, tensors, rows, specs)

        return LayerHooks(after=finish)

    inputs = sequential_pass(
        source,
        calib,
        config.batch_size,
        on_layer,
        "quantize",
        config.progress,
        start_layer=start_layer,
        inputs=inputs,
    )
    if plan.non_expert is not None and arch.lm_head in non_expert_modules(source):
        from moequant.quantize.linears import quantize_linears

        norm = source.model.get_submodule(arch.final_norm)

        def feed():
            lm_head = source.model.get_submodule(arch.lm_head)
            for hidden in inputs.hidden:
                lm_head(norm(hidden))

        ne_report.extend(
            quantize_linears(source.model, [arch.lm_head], plan.non_expert, feed, config, save_dtype)
        )
    return QuantizeResult(report, time.perf_counter() - t0, inputs, ne_report, used)


def replay_pass(
    source,
    plan: Plan,
    used: dict[int, list],
    calib: CalibData,
    config: QuantizeConfig,
    folder,
    upto: int,
    save_dtype: torch.dtype,
) -> LayerInputs:
    """Rebuild the inputs of layer `upto` after an interruption: run layers [0, upto) with their quantized
    modules loaded from the shards in `folder` (the same tensors, so the same activations, as the first run)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from moequant.modules.qexperts import QuantizedExperts
    from moequant.modules.qlinear import QuantLinear
    from moequant.quantize.linears import target_linears

    arch = source.arch
    model = source.model
    layers = decoder_layers(model, arch)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    inputs = capture_inputs(model, layers, [ids for ids, _ in calib.batches(config.batch_size)], device)
    for i in tqdm(range(upto), desc="replay", disable=not config.progress, unit="layer"):
        source.load_layer(i)
        layer = layers[i]
        prefix = f"{arch.layers}.{i}."
        shard = {
            k.removeprefix(prefix): v
            for k, v in load_file(Path(folder) / f"model-layer-{i:05d}.safetensors").items()
        }
        quantized: dict[str, torch.nn.Module] = {}
        if plan.non_expert is not None:
            for name in target_linears(layer, arch):
                parent, _, attr = name.rpartition(".")
                q = QuantLinear.empty(
                    plan.non_expert, layer.get_submodule(name), save_dtype, config.stores_g_idx
                )
                setattr(layer.get_submodule(parent) if parent else layer, attr, q)
                quantized[name] = q
        ref = _block_ref(source, i, layer)
        if ref is not None:
            w = arch.expert_weights(ref.experts)
            qe = QuantizedExperts(
                used[i],
                w.hidden,
                w.intermediate,
                arch.activation,
                arch.activation_params(ref.experts),
                has_bias=arch.has_bias,
                act_order=config.stores_g_idx,
                dtype=save_dtype,
                device="meta",
            )
            quantized[f"{arch.block}.{arch.experts}"] = qe
        for name, mod in quantized.items():
            sub = {k.removeprefix(name + "."): v for k, v in shard.items() if k.startswith(name + ".")}
            mod.load_state_dict(sub, strict=True, assign=True)
        if ref is not None:  # the same arithmetic as the interrupted run's
            _use_precomputed(source, ref, expert_outputs(qe, collect_expert_inputs(layer, ref, inputs)))
        next_inputs(layer, inputs, i)
        if ref is not None:
            setattr(ref.block, arch.experts, qe)
        source.release_layer(i)
        release_free_memory()
    return inputs
