"""Every MoE family of the installed transformers, end to end on a tiny random model each (evals/families.py):
saved by transformers in the family's own key layout, profiled, quantized from the folder at 8-bit RTN and
4-bit GPTQ, reloaded with from_pretrained (the 8-bit folder also in bf16 and fp16, the adapter derived afresh);
and the families table of docs/families.md is this run's."""

import re
from pathlib import Path

import pytest

from moequant.evals.families import DTYPE_FLOOR, GPTQ_VS_RTN, MAX_REL_ERR_8BIT, check_all, markdown

TABLE = Path(__file__).resolve().parents[2] / "docs" / "families.md"


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    return check_all(workdir=tmp_path_factory.mktemp("families"), progress=False)


CORE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_5_moe", "qwen3_next",
        "glm4_moe", "deepseek_v2", "aria_text", "jamba", "granitemoe", "phimoe", "minimax",
        # layers with carried state (GLM-5, DeepSeek-V3.2), positional per-layer inputs (Gemma 4), default
        # configs with unset sizes (Hunyuan, dots1, LFM2), Mamba hybrids (Granite-4.0-H)
        "glm_moe_dsa", "deepseek_v32", "deepseek_v4", "gemma4", "hunyuan_v1_moe", "dots1", "lfm2_moe",
        "granitemoehybrid"}  # fmt: skip


def test_families_quantize_and_reload(checks):
    ok = {c.model_type: c for c in checks if c.ok}
    assert CORE <= set(ok), sorted(CORE - set(ok))
    assert len(ok) >= 45
    for c in ok.values():
        assert c.err8 <= MAX_REL_ERR_8BIT and c.err4 <= GPTQ_VS_RTN * c.rtn4, c
        assert c.err4 > c.err8, c  # fewer bits, more error: the quantized experts really run
        # loaded in bf16 and fp16 with the adapter derived afresh: within twice the dtype's own cost (+ floor)
        for dtype, floor in DTYPE_FLOOR.items():
            name = str(dtype).removeprefix("torch.")
            if c.dtype_err16[name] is None:  # transformers' own 16-bit model does not run in this dtype
                assert c.model_type == "deepseek_v4" and name == "float16", c
                continue
            assert 0 < c.dtype_err[name] <= 2 * c.dtype_err16[name] + floor, c


def test_every_other_family_says_why(checks):
    for c in checks:
        if not c.ok:
            assert c.status in ("fails", "unsupported", "error") and len(c.reason) > 15, c


def _rows(table: str) -> list[list[str]]:
    """Table rows without the measured columns and counts (their last digits depend on the CPU's float
    kernels)."""
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| family")]
    return [re.sub(r"\(\d+ of \d+ tokens", "(N of M tokens", r).split("|")[1:4] for r in rows]


def test_families_doc_table_is_this_run(checks):
    """docs/families.md's table is this run's when it was made with the installed transformers (it names the version
    it was made with; a newer transformers adds families, and the test above still runs every one of them)."""
    import transformers

    m = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", TABLE.read_text(), re.S)
    assert m, (
        "docs/families.md has no families table between <!-- families:start --> and <!-- families:end -->"
    )
    made = re.match(r"transformers (\S+):", m.group(1))
    assert made, "the families table must start with the transformers version it was made with"
    if made.group(1) != transformers.__version__:
        pytest.skip(f"the families table is for transformers {made.group(1)}, this is "
                    f"{transformers.__version__}: regenerate it with `moequant families --check`")  # fmt: skip
    assert _rows(m.group(1)) == _rows(markdown(checks)), "regenerate it with `moequant families --check`"
