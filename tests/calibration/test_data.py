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


def _tokenize_as_rank(rank: int, world: int, store: str, text: str, out: str) -> None:
    import torch.distributed as dist

    from moequant.calibration.data import tokenize
    from moequant.checkpoint.loading import load_tokenizer
    from moequant.runtime.ranks import Ranks

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(
            tokenize(load_tokenizer(None), text, chunk_chars=700, ranks=Ranks(rank, world, "gloo")), out
        )
    finally:
        dist.destroy_process_group()


def test_tokenizing_across_ranks_gives_every_rank_one_process_ids(tmp_path):
    """Under torchrun each rank tokenizes every world-th chunk and the ids travel as tensors: every rank must
    hold exactly the ids one process gets (3 ranks, chunks of uneven token counts)."""
    import torch.multiprocessing as mp

    from moequant.calibration.data import tokenize
    from moequant.checkpoint.loading import load_tokenizer

    text = (
        Path(__file__).resolve().parents[2] / "calibration" / "corpus" / "code.validation.txt"
    ).read_text()
    one = tokenize(load_tokenizer(None), text, chunk_chars=700)
    assert one.numel() > 3000  # several chunks per rank
    outs = [tmp_path / f"rank{r}.pt" for r in range(3)]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_tokenize_as_rank, args=(r, 3, str(tmp_path / "store"), text, str(outs[r])))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    for out in outs:
        assert torch.equal(torch.load(out), one)
