"""What the GPTQ and compressed-tensors exports share: reading a moequant checkpoint folder shard by shard,
with each MoE layer's quantized experts loaded, and copying the files that are not tensors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moequant.errors import MoEQuantError


class ExportError(MoEQuantError):
    pass


def read_moequant(src: str | Path, what: str):
    """(folder, config.json dict, MoEQuantConfig) of a finished moequant checkpoint the `what` export can take."""
    from moequant.checkpoint.format import MoEQuantConfig

    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    qc_dict = cfg.get("quantization_config") or {}
    if qc_dict.get("quant_method") != "moequant":
        raise ExportError(f"{src} is not a moequant checkpoint")
    qc = MoEQuantConfig(**{k: v for k, v in qc_dict.items() if k != "quant_method"})
    if getattr(qc, "non_expert", None):
        raise ExportError(f"the {what} export covers routed experts only; quantize without --non-expert")
    return src, cfg, qc


def shards(
    src: Path, arch, modules: dict, to_disk: Callable[[str], str]
) -> Iterator[tuple[str, dict[str, torch.Tensor], list[int]]]:
    """Per safetensors shard of `src`: (file name, its non-expert tensors under to_disk names, the MoE layers
    whose experts it holds, each loaded into modules[i])."""
    from safetensors import safe_open

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    experts_tag = f".{arch.experts_path}."
    for f in sorted(set(index.values())):
        with safe_open(str(src / f), framework="pt") as fh:
            keys = list(fh.keys())
            tensors = {to_disk(k): fh.get_tensor(k) for k in keys if experts_tag not in k}
            layers = sorted(
                {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(arch.layers)}\.(\d+)\.", k))}
            )
            loaded = []
            for i in layers:
                if i not in modules:
                    continue
                prefix = f"{arch.layers}.{i}.{arch.experts_path}."
                state = {k.removeprefix(prefix): fh.get_tensor(k) for k in keys if k.startswith(prefix)}
                modules[i].load_state_dict(state, strict=True)
                loaded.append(i)
        yield f, tensors, loaded


def write_shards(
    writer, src: Path, arch, modules: dict, to_disk: Callable[[str], str],
    layer_tensors: Callable[[int], dict[str, torch.Tensor]],
) -> tuple[list[str], int]:  # fmt: skip
    """Write every shard of `src` again under `writer`: its non-expert tensors renamed by `to_disk`, and
    `layer_tensors(i)` for each MoE layer i whose experts it holds. Returns the names written and their bytes."""
    written, nbytes = [], 0
    for f, tensors, layers in shards(src, arch, modules, to_disk):
        for i in layers:
            tensors.update(layer_tensors(i))
        written += list(tensors)
        nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
        writer.write_shard(f, tensors)
    return written, nbytes


def copy_other_files(src: Path, writer) -> None:
    """Tokenizer, generation config, plan, report, figures: every file but the tensors, config, index and the
    moequant model card (an export writes its own: export_card.py)."""
    for extra in src.iterdir():
        if extra.suffix == ".safetensors" or extra.name in (
            "config.json",
            "model.safetensors.index.json",
            "README.md",
        ):
            continue
        if extra.is_file():
            writer.copy_in(lambda d, extra=extra: (d / extra.name).write_bytes(extra.read_bytes()))
