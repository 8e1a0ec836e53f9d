"""The moequant checkpoint format and its registration with transformers.

A quantized checkpoint is a Hugging Face model folder. `config.json` carries

    "quantization_config": {
        "quant_method": "moequant", "format_version": 1, "status": "complete",
        "group_size": 128, "sym": false, "act_order": false,
        "hidden": H, "intermediate": I, "activation": "silu_glu", "act_params": {}, "has_bias": false,
        "experts": {"<layer>": ["gptq:4", "rtn:3", "keep", "bnb-nf4", ...]},     # one entry per expert
        ...
    }

and the safetensors shards hold each expert's tensors under `<layer prefix>.<block>.<experts>.<e>.{gate_up,down}.*`
(see modules/qexperts.py). `import moequant` registers the method, so `AutoModelForCausalLM.from_pretrained(folder)`
replaces each MoE block's experts by a QuantizedExperts module of the right shapes before the weights load,
after checking that every tensor the bit map needs is in the checkpoint with the right shape and dtype.
"""

from __future__ import annotations

import logging

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moequant.arch import Activation, get_arch, moe_blocks, set_experts
from moequant.config import parse_spec, spec_label
from moequant.errors import CheckpointError
from moequant.modules.qexperts import QuantizedExperts

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
GUARD_MESSAGE = "moequant checkpoint: run `import moequant` before from_pretrained"


@register_quantization_config("moequant")
class MoEQuantConfig(QuantizationConfigMixin):
    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        status: str = "complete",
        experts: dict | None = None,
        group_size: int = 128,
        sym: bool = False,
        act_order: bool = False,
        hidden: int | None = None,
        intermediate: int | None = None,
        activation: str = Activation.SILU_GLU.value,
        act_params: dict | None = None,
        has_bias: bool = False,
        storage_dtype: str = "bfloat16",
        kernel: str | None = None,
        **kwargs,
    ):
        self.quant_method = "moequant"
        self.format_version = format_version
        self.status = status
        self.experts = experts or {}
        self.group_size, self.sym, self.act_order = group_size, sym, act_order
        self.hidden, self.intermediate = hidden, intermediate
        self.activation, self.act_params, self.has_bias = activation, act_params or {}, has_bias
        self.storage_dtype = storage_dtype
        self.kernel = kernel  # "triton" | "reference" | None (MOEQUANT_KERNEL, else by device)
        for k, v in kwargs.items():  # forward compatibility: keep unknown informational fields
            setattr(self, k, v)

    @classmethod
    def from_plan(
        cls, plan, activation: Activation, act_params: dict, has_bias: bool, storage_dtype, **extra
    ):
        """The quantization_config of a plan (plan/schema.Plan: its JSON form carries the bit map)."""
        d = plan.to_json()
        return cls(
            experts=d["layers"],
            group_size=d["group_size"],
            sym=d["sym"],
            act_order=plan.act_order,
            hidden=plan.hidden,
            intermediate=plan.intermediate,
            activation=activation.value,
            act_params={k: v for k, v in act_params.items() if isinstance(v, int | float)},  # not a gate fn
            has_bias=has_bias,
            storage_dtype=str(storage_dtype).removeprefix("torch."),
            **extra,
        )

    def specs(self) -> dict[int, list]:
        return {
            int(i): [parse_spec(s, self.group_size, self.sym) for s in v] for i, v in self.experts.items()
        }

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def bit_map(self) -> dict[int, list[str]]:
        return {i: [spec_label(s) for s in v] for i, v in self.specs().items()}


def build_quantized_experts(config: MoEQuantConfig, device=None) -> dict[int, QuantizedExperts]:
    """Empty QuantizedExperts modules (layer -> module) with the shapes the bit map implies."""
    return {i: empty_experts_module(config, specs, device) for i, specs in config.specs().items()}


def empty_experts_module(config: MoEQuantConfig, specs: list, device=None) -> QuantizedExperts:
    """One MoE layer's empty QuantizedExperts: `specs` (one per expert) at the config's shapes and storage dtype."""
    qe = QuantizedExperts(
        specs,
        config.hidden,
        config.intermediate,
        Activation(config.activation),
        config.act_params,
        has_bias=config.has_bias,
        act_order=config.act_order,
        dtype=getattr(torch, config.storage_dtype),
        device=device,
    )
    qe.kernel = getattr(config, "kernel", None)
    return qe


def install_quantized_experts(model, modules: dict[int, QuantizedExperts]) -> None:
    arch = get_arch(model)
    blocks = {b.layer_idx: b for b in moe_blocks(model, arch)}
    if sorted(blocks) != sorted(modules):
        raise CheckpointError(
            f"the checkpoint's bit map covers MoE layers {sorted(modules)}, the model config has {sorted(blocks)}"
        )
    for i, qe in modules.items():
        ref = blocks[i]
        if ref.num_experts != qe.num_experts:
            raise CheckpointError(
                f"layer {i}: bit map lists {qe.num_experts} experts, the config {ref.num_experts}"
            )
        if qe.activation.own_function:  # the family's own function, from the module it replaces
            qe.act_params = arch.activation_params(ref.experts)
        qe.carry(arch.carried_modules(ref.experts))  # the family's other expert tensors keep their keys
        set_experts(arch, ref, qe)


# safetensors' dtype names (what a header says) -> torch dtypes
ST_DTYPES = {
    "I32": torch.int32,
    "U8": torch.uint8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I16": torch.int16,
    "I8": torch.int8,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
}


def read_headers(files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """key -> (shape, torch dtype or None when unknown) of every tensor in the given safetensors files, from
    their headers (safe_open checks that every tensor lies inside the file)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), ST_DTYPES.get(sl.get_dtype()))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt or truncated safetensors file {f}: {err}") from None
    return out


def tensor_bytes(files: list[str]) -> int:
    """Bytes of the tensors stored in the given safetensors files (headers not counted)."""
    total = 0
    for shape, dt in read_headers(files).values():
        n = 1
        for d in shape:
            n *= d
        total += n * (dt.itemsize if dt is not None else 4)
    return total


def install_quantized_linears(model, config: MoEQuantConfig) -> None:
    """Replace the non-expert Linears listed in the config by empty QuantLinear modules."""
    from moequant.config import QuantSpec
    from moequant.modules.qlinear import QuantLinear

    ne = getattr(config, "non_expert", None)
    if not ne:
        return
    modules = ne["modules"]  # {name: spec}; or, as format 1 wrote it, a list of names sharing ne["spec"]
    specs = (
        {n: QuantSpec.from_json(v) for n, v in modules.items()}
        if isinstance(modules, dict)
        else dict.fromkeys(modules, QuantSpec.from_json(ne["spec"]))
    )
    dtype = getattr(torch, config.storage_dtype)
    for name, spec in specs.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"quantization_config lists non-expert module {name}, the model has none"
            ) from None
        parent, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            attr,
            QuantLinear.empty(spec, lin, dtype, config.act_order),
        )


def verify_checkpoint(model, files: list[str]) -> None:
    """Every tensor our quantized modules expect must be in the files with the same shape and dtype."""
    from moequant.modules.qlinear import QuantLinear

    headers = read_headers(files)
    problems = []
    quantized = [n + "." for n, m in model.named_modules() if isinstance(m, QuantizedExperts | QuantLinear)]
    for name, t in model.state_dict().items():
        if not any(name.startswith(q) for q in quantized):
            continue
        if name not in headers:
            problems.append(f"{name} missing")
            continue
        shape, dt = headers[name]
        if shape != tuple(t.shape) or dt != t.dtype:
            problems.append(f"{name}: checkpoint {dt}{list(shape)}, bit map expects {t.dtype}{list(t.shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            "the checkpoint's tensors do not match its quantization_config bit map: "
            + "; ".join(problems[:5])
            + more
        )


@register_quantizer("moequant")
class MoEQuantHfQuantizer(HfQuantizer):
    """Loads moequant checkpoints: swaps in QuantizedExperts before the weights are read."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        cfg = self.quantization_config
        if cfg.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"moequant checkpoint format version {cfg.format_version} is not supported by this moequant "
                f"(supports {SUPPORTED_FORMAT_VERSIONS}); upgrade moequant"
            )
        if cfg.status != "complete":
            hint = (
                getattr(cfg, "resume_hint", "") or "rerun the same `moequant quantize` command with --resume"
            )
            raise CheckpointError(
                f"this moequant checkpoint is incomplete (an interrupted quantize run): {hint}"
            )
        if not self.pre_quantized:
            raise CheckpointError(
                "moequant quantizes with `moequant quantize`, not from_pretrained(quantization_config=...)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        modules = build_quantized_experts(self.quantization_config, device="meta")
        install_quantized_experts(model, modules)
        install_quantized_linears(model, self.quantization_config)
        if checkpoint_files:
            verify_checkpoint(model, [f for f in checkpoint_files if str(f).endswith(".safetensors")])
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {r"\.experts\.(gate_up_proj|up_proj|down_proj)$"}
        return model

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False
