"""Writes a checkpoint folder so that nothing half-written ever looks finished.

Everything goes to `<out>.partial/` first: one safetensors shard per decoder layer (written to a temporary
name, fsynced, then renamed), `progress.json` after each layer, and a config.json whose quantization_config
says `status: incomplete` (so loading the partial folder explains itself). `finalize` writes the index and
the final config.json, fsyncs, and renames the folder to `<out>` in one step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from moequant.errors import CheckpointError, MoEQuantError

logger = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(err: OSError, path: Path) -> MoEQuantError:
    return MoEQuantError(
        f"cannot write {path}: {err.strerror or err} (disk full?); free space and rerun with --resume"
    )


def partial_dir(out_dir: str | Path) -> Path:
    """Where a run writing `out_dir` keeps its files until it is finished: `<out>.partial/`."""
    out = Path(out_dir)
    return out.with_name(out.name + ".partial")


def check_target(out_dir: str | Path, overwrite: bool = False, resume: bool = False) -> bool:
    """Refuse an output that exists (without `overwrite`) or an interrupted run that would be lost (without
    `resume` or `overwrite`), touching nothing: callers run it before any slow pass. Returns whether the run
    resumes: `resume` with no `<out>.partial/` to continue starts a fresh run (with a warning)."""
    out, partial = Path(out_dir), partial_dir(out_dir)
    if out.exists() and not overwrite:
        raise MoEQuantError(f"{out} already exists; pass --overwrite to replace it")
    if partial.exists() and not resume and not overwrite:
        raise MoEQuantError(
            f"{partial} holds an interrupted run; pass --resume to continue it, or --overwrite to "
            "discard it and start again"
        )
    if resume and not partial.exists():
        logger.warning("no interrupted run in %s: starting a fresh run", partial)
        return False
    return resume


class CheckpointWriter:
    def __init__(self, out_dir: str | Path, overwrite: bool = False, resume: bool = False):
        """`resuming` (set here): whether this writer continues `<out>.partial/` (see check_target)."""
        self.out = Path(out_dir)
        self.partial = partial_dir(self.out)
        self.resuming = check_target(self.out, overwrite, resume)
        if self.partial.exists() and not self.resuming:
            shutil.rmtree(self.partial)  # check_target allowed it: --overwrite
        self.partial.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        progress = self.read_progress()
        self.weight_map.update(progress.get("weight_map", {}))

    # ---- files -----------------------------------------------------------------------------------

    def _atomic_bytes(self, name: str, write) -> Path:
        final = self.partial / name
        tmp = self.partial / f".{name}.tmp"
        try:
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _disk_full(err, final) from None
        return final

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        path = self._atomic_bytes(name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        for k in tensors:
            self.weight_map[k] = name
        return path

    def write_json(self, name: str, obj) -> Path:
        data = json.dumps(obj, indent=1, sort_keys=False, default=str)
        return self._atomic_bytes(name, lambda p: p.write_text(data))

    def copy_in(self, fn) -> None:
        """Let `fn(folder)` write files (tokenizer, generation config) into the partial folder."""
        try:
            fn(self.partial)
        except OSError as err:
            raise _disk_full(err, self.partial) from None

    def copy_code(self, folder: str | Path) -> list[str]:
        """The model's own code (the top-level *.py files of `folder`, where a config's `auto_map` points),
        so that the output loads with trust_remote_code as the original does. Returns the names copied."""
        names = sorted(p.name for p in Path(folder).glob("*.py") if p.is_file())
        for name in names:
            self.copy_in(lambda d, n=name: shutil.copyfile(Path(folder) / n, Path(d) / n))
        return names

    # ---- progress (for --resume) -----------------------------------------------------------------

    def read_progress(self) -> dict:
        p = self.partial / "progress.json"
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{p} is corrupt ({err}); remove {self.partial} and start again") from None

    def write_progress(self, progress: dict) -> None:
        self.write_json("progress.json", progress | {"weight_map": self.weight_map})

    # ---- finish ----------------------------------------------------------------------------------

    def finalize(self, config: dict) -> Path:
        self.write_json(
            "model.safetensors.index.json",
            {"metadata": {"format": "moequant"}, "weight_map": dict(sorted(self.weight_map.items()))},
        )
        self.write_json("config.json", config)
        (self.partial / "progress.json").unlink(missing_ok=True)
        _fsync_dir(self.partial)
        old = None
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def fp32_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Name fragments of the tensors the family keeps in float32 (transformers' `_keep_in_fp32_modules*`,
    e.g. DeepSeek-V3's router weight and score-correction bias): saved in float32, not the 16-bit dtype."""
    names = []
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        names += list(getattr(type(model), attr, None) or ())
    return tuple(dict.fromkeys(names))


def _keeps_fp32(name: str, keep: tuple[str, ...]) -> bool:
    return any(f".{k}." in f".{name}." or name.endswith(f".{k}") for k in keep)


def checkpoint_tensors(
    module: torch.nn.Module, prefix: str, save_dtype: torch.dtype, skip=(), keep_fp32: tuple[str, ...] = ()
) -> dict:
    """State dict of `module` under checkpoint names: 16-bit tensors in `save_dtype` (those matching
    `keep_fp32`, see fp32_names, in float32), quantized storage (inside QuantizedExperts / QuantLinear modules)
    in its own dtypes; names in `skip` left out."""
    from moequant.modules.qexperts import QuantizedExperts
    from moequant.modules.qlinear import QuantLinear

    quantized = [n + "." for n, m in module.named_modules() if isinstance(m, QuantizedExperts | QuantLinear)]
    out = {}
    for k, v in module.state_dict().items():
        if k in skip:
            continue
        if v.is_floating_point() and not any(k.startswith(q) for q in quantized):
            v = v.to(torch.float32 if _keeps_fp32(prefix + k, keep_fp32) else save_dtype)
        out[prefix + k] = v
    return out


def base_tensors(model: torch.nn.Module, layers: str, save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (under `layers`): embeddings, final norm, lm_head unless tied."""
    from moequant.checkpoint.source import tied_names

    tied = tied_names(model)
    skip = {k for k in model.state_dict() if k.startswith(f"{layers}.") or k in tied}
    return checkpoint_tensors(model, "", save_dtype, skip, fp32_names(model))
