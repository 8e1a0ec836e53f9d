"""Calibration data: tokenizing the calibration text."""

from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("chunk_chars", [300, 4096])
def test_chunked_tokenization_equals_one_call(chunk_chars):
    """Calibration text is tokenized in chunks (bounded memory); the cuts must not change a single token."""
    from moequant.calibration.data import tokenize
    from moequant.checkpoint.loading import load_tokenizer

    tok = load_tokenizer(None)
    root = Path(__file__).resolve().parents[2] / "calibration" / "corpus"
    for f in sorted(root.glob("*.validation.txt")):
        text = f.read_text()
        whole = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        assert torch.equal(tokenize(tok, text, chunk_chars=chunk_chars), whole), f.name
