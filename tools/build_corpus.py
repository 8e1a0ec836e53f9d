#!/usr/bin/env python
"""Rebuild the bundled multi-domain corpus in calibration/corpus/ from its offline sources.

Sources (pinned; see calibration/corpus/SOURCES.md for licences):
  english  r-cran-janeaustenr 1.0.0-1   Pride and Prejudice + the start of Persuasion (public domain)
  code     CPython 3.11.7 standard library (PSF licence), a spread of ~1 MB of Lib/**.py modules
  french   maint-guide-fr 1.2.53, debian-faq-fr 11.1, developers-reference-fr 12.18 (plain-text manuals)
  german   fortunes-de 0.35-1      (fortune cookies, UTF-8)
  spanish  fortunes-es 1.36        (fortune cookies, without the offensive section)
  italian  fortunes-it 1.99-4.1    (fortune cookies)

The build is deterministic: the same package versions and the same Python tree give byte-identical files.
Each domain is a list of documents (a chapter paragraph, a fortune, a source file, a manual paragraph) in
source order; documents are deduplicated, evenly subsampled to about --target-bytes, then cut into 40
contiguous blocks by byte offset: blocks 5 and 25 are validation, blocks 15 and 35 test (~5% each, two
contiguous stretches per split, so nothing is shuffled line by line). Finally every line of 40+ characters
that occurs in validation or test is removed from train (decontamination; the count is reported).

Usage:
    python tools/build_corpus.py                      # apt-get download the pinned .debs into a temp dir
    python tools/build_corpus.py --debs /path/to/debs # use already downloaded .deb files
    python tools/build_corpus.py --check              # rebuild into a temp dir and compare with the repo
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import lzma
import os
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "calibration" / "corpus"

PACKAGES = {  # Debian bookworm package -> pinned version
    "r-cran-janeaustenr": "1.0.0-1",
    "maint-guide-fr": "1.2.53",
    "debian-faq-fr": "11.1",
    "developers-reference-fr": "12.18",
    "fortunes-de": "0.35-1",
    "fortunes-es": "1.36",
    "fortunes-it": "1.99-4.1",
}
PYTHON_LIB = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")  # CPython 3.11.7 (pyenv build)

DOMAINS = ("english", "code", "french", "german", "spanish", "italian")
SPLITS = ("train", "validation", "test")
N_BLOCKS = 40
HELD_OUT = {"validation": (5, 25), "test": (15, 35)}  # block indices; the rest is train
DECONTAM_MIN_CHARS = 40  # lines at least this long (stripped) may not appear in both train and held-out
DEDUPE_MIN_CHARS = 40  # shorter documents are never treated as duplicates
TARGET_BYTES = 1_000_000  # per domain, before the split
CONTIGUOUS = ("english",)  # domains cut to size by truncation (prose), not by even subsampling


# ----------------------------------------------------------------------------------------------------------
# fetching


def fetch_debs(dest: Path) -> Path:
    """apt-get download every pinned package into `dest` (needs `apt-get update` once)."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{p}={v}" for p, v in PACKAGES.items()]
    subprocess.run(["apt-get", "download", *specs], cwd=dest, check=True)
    return dest


def extract_debs(debs: Path, root: Path) -> dict[str, Path]:
    """dpkg -x each pinned package into root/<package>; returns package -> folder."""
    out = {}
    for pkg, version in PACKAGES.items():
        ver = version.split(":")[-1]
        candidates = sorted(debs.glob(f"{pkg}_{ver}_*.deb"))
        if not candidates:
            sys.exit(f"missing {pkg}_{ver}_*.deb in {debs} (apt-get download {pkg}={version})")
        folder = root / pkg
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(candidates[0]), str(folder)], check=True)
        out[pkg] = folder
    return out


# ----------------------------------------------------------------------------------------------------------
# a minimal reader for R's serialization format (enough for the character vectors of janeaustenr)


class _RReader:
    def __init__(self, data: bytes):
        self.b, self.p, self.refs = data, 0, []
        self.attrs: dict[int, object] = {}  # id(vector) -> its attribute pairlist

    def int(self) -> int:
        (v,) = struct.unpack(">i", self.b[self.p : self.p + 4])
        self.p += 4
        return v

    def item(self):
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if typ in (254, 242, 253):  # NILVALUE, EMPTYENV, GLOBALENV
            return None
        if typ == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if typ == 1:  # SYMSXP
            sym = ("sym", self.item())
            self.refs.append(sym)
            return sym
        if typ == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p : self.p + n].decode("utf-8", "replace")
            self.p += n
            return s
        if typ == 2:  # LISTSXP (pairlist)
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            return ("pairlist", tag, self.item(), self.item(), attr)
        if typ in (16, 19):  # STRSXP, VECSXP
            value = [self.item() for _ in range(self.int())]
        elif typ in (10, 13):  # LGLSXP, INTSXP
            n = self.int()
            value = list(struct.unpack(f">{n}i", self.b[self.p : self.p + 4 * n]))
            self.p += 4 * n
        elif typ == 14:  # REALSXP
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.b[self.p : self.p + 8 * n]))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R SEXP type {typ}")
        if has_attr:
            self.attrs[id(value)] = self.item()
        return value

    def top(self):
        self.p = 2  # "X\n"
        version = self.int()
        self.int(), self.int()  # writer / min reader versions
        if version == 3:
            n = self.int()  # native encoding name
            self.p += n
        return self.item()


def _r_names_attr(pairlist) -> list[str]:
    """The `names` attribute out of an attribute pairlist."""
    while pairlist is not None:
        _, tag, car, cdr, _ = pairlist
        if tag and tag[1] == "names":
            return car
        pairlist = cdr
    raise ValueError("R object without names")


def read_rdata_db(folder: Path) -> dict[str, list[str]]:
    """The objects of an R lazy-load database (data/Rdata.rdb + .rdx), by name."""
    reader = _RReader(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    index = reader.top()  # list(variables = <named list of (offset, length)>, references, compressed)
    names = _r_names_attr(reader.attrs.get(id(index[0])))
    rdb = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(names, index[0], strict=True):
        chunk = rdb[offset : offset + length]  # 4-byte length, then a zlib stream (or a type byte + stream)
        try:
            data = zlib.decompress(chunk[4:])
        except zlib.error:
            kind = chunk[4:5]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}[kind](chunk[5:])
        out[name] = _RReader(data).top()
    return out


# ----------------------------------------------------------------------------------------------------------
# per-domain documents


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def english_docs(pkg_dirs) -> list[str]:
    """Paragraphs of two Austen novels, wrapped lines joined into one line per paragraph."""
    data = read_rdata_db(pkg_dirs["r-cran-janeaustenr"] / "usr/lib/R/site-library/janeaustenr/data")
    docs = []
    for book in ("prideprejudice", "persuasion"):
        para: list[str] = []
        for line in data[book] + [""]:
            line = (line or "").strip()
            if line:
                para.append(line)
            elif para:
                docs.append(_normalize(" ".join(para)))
                para = []
    return docs


_CODE_SKIP = re.compile(
    r"(^|/)(test|tests|idlelib|lib2to3|turtledemo|ensurepip|pydoc_data|encodings|site-packages|"
    r"config-3\.11[^/]*|__phello__)(/|$)"
)


def code_docs() -> list[str]:
    """Standard-library modules (top level and one package level), 1-30 KB each, in path order."""
    if not PYTHON_LIB.is_dir():
        sys.exit(f"{PYTHON_LIB} not found: the code domain is built from CPython 3.11.7's Lib/")
    paths = sorted(PYTHON_LIB.glob("*.py")) + sorted(PYTHON_LIB.glob("*/*.py"))
    docs = []
    for path in sorted(paths, key=lambda p: p.relative_to(PYTHON_LIB).as_posix()):
        rel = path.relative_to(PYTHON_LIB).as_posix()
        if _CODE_SKIP.search(rel) or not (1_000 <= path.stat().st_size <= 30_000):
            continue
        text = path.read_text(encoding="utf-8")
        if text.startswith("#!"):
            text = text.split("\n", 1)[1]
        text = _normalize(text.expandtabs(8))
        if text:
            docs.append(text)
    return docs


_UNDERLINE = re.compile(r"^\s*([~=\-*_#])\1{2,}\s*$")


def french_docs(pkg_dirs) -> list[str]:
    """Paragraphs of three French Debian manuals (plain-text renderings), underline rules dropped."""
    files = [
        pkg_dirs["maint-guide-fr"] / "usr/share/doc/maint-guide-fr/maint-guide.fr.txt.gz",
        pkg_dirs["debian-faq-fr"] / "usr/share/doc/debian/FAQ/debian-faq.fr.txt.gz",
        pkg_dirs["developers-reference-fr"] / "usr/share/developers-reference/fr/developers-reference.txt.gz",
    ]
    docs = []
    for f in files:
        text = _normalize(gzip.decompress(f.read_bytes()).decode("utf-8").expandtabs(8))
        lines = [line for line in text.split("\n") if not _UNDERLINE.match(line)]
        for para in re.split(r"\n\s*\n", "\n".join(lines)):
            para = para.strip("\n")
            if para.strip():
                docs.append(para)
    return docs


def _looks_like_art(text: str) -> bool:
    visible = [c for c in text if not c.isspace()]
    return not visible or sum(c.isalpha() for c in visible) < 0.6 * len(visible)


def fortune_docs(folder: Path, skip: tuple[str, ...]) -> list[str]:
    """Fortunes of every UTF-8 (.u8) cookie file in `folder` (not in subfolders), in file-name order."""
    docs = []
    for f in sorted(folder.glob("*.u8")):
        if f.name[: -len(".u8")] in skip:
            continue
        raw = f.read_bytes().decode("utf-8", "replace")
        for cookie in re.split(r"(?m)^%\s*$", raw):
            lines = []
            for line in cookie.expandtabs(8).split("\n"):
                if re.match(r"^\s+--\s", line):  # attribution: one fixed indent
                    line = "    " + line.strip()
                lines.append(line)
            text = _normalize("\n".join(lines))
            if text and not _looks_like_art(text):
                docs.append(text)
    return docs


def domain_docs(domain: str, pkg_dirs) -> list[str]:
    if domain == "english":
        return english_docs(pkg_dirs)
    if domain == "code":
        return code_docs()
    if domain == "french":
        return french_docs(pkg_dirs)
    if domain == "german":
        return fortune_docs(
            pkg_dirs["fortunes-de"] / "usr/share/games/fortunes/de", skip=("asciiart", "translations")
        )
    if domain == "spanish":
        return fortune_docs(pkg_dirs["fortunes-es"] / "usr/share/games/fortunes/es", skip=())
    if domain == "italian":
        return fortune_docs(pkg_dirs["fortunes-it"] / "usr/share/games/fortunes/it", skip=("banner",))
    raise ValueError(domain)


# ----------------------------------------------------------------------------------------------------------
# dedupe, subsample, split, decontaminate


def _is_attribution(line: str) -> bool:
    return line.lstrip().startswith("-- ")


def dedupe(docs: list[str]) -> list[str]:
    """Drop repeated documents (case and whitespace folded, attribution lines ignored); documents shorter
    than DEDUPE_MIN_CHARS (a novel's '"Oh!"' paragraph) are kept as they are."""
    seen, out = set(), []
    for d in docs:
        body = " ".join(line for line in d.split("\n") if not _is_attribution(line))
        body = " ".join(body.split()).lower()
        if len(body) >= DEDUPE_MIN_CHARS:
            key = hashlib.sha1(body.encode()).digest()
            if key in seen:
                continue
            seen.add(key)
        out.append(d)
    return out


def subsample(docs: list[str], target_bytes: int, contiguous: bool = False) -> list[str]:
    """Keep an evenly spread subset of documents of about target_bytes (all of them if fewer); with
    `contiguous`, the leading documents instead (a novel keeps its paragraphs in sequence)."""
    total = sum(len(d.encode()) + 2 for d in docs)
    if total <= target_bytes:
        return docs
    if contiguous:
        out, size = [], 0
        for d in docs:
            size += len(d.encode()) + 2
            if size > target_bytes:
                break
            out.append(d)
        return out
    frac = target_bytes / total
    return [d for i, d in enumerate(docs) if int((i + 1) * frac) > int(i * frac)]


def split_docs(docs: list[str]) -> dict[str, list[str]]:
    sizes = [len(d.encode()) + 2 for d in docs]
    total = sum(sizes)
    out = {s: [] for s in SPLITS}
    start = 0
    for doc, size in zip(docs, sizes, strict=True):
        block = start * N_BLOCKS // total
        split = next((s for s, blocks in HELD_OUT.items() if block in blocks), "train")
        out[split].append(doc)
        start += size
    return out


def _long_lines(doc: str):
    """Lines that may not be shared by train and held-out text (attributions such as '-- Platón.' may)."""
    for line in doc.split("\n"):
        line = line.strip()
        if len(line) >= DECONTAM_MIN_CHARS and not _is_attribution(line):
            yield line


def decontaminate(splits: dict[str, list[str]]) -> int:
    """Remove from train every long line that also occurs in validation or test; returns lines removed."""
    held = {line for s in ("validation", "test") for d in splits[s] for line in _long_lines(d)}
    removed = 0
    cleaned = []
    for d in splits["train"]:
        keep = []
        for line in d.split("\n"):
            if line.strip() in held and len(line.strip()) >= DECONTAM_MIN_CHARS and not _is_attribution(line):
                removed += 1
            else:
                keep.append(line)
        text = "\n".join(keep).strip("\n")
        if text.strip():
            cleaned.append(text)
    splits["train"] = cleaned
    return removed


def build(pkg_dirs, out_dir: Path, target_bytes: int) -> dict[str, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for domain in DOMAINS:
        docs = domain_docs(domain, pkg_dirs)
        n_raw = len(docs)
        docs = subsample(dedupe(docs), target_bytes, contiguous=domain in CONTIGUOUS)
        splits = split_docs(docs)
        removed = decontaminate(splits)
        stats[domain] = {"documents_raw": n_raw, "documents": len(docs), "decontaminated_lines": removed}
        for split, ds in splits.items():
            text = "\n\n".join(ds) + "\n"
            (out_dir / f"{domain}.{split}.txt").write_text(text, encoding="utf-8")
            stats[domain][split] = {"documents": len(ds), "bytes": len(text.encode())}
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debs", type=Path, help="folder with the pinned .deb files (default: apt-get download)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--target-bytes", type=int, default=TARGET_BYTES)
    ap.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        debs = args.debs or fetch_debs(tmp / "debs")
        pkg_dirs = extract_debs(debs, tmp / "x")
        out = tmp / "out" if args.check else args.out
        stats = build(pkg_dirs, out, args.target_bytes)
        total = 0
        for domain, st in stats.items():
            sizes = "  ".join(f"{s}={st[s]['bytes']:>8,d} B/{st[s]['documents']:>5d} docs" for s in SPLITS)
            print(
                f"{domain:8s} raw docs {st['documents_raw']:6d} kept {st['documents']:6d}  {sizes}  "
                f"decontaminated lines {st['decontaminated_lines']}"
            )
            total += sum(st[s]["bytes"] for s in SPLITS)
        print(f"total {total:,d} bytes")
        if args.check:
            diffs = [
                f.name
                for f in sorted(out.glob("*.txt"))
                if not (args.out / f.name).exists() or (args.out / f.name).read_bytes() != f.read_bytes()
            ]
            if diffs:
                sys.exit(f"differs from {args.out}: {', '.join(diffs)}")
            print(f"identical to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C.UTF-8")
    main()
