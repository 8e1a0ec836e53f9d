"""The bundled corpus: every domain has its three splits, held-out text does not leak into train."""

import pytest

from moequant.calibration.corpus import DOMAINS, SPLITS, corpus_dir, corpus_file, load_documents, load_split

LONG = 40  # characters; the build removes such lines from train when they occur in validation or test


def _long_lines(text: str) -> set[str]:
    lines = (line.strip() for line in text.split("\n"))
    # quotation attributions ("-- Platón. (427-347 a.C.) Filósofo griego.") legitimately recur
    return {line for line in lines if len(line) >= LONG and not line.startswith("-- ")}


def test_domains_are_distinct_and_at_least_four():
    assert len(DOMAINS) >= 4
    assert len(set(DOMAINS)) == len(DOMAINS)
    assert SPLITS == ("train", "validation", "test")


@pytest.mark.parametrize("split", SPLITS)
def test_every_domain_has_every_split(split):
    texts = load_split(split)
    assert list(texts) == list(DOMAINS)
    for domain, text in texts.items():
        assert corpus_file(domain, split).is_file()
        assert len(text) > 10_000, (domain, split)
        assert "\r" not in text and "\ufffd" not in text


def test_split_sizes():
    """validation and test are each roughly 5% of a domain; the committed corpus stays small."""
    total = 0
    for domain in DOMAINS:
        sizes = {s: corpus_file(domain, s).stat().st_size for s in SPLITS}
        whole = sum(sizes.values())
        total += whole
        for held_out in ("validation", "test"):
            assert 0.03 < sizes[held_out] / whole < 0.08, (domain, sizes)
    assert 3_000_000 < total < 8_000_000


@pytest.mark.parametrize("held_out", ["test", "validation"])
def test_no_long_line_shared_between_train_and_held_out(held_out):
    for domain in DOMAINS:
        train = _long_lines(load_split("train", domain)[domain])
        other = _long_lines(load_split(held_out, domain)[domain])
        shared = train & other
        assert not shared, (domain, sorted(shared)[:3])


def test_domains_differ():
    """Sanity check that the domains are what they claim (cheap lexical markers)."""
    val = load_split("validation")
    markers = {
        "english": " the ",
        "code": "def ",
        "french": " les ",
        "german": " und ",
        "spanish": " que ",
        "italian": " che ",
    }
    for domain, marker in markers.items():
        if domain in val:
            counts = {d: t.count(marker) / len(t) for d, t in val.items()}
            assert max(counts, key=counts.get) == domain, (marker, counts)


def test_load_split_selection_and_errors():
    assert list(load_split("test", "code")) == ["code"]
    assert list(load_split("test", ["german", "english"])) == ["german", "english"]
    with pytest.raises(ValueError, match="split"):
        load_split("dev")
    with pytest.raises(ValueError, match="domain"):
        load_split("train", ["english", "klingon"])
    with pytest.raises(ValueError, match="domain"):
        load_split("train", [])
    assert corpus_dir().is_dir()
    assert (corpus_dir() / "SOURCES.md").is_file()


def test_load_documents():
    docs = load_documents("validation", "german")
    assert len(docs) > 50
    assert all(d.strip() for d in docs)
