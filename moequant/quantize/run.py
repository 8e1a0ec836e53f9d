"""One quantize run, from a model and a plan to a finished checkpoint folder.

    check the plan against the model -> open <out>.partial/ (or resume it) -> the quantize pass, one shard per
    layer (layer_pass.py) -> base shard, tokenizer, plan as stored, quant_report.json, extra documents (the
    model card) -> finalize: config.json complete, folder renamed to <out>

Nothing half-written looks finished: until the rename, config.json says `status: incomplete` with a resume hint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moequant.calibration.data import CalibData
from moequant.calibration.profiler import Profile
from moequant.calibration.report import save_profile
from moequant.checkpoint.source import (
    InMemorySource,
    Source,
    expert_dims,
    layer_experts,
    non_expert_modules,
    open_source,
    storage_dtype,
)
from moequant.checkpoint.writer import CheckpointWriter, partial_dir
from moequant.config import QuantizeConfig
from moequant.errors import PlanError
from moequant.plan.schema import Plan
from moequant.quantize.drift import unquantized_inputs
from moequant.quantize.layer_pass import LayerDone, needs_unquantized_stream, quantize_pass
from moequant.quantize.output import ConfigHeader, write_rest
from moequant.quantize.progress import Progress
from moequant.quantize.resume import fingerprint, replay_pass, resumed_progress
from moequant.quantize.summary import QuantizeSummary
from moequant.runtime.memory import return_large_frees_at_once
from moequant.runtime.ranks import current
from moequant.runtime.timing import timed

logger = logging.getLogger(__name__)


def quantize(
    model,
    plan: Plan,
    data: CalibData,
    out: str | Path,
    config: QuantizeConfig = QuantizeConfig(),
    tokenizer=None,
    profile_result: Profile | None = None,
    overwrite: bool = False,
    save_dtype: torch.dtype | None = None,
    resume: bool = False,
    documents: Sequence[Callable[[Path], object]] = (),
    trust_remote_code: bool = False,
) -> QuantizeSummary:
    """Quantize `model` (object: quantized in place; path: streamed) per `plan` into the folder `out`.

    Everything is written to `out.partial/` and renamed at the end. With `resume`, a run interrupted after some
    layers continues from the first unfinished one (the finished layers are replayed from their shards to
    rebuild the activations) and produces the same bytes as an uninterrupted run; with no `out.partial/` to
    continue it starts a fresh run (with a warning). `trust_remote_code`: a model folder whose config names
    its own code (`auto_map`) may run it. `documents`: functions
    called with the folder once everything else is written, before it is finalized (the model card).
    """
    t0 = time.perf_counter()
    return_large_frees_at_once()  # freed layer temporaries leave the resident set (moequant/runtime/memory.py)
    ranks = current()  # under torchrun: every rank runs this; rank 0 alone writes files
    # experts read chunk by chunk, never a whole layer of them; layers compute on config.device
    source = open_source(model, trust_remote_code=trust_remote_code, lazy_experts=True, device=config.device)
    check_plan(source, plan, config)
    save_dtype = save_dtype or storage_dtype(source)
    header = ConfigHeader(source, plan, save_dtype)
    expected = fingerprint(plan, data, config, save_dtype, header.model_config)
    with ranks.guard("opening the output folder"):
        writer, progress = _open_output(out, overwrite, resume, expected, header, plan, profile_result)
    progress = ranks.broadcast(progress)  # what rank 0 resumes from, every rank resumes from
    _quantize_layers(source, plan, data, config, save_dtype, writer, progress, out)
    # what is stored: experts that fell back to RTN are recorded as such (the bit map must match the tensors)
    stored = dataclasses.replace(plan, layers={**plan.layers, **progress.used}, estimate=dict(plan.estimate))
    summary = None
    with ranks.guard("writing the checkpoint"), timed("write"):
        if writer is not None:
            summary = write_rest(
                writer, source, model, plan, stored, data, config, save_dtype, tokenizer, progress
            )
            # the documents (the model card, its bit map) read the stored specs (RTN fallbacks), not the plan's
            writer.write_json("config.json", header.config_json(stored, "incomplete", writer.partial))
            for document in documents:
                writer.copy_in(document)
            writer.finalize(header.config_json(stored, "complete", writer.partial))
            summary.seconds = time.perf_counter() - t0
    summary = ranks.broadcast(summary)
    if isinstance(source, InMemorySource):
        source.model.config.quantization_config = header.quantization_config(stored)
    return summary


def _open_output(out, overwrite, resume, expected: dict, header: ConfigHeader, plan: Plan, profile_result):
    """Rank 0: the writer of <out>.partial/ and the progress to continue from (a fresh folder: its
    incomplete config.json, the plan, the profile); other ranks: (None, None)."""
    if not current().writes:
        return None, None
    writer = CheckpointWriter(out, overwrite=overwrite, resume=resume)
    if writer.resuming:  # `resume` with no <out>.partial/ to continue starts afresh (check_target)
        return writer, resumed_progress(writer, expected)
    progress = Progress(expected)
    writer.write_json("config.json", header.config_json(plan, "incomplete", writer.partial))
    writer.write_json("plan.json", plan.to_json())
    if profile_result is not None:
        writer.copy_in(lambda d: save_profile(profile_result, d))
    writer.write_progress(progress.to_json())
    return writer, progress


def _quantize_layers(source, plan, data, config, save_dtype, writer, progress: Progress, out) -> None:
    """The quantize pass from the first unfinished layer (the finished ones replayed to rebuild its inputs),
    each finished layer recorded as it comes; lm_head's rows join the report (its tensors go with the base)."""
    ranks, start, inputs, unquantized = current(), progress.next_layer, None, None
    if start and needs_unquantized_stream(plan, config):  # before the replay swaps quantized layers in
        with timed("unquantized stream"):
            unquantized = unquantized_inputs(source, source.arch, data, config, start)
    if start:
        with timed("replay"):
            inputs = replay_pass(
                source, plan, progress.used, data, config, partial_dir(out), start, save_dtype
            )
    with timed("quantize"):
        for done in quantize_pass(
            source, plan, data, config, save_dtype, start_layer=start, inputs=inputs, unquantized=unquantized
        ):
            if done.layer is None:
                progress.linear_rows.extend(done.linear_rows)
                continue
            with ranks.guard(f"writing layer {done.layer}"):  # a write failing on rank 0 stops every rank
                _record_layer(writer, progress, done)


def _record_layer(writer: CheckpointWriter | None, progress: Progress, done: LayerDone) -> None:
    """A finished layer: its shard (rank 0), and progress.json saying it is done (what --resume reads)."""
    if writer is not None:
        writer.write_shard(f"model-layer-{done.layer:05d}.safetensors", done.tensors)
    progress.record(done.layer, done.rows, done.linear_rows, done.specs)
    if writer is not None:
        writer.write_progress(progress.to_json())


def check_plan(source: Source, plan: Plan, config: QuantizeConfig) -> None:
    """The plan must fit the model (layers, expert counts, shapes) and the config's g_idx choice."""
    hidden, inter = expert_dims(source)
    plan.validate(source.arch.model_type, layer_experts(source), hidden, inter)
    if plan.linears:
        names = set(non_expert_modules(source))
        for n, lin in plan.linears.items():
            mod = source.model.get_submodule(n) if n in names else None
            if mod is None or (mod.out_features, mod.in_features) != (lin.out_features, lin.in_features):
                got = "is not a non-expert Linear of the model" if mod is None else (
                    f"is [{mod.out_features}, {mod.in_features}] in the model")  # fmt: skip
                raise PlanError(f"the plan's Linear {n} [{lin.out_features}, {lin.in_features}] {got}")
    if plan.act_order != config.stores_g_idx:
        raise PlanError(
            f"the plan {'stores' if plan.act_order else 'does not store'} g_idx but the quantize config "
            f"{'does' if config.stores_g_idx else 'does not'} (act_order={config.gptq.act_order}, "
            f"static_groups={config.gptq.static_groups})"
        )
