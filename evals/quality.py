"""lm-eval on an already-loaded model: the offline bundled-corpus tasks plus any lm-eval task name.

`run_lm_eval(model, tokenizer, tasks, limit)` wraps the model object in `HFLM` (no reload, no download),
renders the offline tasks (lm_eval_tasks.py), and returns {task: {metric: Score}}. When every task is one of
the bundled offline tasks, the Hub and datasets libraries are switched to offline mode for the duration of
the call, so nothing can reach the network; a task from lm-eval's own catalogue fetches its data the usual
way (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set by the user are respected) and fails with a clear error where
its data cannot be had.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass

from moequant.errors import MoEQuantError
from moequant.evals.lm_eval_tasks import DEFAULT_TASKS, is_offline_task, materialize

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None  # None where lm-eval gives none (perplexities)

    def to_json(self) -> dict:
        return {"value": self.value, "stderr": self.stderr}


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in LOWER_IS_BETTER)


def parse_tasks(spec: str | None) -> list[str]:
    """ "T1,T2" -> ["T1", "T2"]; None or "" -> the offline defaults."""
    if not spec:
        return list(DEFAULT_TASKS)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise MoEQuantError(f"no task in --tasks {spec!r}")
    return tasks


@contextlib.contextmanager
def offline_hub():
    """HF Hub + datasets in offline mode (env vars and the already-imported constants), restored after."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    patched = []
    try:
        import huggingface_hub.constants as hc

        patched.append((hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE))
        import datasets.config as dc

        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(dc, name):
                patched.append((dc, name, getattr(dc, name)))
    except ImportError:
        pass
    try:
        for k in keys:
            os.environ[k] = "1"
        for mod, name, _ in patched:
            setattr(mod, name, True)
        yield
    finally:
        for mod, name, old in patched:
            setattr(mod, name, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _no_git_probe():
    """lm-eval records the git hash of the working directory by running `git`, which prints to stderr
    outside a repository; the hash of the caller's cwd means nothing for these results."""
    import lm_eval.evaluator as ev

    saved = getattr(ev, "get_git_commit_hash", None)
    if saved is not None:
        ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if saved is not None:
            ev.get_git_commit_hash = saved


def task_manager(tasks: list[str]):
    from lm_eval.tasks import TaskManager

    folder = materialize()
    include_defaults = not all(is_offline_task(t) for t in tasks)  # indexing the catalogue costs seconds
    tm = TaskManager(include_path=str(folder), include_defaults=include_defaults, verbosity="ERROR")
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise MoEQuantError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (offline tasks: {', '.join(DEFAULT_TASKS)}, "
            "moequant_ppl_<domain>; or any lm-eval task name)"
        )
    return tm


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    offline: bool | None = None,
) -> dict[str, dict[str, Score]]:
    """{task: {metric: Score}} for an in-memory causal LM. `limit`: documents per task (None = all).

    `offline`: None = offline exactly when every task is a bundled offline task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        lm_logger.setLevel(logging.ERROR)
    if offline is None:
        offline = all(is_offline_task(t) for t in tasks)
    guard = offline_hub() if offline else contextlib.nullcontext()
    try:
        with guard, _no_git_probe():
            tm = task_manager(tasks)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=1000,
                verbosity="ERROR",
            )
    except MoEQuantError:
        raise
    except Exception as err:  # dataset download refused offline, bad task config...
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = (
            "" if offline else " (catalogue tasks need network access or their data in the HF datasets cache)"
        )
        raise MoEQuantError(
            f"lm-eval failed on {', '.join(tasks)}: {type(err).__name__}: {msg}{hint}"
        ) from err
    finally:
        lm_logger.setLevel(level)
    return _scores(out["results"])


def _scores(results: dict) -> dict[str, dict[str, Score]]:
    out: dict[str, dict[str, Score]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, int | float) or name == "alias":
                continue
            err = metrics.get(f"{name}_stderr,{filt}")
            err = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
            row[name] = Score(float(value), err)
        if row:
            out[task] = row
    return dict(sorted(out.items()))
