"""Where the weights come from: a model already in memory, or a safetensors checkpoint read layer by layer.

`open_source(model)` takes either (an nn.Module, a folder, the bundled model's name or None) and returns a
source; the functions at the end answer what every pass asks of one (shapes, dtype, sizes).

`CheckpointSource` builds the model skeleton on the meta device (accelerate's init_empty_weights), materialises
the non-layer weights (embeddings, final norm, lm_head) and then one decoder layer at a time, reading only that
layer's tensors with `safetensors.safe_open`. Per-expert keys on disk are fused into transformers' 3-D expert
parameters by transformers' own conversion mapping (checkpoint/conversion.py), so peak memory is one layer (plus activations). With
`lazy_experts` (the quantize pass) not even that: a layer loads without its fused expert weights, and the
quantizer reads the few experts of each chunk (`read_experts`) when it gets to them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import torch

from moequant.arch import MoEArch, MoEBlockRef, decoder_layers, non_expert_linears, resolve
from moequant.checkpoint.published import source_format
from moequant.errors import CheckpointError

logger = logging.getLogger(__name__)


# IEEE floats: the value's bits without the sign reach the all-ones exponent exactly for Inf and NaN
_NON_FINITE_BITS = {
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in floating tensor t: one integer max over its bits for 16- and 32-bit floats (on the CPU
    several times faster than isfinite(t).all(), which a run pays on every expert it reads)."""
    if t.numel() == 0:
        return True
    bits = _NON_FINITE_BITS.get(t.dtype)
    if bits is None:
        return bool(torch.isfinite(t).all())
    as_int, magnitude, exponent = bits
    return int((t.view(as_int) & magnitude).amax()) < exponent


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.element_size() == 1:
        t = t.float()  # FP8 (isfinite has no float8 kernel); e4m3's NaN code reads as NaN
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"tensor {name} has {bad} NaN/Inf values; refusing to quantize a corrupt checkpoint"
        )


class Source(Protocol):
    """What every pass reads a model through: InMemorySource (a loaded model) or CheckpointSource (a
    safetensors folder, one layer at a time)."""

    model: torch.nn.Module  # loaded, or a skeleton on the meta device whose layers load on demand
    arch: MoEArch
    blocks: list[MoEBlockRef]
    device: torch.device  # where the passes compute
    streaming: bool  # layers load and release one at a time
    lazy_experts: bool  # load_layer leaves the fused expert weights on meta: read_experts reads them by chunk
    path: Path | None  # the folder read, None for a model in memory
    trust_remote_code: bool

    def load_layer(self, i: int) -> torch.nn.Module: ...

    def release_layer(self, i: int) -> None: ...

    def read_experts(self, i: int, experts: list[int]) -> dict[str, torch.Tensor]:
        """{parameter name in the experts module: [len(experts), ...]}: the fused expert weights of layer i."""
        ...


class InMemorySource:
    """A fully loaded model: layers stay in memory, quantized layers replace the originals in place."""

    streaming = False
    lazy_experts = False  # the experts are loaded (CheckpointSource can leave them to read_experts)
    path = None
    trust_remote_code = False

    def __init__(self, model, device: torch.device | None = None):
        """`device`: where the passes compute; a model already in memory computes where it is, so another
        device is refused (move the model first)."""
        self.model = model
        self.arch, self.blocks = resolve(model)
        here = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        if device is not None and not _same_device(torch.device(device), here):
            raise CheckpointError(
                f"the model is on {here}, the pass was asked to compute on {device}: move the model "
                f"(model.to({str(device)!r})) or pass device={str(here)!r}"
            )
        self.device = here
        for name, t in model.state_dict().items():
            check_finite(name, t)

    def load_layer(self, i: int) -> torch.nn.Module:
        return decoder_layers(self.model, self.arch)[i]

    def read_experts(self, i: int, experts: list[int]) -> dict[str, torch.Tensor]:
        """The loaded fused expert weights of layer i for `experts` (views of the module's parameters)."""
        module = next(ref.experts for ref in self.blocks if ref.layer_idx == i)
        return {n: p[experts] for n, p in module.named_parameters(recurse=False) if p.dim() == 3}

    def release_layer(self, i: int) -> None:
        pass


class CheckpointSource:
    """A safetensors checkpoint folder, read one decoder layer at a time."""

    streaming = True

    def __init__(
        self,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        lazy_experts: bool = False,
        device: torch.device | str = "cpu",
    ):
        """`lazy_experts`: `load_layer` leaves the fused expert weights on the meta device and `read_experts`
        reads a chunk of experts at a time, in the checkpoint's 16-bit dtype (the quantizers upcast one chunk;
        the original experts never run forward in the quantize pass: see quantize/experts.expert_outputs).
        `device`: where the materialised weights go (the layers compute there; experts stream from the files
        to it chunk by chunk)."""
        self.device = torch.device(device)
        self.path = Path(path)
        self.dtype = dtype
        self.lazy_experts = lazy_experts
        self.trust_remote_code = trust_remote_code
        self._handles: dict[str, object] = {}
        # checkpoint keys and (fused expert parameter, expert) pairs already checked for NaN/Inf
        self._finite: set[str | tuple[str, int]] = set()
        config = self._read_config()
        # the dtype the checkpoint stores (from_config below overwrites config.dtype with the compute dtype)
        self.checkpoint_dtype = _config_dtype(config)
        self.format = self._source_format(config)  # FP8 / MXFP4 read dequantized; other methods refused
        self.index = self._index()
        self.model = self._skeleton(config)
        self.arch, self.blocks = resolve(self.model)
        from moequant.checkpoint.conversion import KeyRoutes

        self.routes = KeyRoutes(
            self.model,
            self.format.keys(list(self.index)),
            self._read_dequantized,
            self._read_rows_dequantized,
        )
        self._expert_params = self._fused_expert_names()
        self._materialize_non_layer()

    # ---- building the skeleton -------------------------------------------------------------------

    def _read_config(self):
        """The folder's transformers config (a CheckpointError when it cannot be read)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read the model config in {self.path}: {err}") from None

    def _source_format(self, config):
        """The reader of the checkpoint's stored format; a published quantized one drops its
        quantization_config from `config` (the skeleton and the output are 16-bit models)."""
        try:
            fmt = source_format(config)
        except CheckpointError as err:
            raise CheckpointError(f"{self.path}: {err}") from None
        if fmt.method:
            logger.info(
                "%s is a published %s checkpoint: dequantized on read, in float32",
                self.path,
                fmt.method.upper(),
            )
            del config.quantization_config  # the skeleton and the output are 16-bit models
        return fmt

    def _skeleton(self, config) -> torch.nn.Module:
        """The model built from `config` on the meta device, in eval mode."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        model.eval()
        return model

    def _fused_expert_names(self) -> set[str]:
        """State-dict names of the fused [E, ...] expert weights of every MoE block."""
        experts = {id(ref.experts) for ref in self.blocks}
        return {
            f"{m}.{n}"
            for m, mod in self.model.named_modules()
            if id(mod) in experts
            for n, p in mod.named_parameters(recurse=False)
            if p.dim() == 3
        }

    def _materialize_non_layer(self) -> None:
        """Load every weight outside the decoder layers (embeddings, final norm, lm_head), tying tied ones."""
        layers_prefix = f"{self.arch.layers}."
        base = [n for n in self.model.state_dict() if not n.startswith(layers_prefix)]
        tied = tied_names(self.model)
        self._materialize([n for n in base if n not in tied])
        if tied:
            self.model.tie_weights()

    # ---- files -----------------------------------------------------------------------------------

    def _index(self) -> dict[str, str]:
        """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{idx} is malformed: {err}") from None
            return {k: str(self.path / v) for k, v in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.path} has no .safetensors weights (moequant never loads pickled weights)"
            )
        out = {}
        for f in files:
            for k in self._open(str(f)).keys():
                out[k] = str(f)
        return out

    def _open(self, file: str):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"corrupt or truncated safetensors file {file}: {err}") from None
        return self._handles[file]

    def read(self, key: str) -> torch.Tensor:
        """Checkpoint tensor `key` as stored (a NaN/Inf is reported under the checkpoint's own key name)."""
        from safetensors import SafetensorError

        file = self.index.get(key)
        if file is None:
            raise CheckpointError(f"tensor {key} is missing from the checkpoint in {self.path}")
        try:
            t = self._open(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot read tensor {key} from {file} (corrupt or truncated file?): {err}"
            ) from None
        if key not in self._finite:  # once per source: the passes read every layer several times
            check_finite(key, t)
            self._finite.add(key)
        return t

    def _read_dequantized(self, key: str) -> torch.Tensor:
        """Tensor `key` of the 16-bit view (published.py): as stored, or dequantized from FP8 / MXFP4."""
        return self.format.read(key, self.read)

    def _read_rows_dequantized(self, key: str, rows: list[int]) -> torch.Tensor:
        return self.format.read_rows(key, rows, self._read_rows, self.read)

    def has(self, key: str) -> bool:
        return key in self.index

    # ---- tensors by model name -------------------------------------------------------------------

    def tensor_for(self, name: str) -> torch.Tensor:
        """The value of model parameter/buffer `name`, assembled from the checkpoint's keys through
        transformers' conversion mapping for the family (checkpoint/conversion.py)."""
        if not self.routes.has(name):
            raise self._missing(name)
        return self.routes.assemble(name)

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(
            f"tensor {name} is missing from the checkpoint in {self.path}: no key maps to it through "
            f"transformers' weight conversion for {self.model.config.model_type!r}"
        )

    def _materialize(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        state = self.model.state_dict()
        for name in names:
            value = self.tensor_for(name)
            expected = tuple(state[name].shape)
            if tuple(value.shape) != expected:
                raise CheckpointError(
                    f"tensor {name} has shape {tuple(value.shape)} in the checkpoint, the config says {expected}"
                )
            dtype = self.dtype if value.is_floating_point() else None
            set_module_tensor_to_device(self.model, name, self.device, value=value, dtype=dtype)

    def load_layer(self, i: int) -> torch.nn.Module:
        """Materialise decoder layer i (without its fused expert weights when `lazy_experts`)."""
        prefix = f"{self.arch.layers}.{i}."
        names = [
            n
            for n in self.model.state_dict()
            if n.startswith(prefix) and not (self.lazy_experts and n in self._expert_params)
        ]
        self._materialize(names)
        self._unmap()
        return decoder_layers(self.model, self.arch)[i]

    def read_experts(self, i: int, experts: list[int]) -> dict[str, torch.Tensor]:
        """The fused expert weights of layer i for `experts` only: {parameter name in the experts module:
        [len(experts), ...]} in the module's layout, 16-bit as stored (else the compute dtype). The files are
        unmapped again afterwards, so at no time does more than this chunk of the layer's experts stay resident."""
        prefix = f"{self.arch.layers}.{i}."
        out = {}
        for name in sorted(n for n in self._expert_params if n.startswith(prefix)):
            value = self._expert_slice(name, experts)
            expected = (len(experts), *self.model.get_parameter(name).shape[1:])
            if tuple(value.shape) != expected:
                raise CheckpointError(
                    f"tensor {name} (experts {experts}) has shape {tuple(value.shape)} in the checkpoint, "
                    f"the config says {expected}"
                )
            if value.element_size() != 2:
                value = value.to(self.dtype)
            out[name.rpartition(".")[2]] = value.to(self.device)
        self._unmap()
        return out

    def _expert_slice(self, name: str, experts: list[int]) -> torch.Tensor:
        """[len(experts), ...] of fused expert parameter `name`: only those experts' keys (or rows) are read."""
        if not self.routes.has(name):
            raise self._missing(name)
        out = self.routes.assemble_experts(name, experts)
        # rows read by _read_rows skip read()'s check; each expert's rows are checked once per source (the
        # passes read every expert several times: profile, damage, probe, quantize)
        fresh = [j for j, e in enumerate(experts) if (name, e) not in self._finite]
        if fresh:
            check_finite(name, out if len(fresh) == len(experts) else out[fresh])
            self._finite.update((name, experts[j]) for j in fresh)
        return out

    def _read_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """rows of the first axis of checkpoint tensor `key`, one at a time into one buffer."""
        from safetensors import SafetensorError

        file = self.index.get(key)
        if file is None:
            raise CheckpointError(f"tensor {key} is missing from the checkpoint in {self.path}")
        try:
            sl = self._open(file).get_slice(key)
            out = None
            for j, e in enumerate(rows):
                t = sl[e : e + 1]  # [1, ...]
                if out is None:
                    out = torch.empty(len(rows), *t.shape[1:], dtype=t.dtype)
                out[j] = t[0]
                del t
        except (SafetensorError, OSError, RuntimeError, IndexError) as err:
            raise CheckpointError(
                f"cannot read rows {rows} of {key} from {file} (corrupt or truncated file?): {err}"
            ) from None
        return out

    def release_layer(self, i: int) -> None:
        """Free layer i's tensors (back to the meta device). The passes that swap in quantized experts free
        the original ones themselves (quantize/layer_pass.py)."""
        layer = decoder_layers(self.model, self.arch)[i]
        layer.to("meta")

    def _unmap(self) -> None:
        """Drop every file handle: what was read is copied out by now, so no mmapped page of the checkpoint
        needs to stay resident (a shard that spans several layers included); the next read re-opens its
        file, one header parse."""
        self._handles.clear()


# ---- opening a source, and what the passes ask of one ----------------------------------------------------


def open_source(
    model,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    lazy_experts: bool = False,
    device: torch.device | str | None = None,
) -> InMemorySource | CheckpointSource:
    """A model object (kept in memory, computing where it is) or a checkpoint path / name (streamed layer by
    layer onto `device`, None: CUDA when available, else CPU; with `lazy_experts` a layer loads without its
    fused expert weights, which the quantizer reads chunk by chunk in the checkpoint's 16-bit dtype: see
    CheckpointSource)."""
    if isinstance(model, torch.nn.Module):
        return InMemorySource(model, device)
    if isinstance(model, InMemorySource | CheckpointSource):
        return model
    from moequant.checkpoint.hub_source import resolve_model
    from moequant.runtime.devices import resolve_device

    path = resolve_model(model, trust_remote_code=trust_remote_code)  # a Hub id is downloaded (hub_source.py)
    return CheckpointSource(
        path,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        lazy_experts=lazy_experts,
        device=resolve_device(device),
    )


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:<current> name the same device."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def model_id(model) -> str:
    """What reports call the model: its config's name or class for an object, else the path or name given."""
    if isinstance(model, torch.nn.Module):
        return getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    from moequant.checkpoint.hub_source import hub_id_of

    return hub_id_of(model) or str(model or "bundled")  # a Hub download is named by its repo id


def expert_dims(source: Source) -> tuple[int, int]:
    """(hidden, intermediate) of the source's experts (from shapes: works before any layer is loaded)."""
    return source.arch.expert_dims(source.blocks[0].experts)


def layer_experts(source: Source) -> dict[int, int]:
    """MoE layer index -> number of routed experts."""
    return {b.layer_idx: b.num_experts for b in source.blocks}


def storage_dtype(source: Source) -> torch.dtype:
    """The 16-bit dtype the source's weights are stored in (what unquantized tensors are saved as)."""
    if isinstance(source, CheckpointSource):
        return source.checkpoint_dtype
    return _config_dtype(source.model.config)


def _config_dtype(config) -> torch.dtype:
    """The dtype a transformers config names (a torch.dtype or its name), else bfloat16."""
    dt = getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


def tied_names(model) -> set[str]:
    """State-dict names that share storage with another (tied embeddings): saved once, under the other name."""
    return set(getattr(model, "all_tied_weights_keys", {}) or {})


def non_expert_modules(source: Source) -> list[str]:
    """Full names of the Linears `--non-expert` quantizes: in every decoder layer, all but experts, routers
    and gates; plus lm_head when it is not tied to the embeddings."""
    arch = source.arch
    names = []
    for i, layer in enumerate(decoder_layers(source.model, arch)):
        names += [f"{arch.layers}.{i}.{n}" for n in non_expert_linears(layer, arch)]
    if f"{arch.lm_head}.weight" not in tied_names(source.model):
        names.append(arch.lm_head)
    return names


def non_expert_nbytes(source: Source, dtype_bytes: int = 2) -> int:
    """Bytes of everything but the routed experts, stored at 16 bits (embeddings, attention, norms, ...)."""
    total = 0
    experts_tag = f".{source.arch.experts_path}."
    tied = tied_names(source.model)
    for name, t in source.model.state_dict().items():
        if experts_tag in name or name in tied:
            continue
        total += t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())
    return total
