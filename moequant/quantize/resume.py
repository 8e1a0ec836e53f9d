"""Resuming an interrupted quantize run: what must match (a fingerprint of the inputs), what was done
(progress.json in the .partial folder, progress.py), and how the activations at the first unfinished layer
are rebuilt (replaying the finished layers from their shards: the same tensors, so the same activations, and
the resumed run writes the same bytes as an uninterrupted one).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from moequant.arch import block_ref, decoder_layers, set_experts
from moequant.calibration.capture import LayerInputs, next_inputs
from moequant.calibration.data import CalibData
from moequant.calibration.expert_io import collect_expert_inputs
from moequant.calibration.memo import ForwardMemo
from moequant.calibration.stream import first_inputs
from moequant.checkpoint.source import Source
from moequant.checkpoint.writer import CheckpointWriter
from moequant.config import QuantizeConfig, Spec
from moequant.errors import MoEQuantError
from moequant.modules.qlinear import QuantLinear
from moequant.plan.schema import Plan
from moequant.quantize.expert_outputs import expert_outputs
from moequant.quantize.experts import empty_experts
from moequant.quantize.layer_pass import use_precomputed
from moequant.quantize.linears import layer_linear_specs
from moequant.quantize.progress import Progress
from moequant.runtime.memory import release_free_memory
from moequant.runtime.ranks import current

logger = logging.getLogger(__name__)


def fingerprint(plan: Plan, data: CalibData, config: QuantizeConfig, save_dtype, model_config: dict) -> dict:
    """What must match for --resume to continue a run (hashes, so progress.json stays small)."""

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {
        "plan": digest({k: v for k, v in plan.to_json().items() if k != "estimate"}),
        "calibration": hashlib.sha256(data.input_ids.numpy().tobytes()).hexdigest()[:16],
        "config": digest({k: v for k, v in config.to_json().items() if k != "progress"}),
        "save_dtype": str(save_dtype),
        "model": digest(model_config),
    }


def resumed_progress(writer: CheckpointWriter, expected: dict) -> Progress:
    """The interrupted run's progress, after checking it was started with the same inputs."""
    progress = writer.read_progress()
    if progress.get("fingerprint") != expected:
        raise MoEQuantError(
            f"{writer.partial} was started with other inputs (model, plan, calibration or options); "
            "rerun with the same arguments, or remove the folder to start again"
        )
    logger.info("resuming after layers %s", progress["completed_layers"])
    return Progress.from_json(progress)


def replay_pass(
    source: Source,
    plan: Plan,
    used: dict[int, list[Spec]],
    calib: CalibData,
    config: QuantizeConfig,
    folder,
    upto: int,
    save_dtype: torch.dtype,
) -> LayerInputs:
    """Rebuild the inputs of layer `upto` after an interruption: run layers [0, upto) with their quantized
    modules loaded from the shards in `folder` (the same tensors, so the same activations, as the first run)."""
    arch = source.arch
    model = source.model
    layers = decoder_layers(model, arch)
    inputs = first_inputs(source, calib, config.batch_size, config.offload_activations)
    inputs.split(current())  # this rank's batches, as the pass it feeds
    for i in tqdm(range(upto), desc="replay", disable=not config.progress, unit="layer"):
        source.load_layer(i)
        layer = layers[i]
        prefix = f"{arch.layers}.{i}."
        shard = {
            k.removeprefix(prefix): v
            for k, v in load_file(
                Path(folder) / f"model-layer-{i:05d}.safetensors", device=str(source.device)
            ).items()
        }
        quantized: dict[str, torch.nn.Module] = {}
        for name, spec in layer_linear_specs(plan, arch, i, layer).items():
            parent, _, attr = name.rpartition(".")
            q = QuantLinear.empty(spec, layer.get_submodule(name), save_dtype, config.stores_g_idx)
            setattr(layer.get_submodule(parent) if parent else layer, attr, q)
            quantized[name] = q
        ref = block_ref(arch, i, layer)
        if ref is not None:
            w, act_params = arch.expert_weights(ref.experts), arch.activation_params(ref.experts)
            qe = empty_experts(arch, w, used[i], config, save_dtype, act_params)
            qe.carry(arch.carried_modules(ref.experts))  # loaded from the shard below, with the experts
            quantized[arch.experts_path] = qe
        for name, mod in quantized.items():
            sub = {k.removeprefix(name + "."): v for k, v in shard.items() if k.startswith(name + ".")}
            mod.load_state_dict(sub, strict=True, assign=True)
        memo = ForwardMemo.for_layer(layer, arch, inputs)
        if ref is not None:  # the same arithmetic as the interrupted run's
            use_precomputed(source, ref, expert_outputs(qe, collect_expert_inputs(layer, ref, inputs, memo)))
        next_inputs(layer, inputs, i, memo=memo)
        if ref is not None:
            set_experts(arch, ref, qe)
        source.release_layer(i)
        release_free_memory()
    return inputs
