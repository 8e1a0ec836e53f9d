"""Budget sweep: quantize one model at several budgets and methods, measure each point, plot size vs quality.

Points (one checkpoint each, written, reloaded from disk and measured):

    planned   the budget planner at each average width in --bits: the plan `moequant quantize --bits B` makes
              (profile, damage table, layer probe, exact knapsack; GPTQ widths 2/3/4/8/keep)
    uniform   every expert GPTQ at one width: the integer widths of --bits (fractional ones are listed as skipped)
    rtn       every expert round-to-nearest at one width: the integer widths of --bits
    bnb-nf4   every expert bitsandbytes NF4 (one point)
    original  the unquantized checkpoint, for reference (always first)

Per point: size in GB of the weight files, average bits per expert weight, token perplexity on the bundled
test split, lm-eval scores, forward tokens/s (labelled with the path it ran), quantization time. The routing
profile and the calibrated damage table are computed once and shared by every planned point.

Recorded peers (`--peers FILE ...`): the ok rows of bench_peers.json files (python -m
moequant.evals.bench.peers) for the same model join the table and the Pareto plot as recorded points, marked
with their file and date; they are not re-run.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from moequant.calibration.data import CalibConfig, build_calibration
from moequant.calibration.profiler import ProfileConfig, profile_pass
from moequant.checkpoint.source import open_source
from moequant.config import WIDTHS, Method, QuantizeConfig, QuantSpec
from moequant.errors import MoEQuantError
from moequant.evals.env_info import checkpoint_bytes, code_version, machine, today
from moequant.plan.config import Budget, PlanConfig
from moequant.plan.knapsack import solve
from moequant.plan.planner import damage_for, make_uniform_plan
from moequant.quantize.pricing import gptq_pricing

logger = logging.getLogger(__name__)


class SweepMethod(enum.Enum):
    PLANNED = "planned"
    UNIFORM = "uniform"
    RTN = "rtn"
    BNB_NF4 = "bnb-nf4"

    @classmethod
    def parse_list(cls, spec: str) -> tuple[SweepMethod, ...]:
        out = []
        for name in (s.strip() for s in spec.split(",") if s.strip()):
            try:
                out.append(cls(name))
            except ValueError:
                raise MoEQuantError(
                    f"unknown sweep method {name!r}; choose from {', '.join(m.value for m in cls)}"
                ) from None
        if not out:
            raise MoEQuantError("no sweep method given")
        return tuple(dict.fromkeys(out))


def parse_bits(spec: str) -> tuple[float, ...]:
    try:
        bits = tuple(float(b) for b in spec.split(",") if b.strip())
    except ValueError:
        raise MoEQuantError(f"--bits takes numbers separated by commas, got {spec!r}") from None
    if not bits or any(not 0 < b <= 16 for b in bits):
        raise MoEQuantError(f"--bits values must be in (0, 16], got {spec!r}")
    return bits


@dataclass(frozen=True)
class SweepConfig:
    bits: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    methods: tuple[SweepMethod, ...] = tuple(SweepMethod)
    tasks: tuple[str, ...] = ("moequant_cont",)  # lm-eval tasks per point; () skips lm-eval
    limit: int | None = None  # lm-eval documents per task and perplexity windows per domain
    calib: CalibConfig = field(default_factory=CalibConfig)  # quantization calibration
    group_size: int = 128
    seq_len: int = 256  # perplexity window
    batch_size: int = 8
    include_original: bool = True
    keep: bool = False  # keep every point's checkpoint (with its model card) under <name>_points/
    throughput: bool = True
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise MoEQuantError(f"--limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class _Point:
    label: str
    method: SweepMethod
    target_bits: float


def plan_points(config: SweepConfig) -> tuple[list[_Point], list[str]]:
    """The points to run, and one line per requested (method, bits) that cannot run, saying why."""
    points, skipped = [], []
    for m in config.methods:
        if m is SweepMethod.BNB_NF4:
            points.append(_Point("bnb-nf4", m, 4.0))
            continue
        for b in config.bits:
            if m is SweepMethod.PLANNED:
                points.append(_Point(f"planned-{b:g}b", m, b))
            elif float(b) != int(b) or int(b) not in WIDTHS:
                skipped.append(f"{m.value} {b:g} bits: uniform widths are {', '.join(map(str, WIDTHS))}")
            else:
                points.append(_Point(f"{m.value}-{int(b)}b", m, b))
    return points, skipped


class _Planner:
    """Plans for every point. The planned points come from the same planner as `moequant quantize --bits`
    (profile, damage table, layer probe, exact knapsack): the profile and the calibrated damage table are
    computed once, on the first planned point, and solved for each budget."""

    def __init__(self, model, data, config: SweepConfig):
        self.model, self.data, self.config = model, data, config
        self._table = None

    def __call__(self, point: _Point):
        gs = self.config.group_size
        if point.method is SweepMethod.PLANNED:
            return solve(self._damage(), Budget(bits=point.target_bits))
        spec = {
            SweepMethod.UNIFORM: QuantSpec(Method.GPTQ, int(point.target_bits), gs),
            SweepMethod.RTN: QuantSpec(Method.RTN, int(point.target_bits), gs),
            SweepMethod.BNB_NF4: QuantSpec(Method.BNB_NF4, 4, gs),
        }[point.method]
        return make_uniform_plan(self.model, spec)

    def _damage(self):
        if self._table is None:
            source = open_source(self.model, lazy_experts=True)
            profile_config = ProfileConfig(batch_size=self.config.batch_size, progress=self.config.progress)
            profile = profile_pass(source, self.data, profile_config)
            plan_config = PlanConfig(Budget(bits=3.0), group_size=self.config.group_size)  # budget: per point
            self._table = damage_for(
                self.model, profile, plan_config, self.data, source=source, pricing=gptq_pricing()
            )
        return self._table


def _measure(model, tok, config: SweepConfig) -> dict:
    from moequant.evals.perplexity import perplexity
    from moequant.evals.quality import run_lm_eval
    from moequant.evals.throughput import backend_label, tokens_per_second

    t0 = time.perf_counter()
    out: dict = {}
    ppl = perplexity(model, tok, "test", config.seq_len, config.limit, config.batch_size)
    out["ppl"], out["ppl_by_domain"] = ppl["overall"], {k: v for k, v in ppl.items() if k != "overall"}
    out["scores"] = {}
    if config.tasks:
        res = run_lm_eval(model, tok, list(config.tasks), config.limit, config.batch_size)
        for task, metrics in res.items():
            for metric, s in metrics.items():
                if metric != "sample_len":
                    out["scores"][f"{task}:{metric}"] = s.to_json()
    if config.throughput:
        out["tokens_per_s"] = tokens_per_second(model, seq_len=config.seq_len)
        out["throughput_path"] = backend_label(model)
    out["measure_s"] = round(time.perf_counter() - t0, 2)
    return out


def _load() -> float:
    """1-minute load average (what else ran on the machine matters for tokens/s)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


@dataclass(frozen=True)
class _SweepRun:
    """What every point of one sweep shares, and what its record states beside the points."""

    model: str | None  # as local_model returns it: a Hub id is its snapshot folder; None or an alias: bundled
    model_path: Path  # the original's folder, for its size
    config: SweepConfig
    command: str | None
    device: str
    tok: object
    data: object  # the calibration every quantized point uses (CalibData)
    qconfig: QuantizeConfig
    t_start: float  # time.perf_counter() at the start
    load_start: float  # 1-minute load average at the start
    peers: tuple[dict, ...] = ()  # recorded peer points (load_peers), drawn and listed beside the sweep's


def run_sweep(
    model: str | None,
    config: SweepConfig,
    out_dir: str | Path,
    name: str = "sweep",
    command: str | None = None,
    peers: list[dict] | None = None,
) -> dict:
    """Run every point; write <out_dir>/<name>.json, .csv, .md and <name>_pareto.png; return the JSON dict.
    `peers`: recorded peer points (load_peers) for the table and the plot, not re-run."""
    from moequant.checkpoint.hub_source import local_model

    model = local_model(model, progress=config.progress)  # a Hub id: its snapshot, before any slow pass
    t_start, load_start = time.perf_counter(), _load()
    device = _device(config)  # a device that is not there: refused before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points_dir = out / f"{name}_points"
    points, skipped = plan_points(config)
    for s in skipped:
        logger.warning("sweep: skipping %s", s)
    run = _start(model, config, command, device, t_start, load_start, tuple(peers or ()))
    planner = _Planner(model, run.data, config)
    rows: list[dict] = []
    if config.include_original:
        rows.append(_measure_original(run))
    for k, p in enumerate(points, 1):
        logger.info("sweep point %d/%d: %s", k, len(points), p.label)
        t0 = time.perf_counter()
        try:
            plan = planner(p)  # the first planned point also pays for the shared profile pass
        except MoEQuantError as err:  # e.g. a budget below what the narrowest width needs
            skipped.append(f"{p.label}: {err}")
            logger.warning("sweep: skipping %s (%s)", p.label, err)
            continue
        rows.append(_run_point(run, p, plan, points_dir / p.label, t0))
        write_sweep(_record(run, skipped, rows), out, name)  # a long sweep keeps what it measured if stopped
    if points_dir.exists() and not any(points_dir.iterdir()):
        points_dir.rmdir()
    final = _record(run, skipped, rows)
    write_sweep(final, out, name)
    if config.keep:
        _document_kept_points(rows, points_dir, out / f"{name}_pareto.png", final)
    return final


def _device(config: SweepConfig) -> str:
    """The device the points load on (a device that is not there: one MoEQuantError line)."""
    from moequant.runtime.devices import resolve_device

    return str(resolve_device(config.device))


def _start(
    model: str | None,
    config: SweepConfig,
    command: str | None,
    device: str,
    t_start: float,
    load_start: float,
    peers: tuple[dict, ...] = (),
) -> _SweepRun:
    """The tokenizer, the calibration data and the original's folder: what every point shares."""
    from moequant.checkpoint.bundled import bundled_model_path, is_bundled
    from moequant.checkpoint.loading import load_tokenizer, resolve_model_path

    tok = load_tokenizer(model)
    data = build_calibration(tok, config.calib)
    model_path = Path(bundled_model_path() if is_bundled(model) else resolve_model_path(model))
    qconfig = QuantizeConfig(batch_size=config.batch_size, progress=config.progress)  # library defaults
    return _SweepRun(
        model, model_path, config, command, device, tok, data, qconfig, t_start, load_start, peers
    )


def _record(run: _SweepRun, skipped: list[str], rows: list[dict]) -> dict:
    """The sweep's JSON record so far: what ran where, its settings, the skipped points and every row."""
    config = run.config
    return {
        "model": str(run.model or "bundled"),
        "command": run.command,
        "moequant": code_version(),
        "date": today(),
        "machine": machine(),
        "device": run.device,
        "config": {
            "bits": list(config.bits),
            "methods": [m.value for m in config.methods],
            "tasks": list(config.tasks),
            "limit": config.limit,
            "calibration": run.data.description,
            "group_size": config.group_size,
            "seq_len": config.seq_len,
            "quantize": run.qconfig.to_json(),
        },
        "skipped": skipped,
        "seconds": round(time.perf_counter() - run.t_start, 1),
        "load_average": [run.load_start, _load()],
        "points": rows,
        "peers": list(run.peers),
    }


def _measure_original(run: _SweepRun) -> dict:
    """The row of the unquantized model: its size and measurements."""
    from moequant.checkpoint.loading import load_model

    logger.info("sweep: measuring the original model")
    m = load_model(run.model, device=run.device)
    row = {"label": "original", "method": "original", "target_bits": 16.0, "average_bits": 16.0}
    row |= {"size_gb": checkpoint_bytes(run.model_path) / 1e9, "quantize_s": None}
    return row | _measure(m, run.tok, run.config)


def _run_point(run: _SweepRun, p: _Point, plan, folder: Path, t0: float) -> dict:
    """Quantize one point's plan into `folder`, reload it from disk and measure it; its row. The folder (with
    its model card) stays only with --keep. `t0`: when the point started, planning included."""
    from moequant.checkpoint.loading import load_model
    from moequant.evals.card import write_card
    from moequant.quantize.run import quantize

    summary = quantize(
        run.model,
        plan,
        run.data,
        folder,
        run.qconfig,
        tokenizer=run.tok,
        overwrite=True,
        documents=(write_card,),
    )
    row = {
        "label": p.label,
        "method": p.method.value,
        "target_bits": p.target_bits,
        "average_bits": plan.average_bits(),
        "histogram": plan.histogram(),
        "size_gb": checkpoint_bytes(folder) / 1e9,
        "quantize_s": round(time.perf_counter() - t0, 2),
        "fallbacks": summary.fallbacks,
    }
    q = load_model(str(folder), device=run.device)
    row |= _measure(q, run.tok, run.config)
    del q
    if not run.config.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _document_kept_points(rows: list[dict], points_dir: Path, pareto_png: Path, final: dict) -> None:
    """Give every kept point's folder the sweep's record and Pareto plot, and its card the trade-off table."""
    from moequant.evals.card import write_card

    for r in rows:
        folder = points_dir / r["label"]
        if folder.is_dir():
            (folder / "sweep.json").write_text(json.dumps(final, indent=1))
            shutil.copyfile(pareto_png, folder / "sweep_pareto.png")
            write_card(folder)


def write_sweep(result: dict, out: Path, name: str) -> None:
    from moequant.evals import plots
    from moequant.evals.sweep_table import sweep_md, write_csv

    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    write_csv(result["points"], out / f"{name}.csv")
    peers = result.get("peers") or []
    plots.pareto(
        result["points"], out / f"{name}_pareto.png", "ppl", "token perplexity (test split)", peers=peers
    )
    cfg = result["config"]
    quantized = [p for p in result["points"] if p["method"] != "original"]
    front = [p["label"] for p in plots.pareto_front(quantized, "ppl")]
    lines = [
        f"# Budget sweep: {result['model']}",
        "",
        f"- date: {result['date']}",
        f"- machine: {result['machine']} (device: {result['device']}); moequant {result.get('moequant', '?')}",
        f"- command: `{result.get('command', '')}`" if result.get("command") else "",
        f"- calibration: {cfg['calibration']}; group size {cfg['group_size']}"
        + (
            "; quantize config: "
            + ", ".join(f"{k}={v}" for k, v in cfg["quantize"].items() if k != "progress")
            if cfg.get("quantize")
            else ""
        ),
        f"- quality: token perplexity over {'every' if cfg['limit'] is None else 'up to ' + str(cfg['limit'])} "
        f"window(s) of {cfg['seq_len']} tokens per domain of the bundled test split; lm-eval tasks "
        f"{', '.join(cfg['tasks']) or 'none'} (limit {cfg['limit'] or 'none'} documents per task)",
        "- size: bytes of the checkpoint's *.safetensors files; tokens/s: prefill forward, batch 4 x "
        f"{cfg['seq_len']} tokens, median of 3 ("
        + (
            "; ".join(dict.fromkeys(p["throughput_path"] for p in result["points"] if "throughput_path" in p))
            or "not measured"
        )
        + ")",
        f"- wall time: {result['seconds']} s"
        + (
            "; 1-min load average at start / end: " + " / ".join(f"{x:.1f}" for x in result["load_average"])
            if result.get("load_average")
            else ""
        )
        + " (tokens/s is indicative only on a shared machine)",
        *(f"- note: {n}" for n in result.get("notes", [])),
        "",
        sweep_md(result["points"], peers),
        "",
        f"Pareto front of the quantized points (none is both smaller and better), by size: {', '.join(front)}.",
        "",
        *_peer_lines(peers, cfg),
        f"![size vs perplexity]({name}_pareto.png)",
        "",
    ]
    if result.get("skipped"):
        lines += ["Skipped: " + "; ".join(result["skipped"]) + ".", ""]
    (out / f"{name}.md").write_text("\n".join(line for line in lines if line is not None))


def _peer_lines(peers: list[dict], cfg: dict) -> list[str]:
    """The markdown's note on recorded peer points: where they come from and how they were measured."""
    if not peers:
        return []
    files = dict.fromkeys(f"`{p['source']}` ({p['date']})" for p in peers)
    lines = [
        f"Recorded peer points (not re-run, not in the Pareto front above; drawn as open markers): "
        f"{len(peers)} from {', '.join(files)}. Their perplexity covers every {peers[0]['seq_len']}-token "
        "window of the test split"
        + (f", this sweep's at most {cfg['limit']} per domain" if cfg.get("limit") is not None else "")
        + "; their size is the model's weight bytes as the peers benchmark counts it.",
        "",
    ]
    return lines


PEERS_FORMAT = "moequant-peers-bench/1"  # evals/bench/peers.py writes it into bench_peers.json
_PEER_ROW_KEYS = ("tool", "variant", "bits", "bits_per_weight", "size_bytes", "ppl", "status")


def _model_key(model) -> str:
    from moequant.checkpoint.bundled import is_bundled

    return "bundled" if is_bundled(model) else str(model)


def load_peers(paths: list[str | Path], model: str | None, seq_len: int = 256) -> list[dict]:
    """Recorded peer points from bench_peers.json files (python -m moequant.evals.bench.peers): one point per ok
    row of `model`, labelled by tool and marked with its file and date. A file that is not such a JSON: one
    MoEQuantError; rows of another model are skipped with a warning, failed rows with an info line."""
    want = _model_key(model)
    points: list[dict] = []
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise MoEQuantError(f"--peers {path}: cannot read it as JSON ({err})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        bad = not isinstance(rows, list) or any(
            not isinstance(r, dict) or any(k not in r for k in _PEER_ROW_KEYS) for r in rows
        )
        if bad or data.get("format") != PEERS_FORMAT:
            raise MoEQuantError(
                f"--peers {path}: not a peers benchmark JSON (format {PEERS_FORMAT!r} with rows of "
                f"{', '.join(_PEER_ROW_KEYS)}; python -m moequant.evals.bench.peers writes one)"
            )
        date = str((data.get("meta") or {}).get("date", "undated"))[:10]
        other = [r for r in rows if _model_key(r.get("model", data.get("model"))) != want]
        if other:
            logger.warning(
                "--peers %s: skipping %d row(s) of model %s (this sweep: %s)",
                path, len(other), other[0].get("model", data.get("model")), want,
            )  # fmt: skip
        failed = [r for r in rows if r not in other and r["status"] != "ok"]
        if failed:
            logger.info("--peers %s: skipping %d failed row(s)", path, len(failed))
        if data.get("seq_len", seq_len) != seq_len:
            logger.warning(
                "--peers %s: perplexity windows of %s tokens, this sweep's %d", path, data["seq_len"], seq_len
            )
        for r in rows:
            if r in other or r in failed:
                continue
            name = r.get("label") or r["tool"]
            points.append(
                {
                    "label": f"{name} W{r['bits']} {r['variant']}",
                    "method": f"{name} {r.get('version') or ''}".strip(),
                    "tool": r["tool"],
                    "variant": r["variant"],
                    "target_bits": float(r["bits"]),
                    "average_bits": float(r["bits_per_weight"]),
                    "size_gb": r["size_bytes"] / 1e9,
                    "size_kind": r.get("size_kind"),
                    "ppl": float(r["ppl"]["overall"]),
                    "ppl_by_domain": {k: v for k, v in r["ppl"].items() if k != "overall"},
                    "quantize_s": r.get("wall_s"),
                    "source": path.name,
                    "date": date,
                    "seq_len": data.get("seq_len", 256),
                    "recorded": True,
                }
            )
    return points
