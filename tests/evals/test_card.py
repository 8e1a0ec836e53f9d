"""Model card: every quantized folder gets README.md (Hub metadata, bit map figure, widths table, loading
snippet); eval and sweep results appear when present; hand edits are detected."""

import json
import shutil

import pytest
import torch
import yaml

import moequant  # noqa: F401
from moequant import api
from moequant.arch.tiny import byte_tokenizer, tiny_model
from moequant.calibration.data import CalibData
from moequant.config import Method, QuantizeConfig, QuantSpec
from moequant.evals.card import BITMAP, CARD, TAGS, is_generated_unedited, render_card, write_card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "tiny-q"
    model = tiny_model("mixtral", seed=4)
    plan = api.make_uniform_plan(model, QuantSpec(Method.RTN, 4, 32))
    widths = [
        QuantSpec(Method.RTN, 2, 32),
        QuantSpec(Method.GPTQ, 3, 32),
        QuantSpec(Method.BNB_NF4),
        QuantSpec(Method.KEEP),
    ]
    for i in plan.layers:
        plan.layers[i] = [widths[(e + i) % len(widths)] for e in range(len(plan.layers[i]))]
    data = CalibData(
        torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), ["x"] * 4, "ids"
    )
    api.quantize(
        model, plan, data, out, QuantizeConfig(progress=False, min_tokens=0), tokenizer=byte_tokenizer()
    )
    return out


def test_quantize_writes_a_card_with_hub_metadata(folder):
    text = (folder / CARD).read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "moequant"
    assert set(TAGS) <= set(meta["tags"]) and "mixtral" in meta["tags"]
    q = meta["quantization"]
    assert q["method"] == "moequant" and q["group_size"] == 32
    assert sum(q["expert_widths"].values()) == 2 * 8  # every expert of both layers
    assert "base_model" not in meta  # quantized from an in-memory model: no Hub id to claim
    assert "# tiny-q" in text and ".partial" not in text
    assert "import moequant" in text and 'AutoModelForCausalLM.from_pretrained("tiny-q"' in text
    for label in ("rtn:2", "gptq:3", "bnb-nf4", "keep"):
        assert label in text
    assert f"![bits per expert]({BITMAP})" in text
    assert (folder / BITMAP).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert is_generated_unedited(folder / CARD)


def test_card_loads_with_huggingface_hub(folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / CARD)
    assert card.data.library_name == "moequant"
    assert "mixed-precision" in card.data.tags


def test_base_model_only_for_hub_ids(folder, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(folder, f)
    rep = json.loads((f / "quant_report.json").read_text())
    for model_id, expected in [
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-v0.1"),
        ("bundled", None),
        (str(tmp_path), None),
    ]:
        (f / "quant_report.json").write_text(json.dumps(rep | {"model": model_id}))
        meta = _front_matter(render_card(f))
        assert meta.get("base_model") == expected
        assert (meta.get("base_model_relation") == "quantized") == (expected is not None)


def test_eval_and_sweep_sections(folder, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(folder, f)
    assert "Quality vs the original" not in render_card(f)
    row = {
        "task": "moequant_cont",
        "metric": "acc",
        "baseline": 0.5,
        "baseline_stderr": 0.1,
        "quantized": 0.4,
        "quantized_stderr": 0.1,
        "delta": -0.1,
        "rel_delta": -0.2,
        "lower_is_better": False,
        "samples": 10,
    }
    report = {
        "date": "today",
        "lm_eval": {"tasks": ["moequant_cont"], "limit": 10, "rows": [row]},
        "perplexity": {"baseline": {"overall": 10.0}, "quantized": {"overall": 11.0}},
    }
    (f / "eval").mkdir()
    (f / "eval" / "report.json").write_text(json.dumps(report))
    text = render_card(f)
    assert (
        "Quality vs the original" in text
        and "| moequant_cont | acc ↑ | 10 | 0.5000 ± 0.10 | 0.4000 ± 0.10 |" in text
    )
    assert "+10.00%" in text  # perplexity delta
    point = {
        "label": "planned-3b",
        "method": "planned",
        "average_bits": 3.0,
        "size_gb": 0.0026,
        "ppl": 60.1,
        "scores": {},
    }
    (f / "sweep.json").write_text(json.dumps({"points": [point]}))
    text = render_card(f)
    assert "budget sweep" in text and "planned-3b" in text


def test_hand_edits_are_detected(folder, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(folder, f)
    assert is_generated_unedited(f / CARD)
    (f / CARD).write_text((f / CARD).read_text().replace("How to load", "How to load it"))
    assert not is_generated_unedited(f / CARD)
    write_card(f, repo_id="me/tiny")
    text = (f / CARD).read_text()
    assert is_generated_unedited(f / CARD) and 'from_pretrained("me/tiny"' in text and "# me/tiny" in text


def test_not_a_moequant_folder(tmp_path):
    from moequant.errors import MoEQuantError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(MoEQuantError, match="not a moequant checkpoint"):
        write_card(tmp_path)


def test_card_and_bitmap_name_the_stored_spec_not_the_planned_one(tmp_path):
    """Experts that saw too few tokens are stored as identity-Hessian RTN: the card says rtn:4, as config.json."""
    from moequant.evals.card import _bit_map

    out = tmp_path / "fallback-q"
    model = tiny_model("mixtral", seed=4)
    plan = api.make_uniform_plan(model, QuantSpec(Method.GPTQ, 4, 32))
    data = CalibData(
        torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), ["x"] * 2, "ids"
    )
    config = QuantizeConfig(progress=False, min_tokens=10**6)  # every expert falls back
    api.quantize(model, plan, data, out, config, tokenizer=byte_tokenizer())
    stored = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {s for row in stored["experts"].values() for s in row} == {"rtn:4"}
    text = (out / CARD).read_text()
    assert "gptq:4" not in text, "the card lists the planned spec"
    table = [ln for ln in text.splitlines() if ln.startswith("| 0 |") or ln.startswith("| 1 |")]
    assert len(table) == 2 and all(ln.count("rtn:4") == 8 for ln in table), table
    assert _bit_map(stored)[1] == [["rtn:4"] * 8] * 2
