"""The model card (README.md) of a quantized output folder, rendered from the folder's own files.

Inputs, all optional except config.json: `config.json` (bit map), `quant_report.json` (sizes, calibration,
per-expert errors), `eval/report.json` (written by `moequant eval`), `sweep.json` + `sweep_pareto.png`
(a budget sweep). Outputs: `README.md` with YAML metadata for the Hub, and `bitmap.png` (bits per expert).

The card ends with a marker holding the hash of its text: `moequant push` re-renders a card it generated
(to put the repo id in the loading snippet) only while that hash still matches, never a card edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import yaml

from moequant.errors import MoEQuantError

logger = logging.getLogger(__name__)

CARD = "README.md"
BITMAP = "bitmap.png"
TAGS = ["moe", "quantized", "moequant", "mixed-precision"]
CARD_SKIP_METRICS = (
    "word_perplexity",
    "byte_perplexity",
)  # bits_per_byte says the same; all in eval/report.md
_MARKER = re.compile(r"\n<!-- moequant-card sha256:([0-9a-f]{64}) -->\n?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        logger.warning("ignoring %s in the model card: not valid JSON (%s)", path, err)
        return None


def _base_model(model_id: str | None) -> str | None:
    """A Hub id for the `base_model` field, only when the original was named by one (never a local path): the
    id itself, or the snapshot folder in the Hub cache the CLI downloaded it into."""
    from moequant.checkpoint.bundled import is_bundled
    from moequant.checkpoint.hub_source import hub_id_of

    if hub_id_of(model_id):
        return hub_id_of(model_id)
    if not model_id or is_bundled(model_id) or Path(model_id).exists() or not _HUB_ID.match(model_id):
        return None
    return model_id


def _origin(base: str | None, model_id: str | None) -> str:
    from moequant.checkpoint.bundled import BUNDLED_MODEL_ID, is_bundled

    if base:
        return f"[{base}](https://huggingface.co/{base})"
    if model_id and is_bundled(model_id):
        return f"The bundled tiny MoE (`{BUNDLED_MODEL_ID}`, ships with moequant)"
    return f"`{Path(model_id).name}`" if model_id else "A Mixture-of-Experts model"


def _bit_map(qc: dict) -> tuple[list[int], list[list[str]], list[list]]:
    """The stored bit map of a quantization_config: layers, each expert's label ('gptq:3/gptq:2') and spec."""
    from moequant.config import parse_spec, spec_label

    layers = sorted(int(i) for i in qc.get("experts", {}))
    labels, specs = [], []
    for i in layers:
        row = [parse_spec(s, qc.get("group_size", 128), qc.get("sym", False)) for s in qc["experts"][str(i)]]
        labels.append([spec_label(s) for s in row])
        specs.append(row)
    return layers, labels, specs


def _metadata(config: dict, qc: dict, qrep: dict, base: str | None) -> dict:
    hist = qrep.get("histogram") or {}
    meta: dict = {}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    meta |= {
        "library_name": "moequant",
        "pipeline_tag": "text-generation",
        "tags": TAGS + ([config["model_type"]] if config.get("model_type") else []),
        "quantization": {
            "method": "moequant",
            "format_version": qc.get("format_version"),
            "average_bits_per_expert_weight": qrep.get("average_bits"),
            "expert_widths": hist,
            "group_size": qc.get("group_size"),
            "symmetric": qc.get("sym"),
            "act_order": qc.get("act_order"),
            "storage_dtype": qc.get("storage_dtype"),
            "calibration": qrep.get("calibration"),
        },
    }
    return meta


def _tradeoff_sections(folder: Path, eval_report: dict | None, sweep: dict | None) -> list[str]:
    from moequant.evals.report import lm_eval_md, ppl_md, routing_md

    parts = []
    if eval_report:
        parts += ["## Quality vs the original", ""]
        if eval_report.get("lm_eval"):
            ev = eval_report["lm_eval"]
            parts += [
                f"lm-eval ({', '.join(ev['tasks'])}; limit {ev['limit'] or 'none'} per task), "
                f"{eval_report.get('date', '')}:",
                "",
                lm_eval_md([r for r in ev["rows"] if r["metric"] not in CARD_SKIP_METRICS]),
                "",
            ]
        if eval_report.get("perplexity"):
            parts += [
                "Token perplexity on the bundled corpus's test split:",
                "",
                ppl_md(eval_report["perplexity"]),
                "",
            ]
        if eval_report.get("drift"):
            parts += ["Routing drift per layer:", "", routing_md(eval_report["drift"]["routing"]), ""]
            for fig in ("drift_heatmap.png", "routing_drift.png"):
                if (folder / "eval" / fig).is_file():
                    parts += [f"![{fig[:-4].replace('_', ' ')}](eval/{fig})", ""]
        if (folder / "eval" / "report.md").is_file():
            parts += ["Full report: [eval/report.md](eval/report.md).", ""]
    if sweep:
        from moequant.evals.sweep_table import sweep_md

        parts += ["## Size / quality trade-off (budget sweep)", "", sweep_md(sweep["points"]), ""]
        if (folder / "sweep_pareto.png").is_file():
            parts += ["![Pareto plot](sweep_pareto.png)", ""]
    return parts


def render_card(folder: str | Path, repo_id: str | None = None, eval_report=None, sweep=None) -> str:
    """The card's text (README.md without its hash marker); `eval_report` and `sweep` default to the folder's
    eval/report.json and sweep.json."""
    folder = Path(folder)
    config, qrep = _read_checkpoint(folder)
    qc = config["quantization_config"]
    eval_report = eval_report if eval_report is not None else _read_json(folder / "eval" / "report.json")
    sweep = sweep if sweep is not None else _read_json(folder / "sweep.json")
    base = _base_model(qrep.get("model"))
    layers, labels, _ = _bit_map(qc)
    name = repo_id or folder.name.removesuffix(".partial")  # api.quantize renders it before the rename
    arch = (config.get("architectures") or ["?"])[0]
    front = yaml.safe_dump(_metadata(config, qc, qrep, base), sort_keys=False, allow_unicode=True).strip()
    parts = ["---", front, "---", ""]
    parts += _summary_md(name, _origin(base, qrep.get("model")), arch, qrep)
    parts += _bit_map_md(folder, layers, labels)
    parts += _routing_md(folder)
    parts += _tradeoff_sections(folder, eval_report, sweep)
    parts += _loading_md(name, folder)
    return "\n".join(parts)


def _read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """config.json of a moequant checkpoint folder (anything else is refused) and its quant_report.json or {}."""
    config = _read_json(folder / "config.json")
    if not config or (config.get("quantization_config") or {}).get("quant_method") != "moequant":
        raise MoEQuantError(f"{folder} is not a moequant checkpoint folder (config.json)")
    return config, _read_json(folder / "quant_report.json") or {}


def _summary_md(name: str, origin: str, arch: str, qrep: dict) -> list[str]:
    """The title, what was quantized and how, the size table, the experts per width and the calibration."""
    parts = [
        f"# {name}",
        "",
        f"{origin} ({arch}) quantized per expert with moequant: "
        "every expert of every MoE layer stored at its own width, chosen under a memory budget from routing "
        "statistics; attention, router and embeddings stay at full precision.",
        "",
        "| | original | quantized |",
        "|---|---|---|",
    ]
    before, after = qrep.get("bytes_before"), qrep.get("bytes_after")
    if before and after:
        from moequant.evals.report import human_bytes

        parts.append(f"| model size | {human_bytes(before)} | {human_bytes(after)} |")
    fallbacks = qrep.get("fallbacks")
    return parts + [
        f"| bits per expert weight | 16 | {qrep.get('average_bits', '-')} |",
        "",
        "Experts per width: "
        + ", ".join(f"`{k}` x{v}" for k, v in (qrep.get("histogram") or {}).items())
        + (f" ({fallbacks} fell back to RTN: too few calibration tokens)" if fallbacks else ""),
        "",
        f"Calibration: {qrep.get('calibration', 'unknown')}.",
        "",
    ]


def _bit_map_md(folder: Path, layers: list[int], labels: list[list[str]]) -> list[str]:
    """The bits-per-expert section: the bit map figure when drawn, and the table (up to 64 experts a layer)."""
    parts = ["## Bits per expert", ""]
    if (folder / BITMAP).is_file():
        parts += [
            f"![bits per expert]({BITMAP})",
            "",
            "Colour: each expert's gate/up width; number: its down width.",
            "",
        ]
    n_e = max((len(r) for r in labels), default=0)
    if n_e > 64:
        return parts + ["The full bit map is `quantization_config.experts` in config.json.", ""]
    parts += ["| layer | " + " | ".join(str(e) for e in range(n_e)) + " |", "|---|" + "---|" * n_e]
    parts += [f"| {l} | " + " | ".join(r) + " |" for l, r in zip(layers, labels, strict=True)]
    return parts + [""]


def _routing_md(folder: Path) -> list[str]:
    """The routing figure of the calibration pass, when the folder has one."""
    if not (folder / "routing.png").is_file():
        return []
    return [
        "Routing on the calibration data (what the widths were chosen from):",
        "",
        "![routing](routing.png)",
        "",
    ]


def _loading_md(name: str, folder: Path) -> list[str]:
    """How to load the checkpoint with transformers, and how to evaluate it."""
    return [
        "## How to load",
        "",
        "```python",
        "import torch",
        "import moequant  # registers the moequant format with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype=torch.bfloat16)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "moequant provides the format; on CUDA the experts run fused Triton dequant-GEMM "
        "kernels, on CPU a plain torch reference. Evaluate it against the original with "
        f"`moequant eval {folder.name.removesuffix('.partial')}`.",
        "",
    ]


def _sealed(text: str) -> str:
    return text + f"\n<!-- moequant-card sha256:{hashlib.sha256(text.encode()).hexdigest()} -->\n"


def is_generated_unedited(path: str | Path) -> bool:
    """True when `path` is a card moequant wrote and nobody has edited since."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return False
    m = _MARKER.search(text)
    return bool(m) and hashlib.sha256(text[: m.start()].encode()).hexdigest() == m.group(1)


def write_card(folder: str | Path, repo_id: str | None = None, eval_report=None, sweep=None) -> Path:
    """Render README.md (+ bitmap.png) into a moequant output folder; returns the card's path."""
    folder = Path(folder)
    try:
        from moequant.evals.plots import bit_map

        config = _read_json(folder / "config.json") or {}
        layers, _, specs = _bit_map(config.get("quantization_config") or {})
        if layers:
            bit_map(layers, specs, folder / BITMAP)
    except Exception as err:  # the card must not fail a finished quantization over a figure
        logger.warning("model card: could not draw %s (%s: %s)", BITMAP, type(err).__name__, err)
    path = folder / CARD
    path.write_text(_sealed(render_card(folder, repo_id, eval_report, sweep)))
    return path
