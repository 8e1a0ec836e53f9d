"""Calibration data: the bundled corpus, local .txt/.jsonl files, or a Hugging Face dataset.

A calibration *spec* is a string:
    None / "bundled"            the bundled multi-domain corpus (train split), domains mixed evenly
    path/to/file.txt            plain text
    path/to/file.jsonl          one JSON object per line with a "text" field
    name[:config][@split]       a Hugging Face dataset (e.g. "wikitext:wikitext-2-raw-v1"); needs the network
                                or a local datasets cache. "wikitext" alone means wikitext-2-raw-v1.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moequant.errors import CalibrationError
from moequant.runtime.ranks import Ranks

logger = logging.getLogger(__name__)

_ALIASES = {"wikitext": ("wikitext", "wikitext-2-raw-v1"), "c4": ("allenai/c4", "en")}


@dataclass(frozen=True)
class CalibConfig:
    spec: str | None = None  # see module docstring; None = bundled corpus
    samples: int = 128  # sequences
    seq_len: int = 256  # tokens per sequence
    seed: int = 0  # window sampling seed
    split: str = "train"  # bundled-corpus split
    sources: tuple[str, ...] = ()  # keep only these sources (domains) of the spec; empty: all

    def __post_init__(self):
        if self.samples <= 0:
            raise CalibrationError(f"--samples must be positive, got {self.samples}")
        if self.seq_len < 2:
            raise CalibrationError(f"--seq-len must be at least 2, got {self.seq_len}")


@dataclass
class CalibData:
    """Token windows for calibration: input_ids [N, L], one source label per window."""

    input_ids: torch.Tensor  # [N, L] int64
    labels: list[str]  # source (domain or file name) of each window
    description: str

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, batch_size: int):
        """Yield (input_ids [B, L], labels) in order."""
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size], self.labels[i : i + batch_size]

    def split(self, n: int) -> tuple[CalibData, CalibData]:
        return (
            CalibData(self.input_ids[:n], self.labels[:n], self.description),
            CalibData(self.input_ids[n:], self.labels[n:], self.description),
        )


def load_texts(spec: str | None, split: str = "train") -> tuple[dict[str, str], str]:
    """source name -> text, and a human description of the source."""
    if spec is None or spec in ("bundled", "default"):
        from moequant.calibration.corpus import load_split

        texts = load_split(split)
        return texts, f"bundled corpus ({split} split: {', '.join(texts)})"
    path = Path(spec)
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise CalibrationError(f"calibration file {spec} does not exist")
        return {path.stem: _read_file(path)}, f"local file {path}"
    return _load_hf_dataset(spec)


def _read_file(path: Path) -> str:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix not in (".jsonl", ".json"):
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f'{path}:{n}: each line must be a JSON object with a "text" string field')
        texts.append(obj["text"])
    return "\n\n".join(texts)


def _load_hf_dataset(spec: str) -> tuple[dict[str, str], str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if name in _ALIASES and not config:
        name, config = _ALIASES[name]
    split = split or "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # offline, unknown name, no permission: all end the same way for the user
        raise CalibrationError(
            f"could not load Hugging Face dataset {name!r} (config {config or 'default'}, split {split}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Without network access use "
            "the bundled corpus (no --calib) or a local .txt/.jsonl file."
        ) from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {name} has no 'text' column (columns: {ds.column_names})")
    return {name: "\n\n".join(t for t in ds["text"] if t)}, f"HF dataset {name}:{config}@{split}"


def _safe_cut(text: str, start: int, end: int) -> int:
    """Chunk end in (start, end]: just before a newline that a non-space character follows. Byte-level (GPT-2
    style) pre-tokenizers split a whitespace run's last character from the rest, so a cut there leaves the
    tokens unchanged (test: the bundled corpus tokenizes identically in chunks). Failing that, just before the
    whitespace character that starts a word; failing that, `end`."""
    cut = text.rfind("\n", start + 1, end)
    while cut > start:
        if cut + 1 < len(text) and not text[cut + 1].isspace():
            return cut
        cut = text.rfind("\n", start + 1, cut)
    starts = [m.start() for m in _WORD_START.finditer(text, start + 1, end)]  # whitespace before a non-space
    return starts[-1] if starts else end


_WORD_START = re.compile(r"\s(?=\S)")


def tokenize(tokenizer, text: str, chunk_chars: int = 1 << 16, ranks: Ranks = Ranks()) -> torch.Tensor:
    """Token ids of `text` [T] int64, tokenized in newline-aligned chunks: the fast tokenizer's per-token
    bookkeeping for a multi-MB text in one call costs ~1 GB; chunks keep it to a few MB.

    `ranks` (a torchrun launch, runtime/ranks.current()): each rank tokenizes every world-th chunk
    (Ranks.batch_owner) and the chunks' ids travel to every rank as tensors (Ranks.gather_batches), so every
    rank holds one process's ids; every rank must call it."""
    bounds = _chunk_bounds(text, chunk_chars)
    with ranks.guard("tokenizing the calibration text"):
        mine = {
            i: [_encode(tokenizer, text[a:b])]
            for i, (a, b) in enumerate(bounds)
            if ranks.batch_owner(i) == ranks.rank
        }
    ids = [ts[0].cpu() for ts in ranks.gather_batches(mine, len(bounds), ranks.wire)]  # [T_i] each
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def _chunk_bounds(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of `text`: at most `chunk_chars` characters, cut where tokens don't change
    (_safe_cut)."""
    bounds, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            end = _safe_cut(text, start, end)
        bounds.append((start, end))
        start = end
    return bounds


def _encode(tokenizer, text: str) -> torch.Tensor:
    """[T] int64 ids of one chunk (through numpy: a third of the time of torch.tensor over a list)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.from_numpy(np.asarray(ids, dtype=np.int64))


def build_calibration(tokenizer, config: CalibConfig = CalibConfig(), ranks: Ranks = Ranks()) -> CalibData:
    """Tokenize the spec's texts (split over `ranks`: tokenize) and cut `samples` windows of `seq_len` tokens.

    Windows are spread evenly across sources (domains), each source contributing non-overlapping windows at
    seeded random offsets, so the same config always gives the same tokens."""
    texts, description = load_texts(config.spec, config.split)
    texts = {k: v for k, v in texts.items() if v.strip()}
    if config.sources:
        missing = sorted(set(config.sources) - set(texts))
        if missing:
            raise CalibrationError(
                f"calibration sources {missing} are not in {description} (has {sorted(texts)})"
            )
        texts = {k: v for k, v in texts.items() if k in config.sources}
        description += f", sources {', '.join(sorted(texts))}"
    if not texts:
        raise CalibrationError(f"calibration data is empty: {description}")
    gen = torch.Generator().manual_seed(config.seed)
    ids = {k: tokenize(tokenizer, v, ranks=ranks) for k, v in texts.items()}
    usable = {k: v for k, v in ids.items() if v.numel() >= config.seq_len}
    if not usable:
        longest = max(v.numel() for v in ids.values())
        raise CalibrationError(
            f"calibration text is shorter than the sequence length: {longest} tokens < --seq-len {config.seq_len} "
            f"({description}); lower --seq-len or give more text"
        )
    names = sorted(usable)
    per_source = [config.samples // len(names) + (i < config.samples % len(names)) for i in range(len(names))]
    windows, labels = [], []
    for name, count in zip(names, per_source, strict=True):
        t = usable[name]
        n_windows = t.numel() // config.seq_len
        if count > n_windows:
            logger.warning(
                "%s has only %d windows of %d tokens; %d requested, sampling with overlap",
                name,
                n_windows,
                config.seq_len,
                count,
            )
            starts = torch.randint(0, t.numel() - config.seq_len + 1, (count,), generator=gen)
        else:
            starts = torch.randperm(n_windows, generator=gen)[:count] * config.seq_len
        for s in starts.tolist():
            windows.append(t[s : s + config.seq_len])
            labels.append(name)
    input_ids = torch.stack(windows)  # [N, L]
    return CalibData(
        input_ids, labels, f"{description}; {len(windows)} x {config.seq_len} tokens, seed {config.seed}"
    )
