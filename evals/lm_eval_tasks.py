"""Offline lm-eval tasks over the bundled corpus: render `evals/tasks/*.yaml.in` next to generated JSONL data.

The templates ship with the package; the data is generated from the installed corpus's held-out test split
into a cache folder keyed by a content hash, so data paths inside the YAML are absolute wherever moequant is
installed and nothing is ever downloaded (`dataset_path: json` on local files).

    folder = materialize()                       # idempotent, ~0.5 s the first time
    TaskManager(include_path=str(folder), include_defaults=False)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import string
import tempfile
from pathlib import Path

from moequant.calibration.corpus import DOMAIN_DESCRIPTIONS, DOMAINS, corpus_file, load_documents

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the generated data changes for the same corpus
PPL_TAG = "moequant_ppl"
CONT_TASK = "moequant_cont"
PPL_TASKS = tuple(f"{PPL_TAG}_{d}" for d in DOMAINS)
OFFLINE_TASKS = (*PPL_TASKS, CONT_TASK)
DEFAULT_TASKS = (PPL_TAG, CONT_TASK)

DOC_CHARS = 1200  # perplexity documents: consecutive blocks packed up to this size (~400 tokens, one window)
CONT_ITEMS = 100  # multiple-choice items per domain
CONT_CONTEXT_CHARS = 300  # context before the split point (cut back to a word start)
CONT_WORDS = 12  # words per choice (true continuation and distractors alike)
CONT_CHOICES = 4
CONT_SEED = 1234
CONT_MIN_SPACING = CONT_CONTEXT_CHARS // 2  # between the split points of two items
CONT_MIN_GAP = 1000  # distractors start at least this many characters away from the true continuation


def templates_dir() -> Path:
    return Path(__file__).resolve().parent / "tasks"


def is_offline_task(name: str) -> bool:
    return name in OFFLINE_TASKS or name == PPL_TAG


def _cache_root() -> Path:
    env = os.environ.get("MOEQUANT_CACHE")
    if env:
        return Path(env) / "lm_eval_tasks"
    return Path.home() / ".cache" / "moequant" / "lm_eval_tasks"


def _content_hash() -> str:
    h = hashlib.sha256(f"v{GENERATOR_VERSION}".encode())
    for t in sorted(templates_dir().glob("*.yaml.in")):
        h.update(t.name.encode() + t.read_bytes())
    for d in DOMAINS:
        h.update(corpus_file(d, "test").read_bytes())
    return h.hexdigest()[:16]


# ---- data ----------------------------------------------------------------------------------------


def ppl_documents(domain: str, max_chars: int = DOC_CHARS) -> list[str]:
    """The domain's test split as documents: consecutive blank-line blocks packed up to `max_chars`."""
    docs, cur = [], ""
    for block in load_documents("test", domain):
        if cur and len(cur) + 2 + len(block) > max_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{block}" if cur else block
    if cur:
        docs.append(cur)
    return docs


def continuation_items(domain: str, n_items: int = CONT_ITEMS, seed: int = CONT_SEED) -> list[dict]:
    """Multiple-choice items: context, the true next CONT_WORDS words, and same-length runs from elsewhere.

    A choice is the text from the end of one word to the end of the CONT_WORDS-th word after it (original
    whitespace kept, never crossing a blank line), so every choice starts with whitespace and has the same
    number of words. Split points are drawn with a fixed seed; distractors come from the same domain at least
    CONT_MIN_GAP characters away, so only the fit to the context tells them apart."""
    text = "\n\n".join(load_documents("test", domain))
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]  # words

    def run(i: int) -> str | None:  # the CONT_WORDS words from word i, with the whitespace before each
        if i < 1 or i + CONT_WORDS > len(spans):
            return None
        chunk = text[spans[i - 1][1] : spans[i + CONT_WORDS - 1][1]]
        return None if "\n\n" in chunk else chunk

    runs = [i for i in range(1, len(spans)) if run(i) is not None]
    candidates = [i for i in runs if spans[i - 1][1] >= CONT_CONTEXT_CHARS]
    rng = random.Random(f"{seed}:{domain}")
    items, used = [], []
    for i in rng.sample(candidates, len(candidates)):
        if len(items) == n_items:
            break
        p = spans[i - 1][1]  # split point: end of the last context word
        if any(abs(p - u) < CONT_MIN_SPACING for u in used):
            continue  # items share at most half their context
        ctx = text[p - CONT_CONTEXT_CHARS : p]
        cut = re.search(r"\s", ctx)  # begin the context at a word start
        ctx = ctx[cut.end() :] if cut else ctx
        true = run(i)
        distractors: list[str] = []
        for j in rng.sample(runs, min(len(runs), 16 * CONT_CHOICES)):
            d = run(j)
            if abs(spans[j - 1][1] - p) >= CONT_MIN_GAP and d != true and d not in distractors:
                distractors.append(d)
            if len(distractors) == CONT_CHOICES - 1:
                break
        if len(distractors) < CONT_CHOICES - 1 or not ctx.strip():
            continue
        label = rng.randrange(CONT_CHOICES)
        choices = distractors[:label] + [true] + distractors[label:]
        items.append({"context": ctx, "choices": choices, "label": label, "domain": domain})
        used.append(p)
    if len(items) < n_items:
        raise ValueError(f"domain {domain}: too little text for {n_items} continuation items")
    return items


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _render(folder: Path) -> None:
    ppl = string.Template((templates_dir() / "moequant_ppl.yaml.in").read_text())
    cont = string.Template((templates_dir() / "moequant_cont.yaml.in").read_text())
    for d in DOMAINS:
        _write_jsonl(folder / f"ppl_{d}.jsonl", ({"text": t, "domain": d} for t in ppl_documents(d)))
        (folder / f"moequant_ppl_{d}.yaml").write_text(
            ppl.substitute(domain=d, data=str(folder), description=json.dumps(DOMAIN_DESCRIPTIONS[d]))
        )
    per_domain = [continuation_items(d) for d in DOMAINS]
    # interleaved, so that --limit N sees every domain
    interleaved = [it for group in zip(*per_domain, strict=True) for it in group]
    _write_jsonl(folder / "cont.jsonl", interleaved)
    (folder / "moequant_cont.yaml").write_text(cont.substitute(data=str(folder)))


def materialize(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the rendered task YAMLs and their JSONL data (generated once per content hash)."""
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    folder = root / _content_hash()
    if (folder / "moequant_cont.yaml").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".render-", dir=root))
    try:
        _render_into(tmp, folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("rendered offline lm-eval tasks into %s", folder)
    return folder


def _render_into(tmp: Path, final: Path) -> None:
    """Write the files into `tmp` with every data path pointing at `final` (where `tmp` will be moved)."""
    _render(tmp)
    for y in tmp.glob("*.yaml"):
        y.write_text(y.read_text().replace(str(tmp), str(final)))
