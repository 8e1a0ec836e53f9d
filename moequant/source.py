"""Where the weights come from: a model already in memory, or a safetensors checkpoint read layer by layer.

`CheckpointSource` builds the model skeleton on the meta device (accelerate's init_empty_weights), materialises
the non-layer weights (embeddings, final norm, lm_head) and then one decoder layer at a time, reading only that
layer's tensors with `safetensors.safe_open`. Per-expert keys on disk are stacked into transformers' fused
expert parameters through the family's DiskLayout, so peak memory is one layer (plus activations).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from moequant.arch import MoEArch, decoder_layers, resolve
from moequant.errors import CheckpointError

logger = logging.getLogger(__name__)


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"tensor {name} has {bad} NaN/Inf values; refusing to quantize a corrupt checkpoint"
        )


class InMemorySource:
    """A fully loaded model: layers stay in memory, quantized layers replace the originals in place."""

    streaming = False

    def __init__(self, model):
        self.model = model
        self.arch, self.blocks = resolve(model)
        for name, t in model.state_dict().items():
            check_finite(name, t)

    def load_layer(self, i: int) -> torch.nn.Module:
        return decoder_layers(self.model, self.arch)[i]

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
        experts_as_stored: bool = False,
    ):
        """`experts_as_stored`: keep the fused expert weights in the checkpoint's 16-bit dtype instead of the
        compute dtype (half the layer's memory; the quantizers upcast a few experts at a time, and the
        original experts never run forward in the quantize pass: see quantize_layer.expert_outputs)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        self.dtype = dtype
        self.experts_as_stored = experts_as_stored
        self._handles: dict[str, object] = {}
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read the model config in {self.path}: {err}") from None
        dt = getattr(config, "dtype", None)
        dt = getattr(torch, dt, None) if isinstance(dt, str) else dt
        # the dtype the checkpoint stores (from_config below overwrites config.dtype with the compute dtype)
        self.checkpoint_dtype = dt if isinstance(dt, torch.dtype) else torch.bfloat16
        if getattr(config, "quantization_config", None):
            raise CheckpointError(
                f"{self.path} is already quantized ({config.quantization_config}); start from the original"
            )
        self.index = self._index()
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
        self.model.eval()
        self.arch, self.blocks = resolve(self.model)
        experts = {id(ref.experts) for ref in self.blocks}
        self._expert_params = {  # state-dict names of the fused [E, ...] expert weights
            f"{m}.{n}"
            for m, mod in self.model.named_modules()
            if id(mod) in experts
            for n, p in mod.named_parameters(recurse=False)
            if p.dim() == 3
        }
        layers_prefix = f"{self.arch.layers}."
        base = [n for n in self.model.state_dict() if not n.startswith(layers_prefix)]
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
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
        check_finite(key, t)
        return t

    def has(self, key: str) -> bool:
        return key in self.index

    # ---- tensors by model name -------------------------------------------------------------------

    def tensor_for(self, name: str) -> torch.Tensor:
        """The value of model parameter/buffer `name`, assembled from the checkpoint's keys."""
        arch: MoEArch = self.arch
        disk = arch.disk
        if self.has(name):
            return self.read(name)
        if self.has(disk.to_disk(name)):
            return self.read(disk.to_disk(name))
        experts_suffix = f".{arch.block}.{arch.experts}."
        if disk.expert_keys is not None and experts_suffix in name:
            prefix, _, param = name.rpartition(".")
            keys = dict(disk.expert_keys)
            num = self._num_experts(prefix)
            base = disk.to_disk(prefix)
            parts = {"gate_up_proj": (keys["gate"], keys["up"]), "down_proj": (keys["down"],)}.get(param)
            if parts is not None:
                return self._stack_experts(base, parts, num)  # [E, 2I, H] or [E, H, I]
        raise CheckpointError(
            f"tensor {name} (on disk: {disk.to_disk(name)}) is missing from the checkpoint in {self.path}"
        )

    def _stack_experts(self, base: str, keys: tuple[str, ...], num: int) -> torch.Tensor:
        """[E, rows, cols]: per expert, the tensors `keys` (e.g. gate then up) stacked along rows, written
        into one preallocated buffer (no second layer-sized copy from torch.cat/stack)."""
        out = None
        for e in range(num):
            row = 0
            for key in keys:
                t = self.read(f"{base}.{key.format(e=e)}")  # [r, cols]
                if out is None:
                    rows = t.shape[0] * len(keys)
                    out = torch.empty(num, rows, t.shape[1], dtype=t.dtype)
                if row + t.shape[0] > out.shape[1] or t.shape[1] != out.shape[2]:
                    raise CheckpointError(
                        f"tensor {base}.{key.format(e=e)} has an unexpected shape {tuple(t.shape)}"
                    )
                out[e, row : row + t.shape[0]] = t
                row += t.shape[0]
                del t
        return out

    def _num_experts(self, experts_prefix: str) -> int:
        module = self.model.get_submodule(experts_prefix)
        return module.gate_up_proj.shape[0]

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
            if self.experts_as_stored and name in self._expert_params and value.element_size() == 2:
                dtype = value.dtype
            set_module_tensor_to_device(self.model, name, "cpu", value=value, dtype=dtype)

    def load_layer(self, i: int) -> torch.nn.Module:
        prefix = f"{self.arch.layers}.{i}."
        names = [n for n in self.model.state_dict() if n.startswith(prefix)]
        self._materialize(names)
        self._unmap_layer_files(i)
        return decoder_layers(self.model, self.arch)[i]

    def release_layer(self, i: int) -> None:
        """Free layer i's tensors (back to the meta device). The passes that swap in quantized experts free
        the original ones themselves (pipeline._use_precomputed)."""
        layer = decoder_layers(self.model, self.arch)[i]
        layer.to("meta")

    def _unmap_layer_files(self, i: int) -> None:
        """Drop the handles of the files only layer i uses: its values are copied out by now, so their mmapped
        pages need not stay resident."""
        prefix = f"{self.arch.layers}.{i}."
        used = {f for k, f in self.index.items() if prefix in k or self.arch.disk.to_disk(prefix) in k}
        others = {
            f for k, f in self.index.items() if prefix not in k and self.arch.disk.to_disk(prefix) not in k
        }
        for f in used - others:  # a file shared with later layers stays open (one header parse saved)
            self._handles.pop(f, None)
