"""`evaluate(quantized_folder, baseline)`: lm-eval, token perplexity, drift and sensitivity in one report.

Both models are loaded once and every measurement runs on the loaded objects:

    report = evaluate("tiny-moe-moequant-3.0b", config=EvalConfig(limit=20))   # baseline from quant_report
    write_report(report, "tiny-moe-moequant-3.0b/eval")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from moequant.calibration.data import CalibConfig, build_calibration
from moequant.errors import MoEQuantError
from moequant.evals.env_info import checkpoint_bytes, machine, today
from moequant.evals.lm_eval_tasks import DEFAULT_TASKS
from moequant.evals.sensitivity import ProbeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS  # lm-eval task names; () skips lm-eval
    limit: int | None = None  # documents per lm-eval task and perplexity windows per domain (None = all)
    lm_eval_batch_size: int = 8
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(samples=16, seq_len=256))  # drift tokens
    seq_len: int = 256  # token-perplexity window
    probe: ProbeConfig | None = field(default_factory=ProbeConfig)  # None skips the sensitivity probe
    batch_size: int = 8  # sequences per forward for drift and perplexity
    device: str | None = None  # None: cuda when available, else cpu
    progress: bool = True

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise MoEQuantError(f"--limit must be at least 1, got {self.limit}")


def read_moequant_folder(folder: str | Path) -> tuple[dict, dict]:
    """(config.json, quant_report.json or {}) of a complete moequant checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MoEQuantError(f"{folder} is not a model folder (no config.json)")
    config = json.loads(cfg_path.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "moequant":
        raise MoEQuantError(f"{folder} is not a moequant checkpoint (no moequant quantization_config)")
    if qc.get("status") != "complete":
        raise MoEQuantError(f"{folder} is an incomplete moequant checkpoint (status {qc.get('status')!r})")
    rep = folder / "quant_report.json"
    return config, json.loads(rep.read_text()) if rep.is_file() else {}


def resolve_baseline(folder: Path, baseline: str | None, quant_report: dict) -> str | None:
    """--baseline if given, else the model quant_report.json names (None = the bundled model)."""
    from moequant.checkpoint.bundled import is_bundled

    name = baseline if baseline is not None else quant_report.get("model")
    if name is None:
        raise MoEQuantError(f"{folder}/quant_report.json does not name the original model; pass --baseline")
    if is_bundled(name):
        return None
    if not Path(name).is_dir():
        from moequant.checkpoint.hub_source import is_hub_id, resolve_model

        if Path(name).exists() or not is_hub_id(name):
            raise MoEQuantError(
                f"baseline {name!r} is not a local model folder or Hub id; pass --baseline <the original model>"
            )
        return str(resolve_model(name))  # a Hub id (main revision): its cached or downloaded snapshot
    return name


def _device(config: EvalConfig) -> str:
    from moequant.runtime.devices import resolve_device

    return str(resolve_device(config.device))  # a device that is not there: one MoEQuantError line


@dataclass(frozen=True)
class _Loaded:
    """The tokenizer and both models every measurement runs on."""

    tok: object
    original: object  # the baseline model
    quant: object  # the moequant checkpoint

    def models(self) -> tuple[tuple[str, object], ...]:
        """(name, model) of the baseline, then of the quantized model: the order every measurement runs."""
        return (("baseline", self.original), ("quantized", self.quant))


def evaluate(quantized: str | Path, baseline: str | None = None, config: EvalConfig = EvalConfig()) -> dict:
    """The full report (a JSON-able dict) of a moequant checkpoint folder against its original model."""
    from moequant.checkpoint.bundled import bundled_model_path
    from moequant.evals.integrity import check

    t0 = time.perf_counter()
    folder = Path(quantized)
    qconfig, qrep = read_moequant_folder(folder)
    _check_tasks(config)  # unknown task names fail before any model loads
    base = resolve_baseline(folder, baseline, qrep)
    base_path = Path(base) if base is not None else bundled_model_path()
    device = _device(config)
    loaded = _load(folder, base, device)
    report = _report_head(folder, base, base_path, device, qrep, config)
    report["integrity"] = check(loaded.original, loaded.quant, qrep)
    timings = report["timings"]
    if config.tasks:
        report["lm_eval"] = _lm_eval(loaded, config, timings)
    report["perplexity"] = _perplexity(loaded, config, timings)
    drift = _drift(loaded, config, timings)
    report["drift"] = drift.to_json()
    if config.probe is not None:
        report["sensitivity"] = _sensitivity(loaded, drift, qconfig, config, timings).to_json()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _check_tasks(config: EvalConfig) -> None:
    """Raises on a task name lm-eval does not know (none to check when lm-eval is skipped)."""
    if config.tasks:
        from moequant.evals.quality import task_manager

        task_manager(list(config.tasks))


def _load(folder: Path, base: str | None, device: str) -> _Loaded:
    """The folder's tokenizer (else the baseline's), the baseline and the quantized model on `device`."""
    from moequant.checkpoint.loading import load_model, load_tokenizer

    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = load_tokenizer(str(folder) if has_tok else base)
    logger.info("loading %s and the baseline %s on %s", folder, base or "bundled", device)
    original = load_model(base, device=device)
    return _Loaded(tok, original, load_model(str(folder), device=device))


def _report_head(
    folder: Path, base: str | None, base_path: Path, device: str, qrep: dict, config: EvalConfig
) -> dict:
    """The report before any measurement: what was compared, where, both sizes and the settings."""
    return {
        "quantized": str(folder),
        "baseline": base or "bundled",
        "date": today(),
        "machine": machine(),
        "device": device,
        "sizes": {
            "baseline_bytes": checkpoint_bytes(base_path),
            "quantized_bytes": checkpoint_bytes(folder),
            "average_bits": qrep.get("average_bits"),
            "histogram": qrep.get("histogram"),
        },
        "config": {
            "tasks": list(config.tasks),
            "limit": config.limit,
            "calibration_samples": config.calib.samples,
            "calibration_seq_len": config.calib.seq_len,
            "seq_len": config.seq_len,
        },
        "timings": {},
    }


def _timed(timings: dict, name: str, fn):
    """fn(), its wall time in seconds recorded as timings[name]."""
    t = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - t, 2)
    return out


def _lm_eval(loaded: _Loaded, config: EvalConfig, timings: dict) -> dict:
    """The lm-eval section: both models' scores per task and metric, and the rows comparing them."""
    from moequant.evals.quality import run_lm_eval
    from moequant.evals.report import lm_eval_rows

    scores = {}
    for name, model in loaded.models():
        res = _timed(
            timings,
            f"lm_eval_{name}",
            lambda m=model: run_lm_eval(
                m, loaded.tok, list(config.tasks), config.limit, config.lm_eval_batch_size
            ),
        )
        scores[name] = {t: {k: s.to_json() for k, s in v.items()} for t, v in res.items()}
    return {
        "tasks": list(config.tasks),
        "limit": config.limit,
        "baseline": scores["baseline"],
        "quantized": scores["quantized"],
        "rows": lm_eval_rows(scores["baseline"], scores["quantized"]),
    }


def _perplexity(loaded: _Loaded, config: EvalConfig, timings: dict) -> dict:
    """The perplexity section: both models' token perplexity per domain of the bundled test split."""
    from moequant.evals.perplexity import perplexity

    ppl = {}
    for name, model in loaded.models():
        ppl[name] = _timed(
            timings,
            f"perplexity_{name}",
            lambda m=model: perplexity(
                m, loaded.tok, "test", config.seq_len, config.limit, config.batch_size
            ),
        )
    return {"windows": config.limit, "seq_len": config.seq_len, **ppl}


def _drift(loaded: _Loaded, config: EvalConfig, timings: dict):
    """Routing and per-expert drift of the quantized model on the calibration tokens (a DriftResult)."""
    from moequant.evals.drift import measure_drift

    data = build_calibration(loaded.tok, config.calib)
    return _timed(
        timings,
        "drift",
        lambda: measure_drift(loaded.original, loaded.quant, data, config.batch_size, config.progress),
    )


def _sensitivity(loaded: _Loaded, drift, qconfig: dict, config: EvalConfig, timings: dict):
    """The sensitivity probe (a ProbeResult) on the original model at the checkpoint's group size, choosing
    experts by the tokens the drift pass routed to them."""
    from moequant.evals.sensitivity import run_probes

    gs = int(qconfig["quantization_config"].get("group_size", config.probe.group_size))
    probe_cfg = dataclasses.replace(config.probe, group_size=gs)
    tokens = {(e.layer, e.expert): e.tokens for e in drift.experts}
    return _timed(timings, "sensitivity", lambda: run_probes(loaded.original, loaded.tok, tokens, probe_cfg))
