"""Offline lm-eval tasks over the bundled corpus: rendered with absolute local data paths, and continuation
items that are deterministic and true."""

import json

import pytest
import yaml

from moequant.calibration.corpus import DOMAINS, load_documents
from moequant.evals.lm_eval_tasks import CONT_CHOICES, CONT_WORDS, PPL_TASKS, continuation_items, materialize


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_tasks_render_with_absolute_local_data(cache, tmp_path):
    folder = materialize(tmp_path)
    assert materialize(tmp_path) == folder  # cached by content hash
    for task in (*PPL_TASKS, "moequant_cont"):
        cfg = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert cfg["task"] == task and cfg["dataset_path"] == "json"
        data = cfg["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith(str(folder)) and (folder / data.rsplit("/", 1)[1]).is_file()
    rows = [json.loads(line) for line in (folder / "cont.jsonl").read_text().splitlines()]
    assert len(rows) == 100 * len(DOMAINS)
    # interleaved: --limit sees every domain
    assert [r["domain"] for r in rows[: len(DOMAINS)]] == list(DOMAINS)


def test_continuation_items_are_deterministic_and_true():
    items = continuation_items("english", n_items=20)
    assert items == continuation_items("english", n_items=20)
    text = "\n\n".join(load_documents("test", "english"))
    for it in items:
        assert len(it["choices"]) == CONT_CHOICES and len(set(it["choices"])) == CONT_CHOICES
        assert all(len(c.split()) == CONT_WORDS and c[0].isspace() for c in it["choices"])
        assert it["context"] + it["choices"][it["label"]] in text  # the labelled choice is the real one
    assert len({it["label"] for it in items}) > 1
