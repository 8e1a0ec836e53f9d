"""compressed-tensors MoE checkpoints with per-expert tensors, loaded right by from_pretrained after `import moequant`.

A compressed-tensors MoE checkpoint (moequant's export, llm-compressor's) stores each expert's projections
as their own packed modules (`...experts.3.w1.weight_packed`). transformers 5 fuses experts into 3-D
parameters, so its compressed-tensors loader finds no Linear for those config groups ("Could not match ...")
and leaves the fused experts as initialised: a model that runs and is wrong (the bundled model's `--target vllm
--bits 5.5` export: perplexity 3505 where the same plan in moequant's format gives 61.75;
evals/results/bench_ct_transformers.md).

`import moequant` puts MoECompressedTensorsQuantizer in transformers' place for "compressed-tensors". For a
checkpoint none of whose config groups target fused experts it is transformers' own quantizer, unchanged.
Where groups do target the per-expert modules of fused experts:

- symmetric int4 / int8 pack-quantized group schemes (what moequant's export writes and vLLM serves): each such
  MoE layer's experts become a moequant QuantizedExperts holding the checkpoint's codes and scales (packed
  along K as moequant packs them: the codes are the checkpoint's, transposed), read from the files before the
  rest loads; the model runs on moequant's kernels, at the checkpoint's size;
- anything else targeting those experts (another width, zero points, activation quantization, g_idx, floats):
  refused with a CheckpointError that says what reads it (vLLM), instead of a silent wrong model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

from moequant.errors import CheckpointError, MoEQuantError

logger = logging.getLogger(__name__)
_WARNED_SCALES: set[torch.dtype] = set()  # scale dtypes already warned about

PROJECTIONS = ("gate", "up", "down")


def _projections(keys: dict[str, str]) -> tuple[str, ...]:
    """The per-expert projections the family's key templates name, in PROJECTIONS order (no "gate" where the
    experts have none)."""
    return tuple(p for p in PROJECTIONS if p in keys)


PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
ELSEWHERE = (
    "serve it with vLLM (`vllm serve DIR`, `vllm.LLM(DIR)`), which reads compressed-tensors MoE layers, or load "
    "moequant's own format of the same plan (`moequant quantize --target vllm` keeps it at OUT.moequant)"
)


@dataclass(frozen=True)
class ExpertScheme:
    """One MoE layer's compressed-tensors scheme, as moequant stores it."""

    bits: int
    group_size: int


def _format_of(scheme, qconfig) -> str | None:
    fmt = scheme.format or qconfig.format
    return getattr(fmt, "value", fmt)


def _supported(scheme, qconfig, where: str) -> ExpertScheme:
    """The scheme a fused experts layer can take into QuantizedExperts, or a CheckpointError saying why not."""
    w = scheme.weights
    why = None
    if w is None:
        why = "no weight quantization"
    elif scheme.input_activations is not None or scheme.output_activations is not None:
        why = "activation quantization"
    elif getattr(w.type, "value", w.type) != "int" or w.num_bits not in (4, 8):
        why = f"{getattr(w.type, 'value', w.type)}{w.num_bits} weights (moequant converts int4 / int8)"
    elif not w.symmetric:
        why = "asymmetric weights (zero points)"
    elif getattr(w.strategy, "value", w.strategy) != "group" or not w.group_size:
        why = f"the {getattr(w.strategy, 'value', w.strategy)} strategy (moequant converts group scales)"
    elif w.actorder is not None and getattr(w.actorder, "value", w.actorder) == "group":
        why = "activation-ordered groups (g_idx)"
    elif _format_of(scheme, qconfig) != "pack-quantized":
        why = f"the {_format_of(scheme, qconfig)} format (moequant converts pack-quantized)"
    if why is not None:
        raise CheckpointError(
            f"this compressed-tensors checkpoint stores {where} per expert with {why}; transformers 5 fuses the "
            f"experts and its compressed-tensors loader cannot put such weights into them (it would leave them "
            f"wrong), and moequant cannot either: {ELSEWHERE}"
        )
    return ExpertScheme(w.num_bits, w.group_size)


def expert_schemes(model, qconfig) -> dict[int, ExpertScheme]:
    """MoE layer -> the scheme its experts' per-expert modules are stored with, for the layers whose fused
    experts some config group targets (by the checkpoint's per-expert names, or by class "Linear" as the
    experts were Linear modules when written); {} when no group reaches fused experts."""
    from compressed_tensors.utils.match import is_match

    from moequant.arch import get_arch, moe_blocks
    from moequant.checkpoint.conversion import expert_key_templates
    from moequant.errors import NoMoEError, UnsupportedModelError

    try:
        arch = get_arch(model)
        blocks = moe_blocks(model, arch)
        keys = expert_key_templates(model.config.model_type)
    except NoMoEError:
        return {}
    except (
        UnsupportedModelError
    ) as err:  # transformers' own loader runs: fused experts it cannot match stay wrong
        logger.warning("compressed-tensors: moequant cannot load this model's experts (%s); transformers' own "
                       "loader runs, and leaves per-expert groups under fused experts unloaded", err)  # fmt: skip
        return {}
    if keys is None:  # experts stored fused: nothing per expert for a group to target
        return {}
    linear = torch.nn.Linear(1, 1, device="meta")
    groups = list(qconfig.config_groups.values())
    out = {}
    for ref in blocks:
        i = ref.layer_idx
        found = {}
        for e in range(ref.num_experts):
            for proj in _projections(keys):
                name = keys[proj].format(i=i, e=e).removesuffix(".weight")
                hit = [g for g in groups if is_match(name, linear, g.targets, qconfig.ignore or ())]
                found[name] = hit[0] if hit else None
        hits = [g for g in found.values() if g is not None]
        if not hits:
            continue
        where = f"layer {i}'s experts"
        if len(hits) != len(found) or any(g is not hits[0] for g in hits):
            missing = next(n for n, g in found.items() if g is None or g is not hits[0])
            raise CheckpointError(
                f"this compressed-tensors checkpoint quantizes {where} with more than one scheme ({missing} differs); "
                f"a fused experts module holds one: {ELSEWHERE}"
            )
        out[i] = _supported(hits[0], qconfig, where)
    return out


def _tensor_files(checkpoint_files) -> dict[str, str]:
    from safetensors import safe_open

    where = {}
    for f in checkpoint_files or ():
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                where |= dict.fromkeys(fh.keys(), str(f))
    return where


def _read(where: dict[str, str], key: str) -> torch.Tensor:
    from safetensors import safe_open

    if key not in where:
        raise CheckpointError(f"compressed-tensors checkpoint: {key} is missing")
    with safe_open(where[key], framework="pt") as fh:
        return fh.get_tensor(key)


def _projection(where: dict[str, str], name: str, bits: int, group_size: int, n: int, k: int):
    """(qweight [K*bits/32, N] int32, scales [G, N] float16) of one per-expert module `name` ([N, K])."""
    from moequant.quantizers.packing import packed_rows

    packed = _read(where, f"{name}.weight_packed")  # [N, K*bits/32] int32, packed along K
    scale = _read(where, f"{name}.weight_scale")  # [N, G]
    shape = tuple(int(x) for x in _read(where, f"{name}.weight_shape").tolist())
    groups = (k + group_size - 1) // group_size
    if (
        shape != (n, k)
        or tuple(packed.shape) != (n, packed_rows(k, bits))
        or tuple(scale.shape) != (n, groups)
    ):
        raise CheckpointError(
            f"{name}: stored weight {shape} / packed {tuple(packed.shape)} / scale {tuple(scale.shape)}, the model's "
            f"experts need {n}x{k} at {bits} bits in groups of {group_size}"
        )
    scales = scale.T.to(torch.float16).contiguous()  # [G, N]
    if not torch.equal(scales.to(scale.dtype), scale.T) and scale.dtype not in _WARNED_SCALES:
        _WARNED_SCALES.add(scale.dtype)  # once per dtype and process, not once per projection of every expert
        logger.warning(
            "%s scales (first: %s) are rounded to float16 (moequant's scale dtype)", scale.dtype, name
        )
    return packed.T.contiguous(), scales  # the codes as stored, K-packed columns (moequant's layout)


def build_experts(
    model, schemes: dict[int, ExpertScheme], checkpoint_files=None, dtype=None
) -> dict[int, torch.nn.Module]:
    """QuantizedExperts for each layer in `schemes`, holding the checkpoint's codes and scales (with no
    `checkpoint_files`: empty, on the meta device; fill_experts reads them in)."""
    from moequant.arch import get_arch, moe_blocks
    from moequant.config import Method, QuantSpec
    from moequant.modules.qexperts import QuantizedExperts

    arch = get_arch(model)
    if arch.has_bias:
        raise CheckpointError(f"compressed-tensors experts with biases ({arch.model_type}): {ELSEWHERE}")
    blocks = {b.layer_idx: b for b in moe_blocks(model, arch)}
    out = {}
    for i, s in sorted(schemes.items()):
        ref = blocks[i]
        hidden, inter = arch.expert_dims(ref.experts)
        spec = QuantSpec(Method.GPTQ, s.bits, s.group_size, sym=True)
        act_params = arch.activation_params(ref.experts) if arch.activation.own_function else {}
        qe = QuantizedExperts(
            [spec] * ref.num_experts, hidden, inter, arch.activation, act_params,
            dtype=dtype or torch.bfloat16, device="meta",
        )  # fmt: skip
        qe.carry(arch.carried_modules(ref.experts))  # the family's other expert tensors keep their keys
        out[i] = qe
    if checkpoint_files is not None:
        fill_experts(model.config.model_type, out, checkpoint_files)
    return out


def fill_experts(model_type: str, modules: dict[int, torch.nn.Module], checkpoint_files) -> None:
    """Each layer's experts' codes and scales, read from the checkpoint into its QuantizedExperts."""
    from moequant.checkpoint.conversion import expert_key_templates

    keys = expert_key_templates(model_type)
    where = _tensor_files(checkpoint_files)
    for i, qe in sorted(modules.items()):
        spec = qe.specs[0]
        _fill(qe, where, keys, i, ExpertScheme(spec.bits, spec.group_size), qe.hidden, qe.intermediate)


def _fill(
    qe, where: dict[str, str], keys: dict[str, str], i: int, s: ExpertScheme, hidden: int, inter: int
) -> None:
    """Each expert's gate/up (or up alone, non-gated) and down codes and scales of layer i, from the checkpoint
    into `qe`."""
    ins = ("gate", "up") if qe.activation.gated else ("up",)  # canonical order of the input projection's rows
    for e in range(qe.num_experts):
        name = {p: keys[p].format(i=i, e=e).removesuffix(".weight") for p in _projections(keys)}
        parts = [_projection(where, name[p], s.bits, s.group_size, inter, hidden) for p in ins]
        dq, ds = _projection(where, name["down"], s.bits, s.group_size, hidden, inter)
        slot = qe.slot(e)
        slot.gate_up.qweight = torch.cat([q for q, _ in parts], dim=1)  # [K*bits/32, 2I] [gate; up] (or I)
        slot.gate_up.scales = torch.cat([sc for _, sc in parts], dim=1)  # [G, 2I] (or [G, I])
        slot.down.qweight, slot.down.scales = dq, ds  # [I*bits/32, H], [G, H]


class MoECompressedTensorsQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer, plus per-expert groups under fused experts (module doc)."""

    moe_layers: tuple[int, ...] = ()

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from compressed_tensors.utils.match import match_name

        from moequant.arch import get_arch, moe_blocks, set_experts

        qconfig = self.compressor.quantization_config
        with torch.device("cpu"):  # from_pretrained builds the skeleton under a meta device context
            schemes = expert_schemes(model, qconfig) if qconfig is not None else {}
        if not schemes:
            return super()._process_model_before_weight_loading(
                model, checkpoint_files=checkpoint_files, **kwargs
            )
        with torch.device("cpu"):  # empty: transformers replaces missing buffers, so they are filled after
            modules = build_experts(model, schemes, dtype=model.dtype)
        arch = get_arch(model)
        self._experts = {}  # layer -> (router, experts): filled, and moved beside the router, after loading
        for ref in moe_blocks(model, arch):
            if ref.layer_idx in modules:
                set_experts(arch, ref, modules[ref.layer_idx])
                self._experts[ref.layer_idx] = (ref.router, modules[ref.layer_idx])
        self._files = [str(f) for f in checkpoint_files or ()]
        self.moe_layers = tuple(sorted(modules))
        logger.info(
            "compressed-tensors: MoE layers %s hold per-expert packed weights under fused experts; moequant loads "
            "them into QuantizedExperts (transformers' own loader finds no Linear there)",
            list(self.moe_layers),
        )
        prefix = rf"\.layers\.({'|'.join(map(str, self.moe_layers))})\.[^ ]*experts\."
        model._keys_to_ignore_on_load_unexpected = (
            set(model._keys_to_ignore_on_load_unexpected or ())
            | {
                rf"{prefix}\d+\.[^.]+\.({'|'.join(PACKED_SUFFIXES)})$",
                rf"{prefix}(gate_up_proj|up_proj|down_proj)$",  # what transformers' expert converters make of those
            }
        )
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
            rf"{prefix}\d+\.(gate_up|down)\."
        }
        rest = [
            t
            for g in qconfig.config_groups.values()
            for t in g.targets
            if not (t.startswith("re:") and any(_targets_experts(t, match_name, model, i) for i in modules))
            or _targets_linears(t, match_name, model)  # also other modules: transformers sets those up
        ]
        if rest:  # groups for other modules (attention, ...): transformers' own path for them
            return super()._process_model_before_weight_loading(
                model, checkpoint_files=checkpoint_files, **kwargs
            )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """The experts' codes and scales from the files (on the CPU), then each beside its block's router."""
        experts = getattr(self, "_experts", {})
        if experts:
            fill_experts(model.config.model_type, {i: qe for i, (_, qe) in experts.items()}, self._files)
        for router, qe in experts.values():
            device = next((p.device for p in router.parameters()), None)
            if device is not None and device.type != "meta":
                qe.to(device)
        return super()._process_model_after_weight_loading(model, **kwargs)

    def is_serializable(self, *args, **kwargs) -> bool:
        return (
            not self.moe_layers
        )  # save_pretrained would write moequant's tensors under a compressed-tensors config


def _targets_linears(target: str, match_name, model) -> bool:
    """Whether `target` also names a Linear of the model (fused experts are no Linear: attention, shared
    experts, dense MLPs), which transformers' own compressed-tensors path must set up."""
    return any(match_name(n, target) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def _targets_experts(target: str, match_name, model, layer: int) -> bool:
    from moequant.checkpoint.conversion import expert_key_templates

    keys = expert_key_templates(model.config.model_type)
    return any(
        match_name(keys[p].format(i=layer, e=0).removesuffix(".weight"), target) for p in _projections(keys)
    )


def install() -> None:
    """Put MoECompressedTensorsQuantizer in transformers' registry for "compressed-tensors" (idempotent)."""
    current = AUTO_QUANTIZER_MAPPING.get("compressed-tensors")
    if current is not None and not issubclass(current, CompressedTensorsHfQuantizer):
        raise MoEQuantError(f"an unexpected compressed-tensors quantizer is registered: {current}")
    AUTO_QUANTIZER_MAPPING["compressed-tensors"] = MoECompressedTensorsQuantizer
