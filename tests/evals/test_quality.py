"""lm-eval settings: which metrics are better lower, the --tasks list."""

import pytest

from moequant.errors import MoEQuantError
from moequant.evals.lm_eval_tasks import DEFAULT_TASKS
from moequant.evals.quality import Score, lower_is_better, parse_tasks


def test_perplexities_and_bits_per_byte_are_better_lower():
    assert [lower_is_better(m) for m in ("word_perplexity", "bits_per_byte", "acc", "acc_norm")] == [
        True,
        True,
        False,
        False,
    ]


def test_tasks_list():
    assert parse_tasks(None) == parse_tasks("") == list(DEFAULT_TASKS)
    assert parse_tasks(" hellaswag, arc_easy ,") == ["hellaswag", "arc_easy"]
    with pytest.raises(MoEQuantError, match="no task in --tasks ' , '"):
        parse_tasks(" , ")
    assert Score(0.5, None).to_json() == {"value": 0.5, "stderr": None}
