"""The bundled multi-domain text corpus (about 5.7 MB, six domains, train/validation/test).

Plain UTF-8 files `corpus/<domain>.<split>.txt`, built by `tools/build_corpus.py` from Debian packages and
the CPython standard library; provenance and licences in `corpus/SOURCES.md`. Documents inside a file are
separated by a blank line; validation and test are contiguous stretches (~5% each) of every domain, and
no line of 40+ characters (other than a quotation's `-- Author` line) is shared with train.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DOMAINS: tuple[str, ...] = ("english", "code", "french", "german", "spanish", "italian")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

DOMAIN_DESCRIPTIONS: dict[str, str] = {
    "english": "English prose: Jane Austen, Pride and Prejudice and Persuasion",
    "code": "Python source: CPython 3.11 standard-library modules",
    "french": "French technical prose: Debian manuals (maint-guide, FAQ, developers' reference)",
    "german": "German quotations and jokes (fortunes-de)",
    "spanish": "Spanish quotations and proverbs (fortunes-es)",
    "italian": "Italian quotations and jokes (fortunes-it)",
}


def corpus_dir() -> Path:
    """The folder holding the corpus files (package data of moequant.calibration)."""
    return Path(__file__).resolve().parent / "corpus"


def corpus_file(domain: str, split: str) -> Path:
    _check_split(split)
    _check_domain(domain)
    return corpus_dir() / f"{domain}.{split}.txt"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {', '.join(SPLITS)}")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; expected one of {', '.join(DOMAINS)}")


def load_split(split: str, domains: str | Iterable[str] | None = None) -> dict[str, str]:
    """Text of one split per domain, `{domain: text}` in `DOMAINS` order (or the order given).

    `domains`: None for all, one domain name, or an iterable of names.
    """
    _check_split(split)
    if domains is None:
        names: tuple[str, ...] = DOMAINS
    elif isinstance(domains, str):
        names = (domains,)
    else:
        names = tuple(domains)
    if not names:
        raise ValueError("no corpus domain requested")
    for name in names:
        _check_domain(name)
    out = {}
    for name in names:
        path = corpus_file(name, split)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} is missing; rebuild with tools/build_corpus.py")
        out[name] = path.read_text(encoding="utf-8")
    return out


def load_documents(split: str, domain: str) -> list[str]:
    """The documents of one domain and split (they are separated by blank lines in the file).

    A code file or a manual paragraph may itself contain blank lines, so for those domains a "document"
    here is a blank-line separated block; that is all the structure the plain-text format keeps.
    """
    text = load_split(split, domain)[domain]
    return [block for block in text.split("\n\n") if block.strip()]
