"""Default calibration size: 128 x 2048 for a real checkpoint (capped at its positions), 128 x 256 bundled."""

import json

import pytest

from moequant.calibration.sizing import default_size, max_positions, resolve_size
from moequant.checkpoint.bundled import bundled_model_path


def _folder(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_bundled_model_keeps_its_fast_demo_size():
    for name in (None, "bundled", "tiny-moe", str(bundled_model_path())):
        assert default_size(name) == (128, 256), name
    assert max_positions(str(bundled_model_path())) == 512  # 256 is a choice, not the model's limit


@pytest.mark.parametrize(
    "config,seq_len",
    [
        ({"model_type": "qwen3_moe", "max_position_embeddings": 40960}, 2048),
        ({"model_type": "mixtral", "max_position_embeddings": 1024}, 1024),  # capped at the model's positions
        ({"model_type": "qwen3_5_moe", "text_config": {"max_position_embeddings": 512}}, 512),
        ({"model_type": "something"}, 2048),  # the config does not say
    ],
)
def test_real_checkpoints_get_gptqs_usual_size(tmp_path, config, seq_len):
    assert default_size(_folder(tmp_path / "m", config)) == (128, seq_len)


def test_given_sizes_win(tmp_path):
    m = _folder(tmp_path / "m", {"max_position_embeddings": 4096})
    assert resolve_size(m, None, None) == (128, 2048)
    assert resolve_size(m, 8, None) == (8, 2048)
    assert resolve_size(m, None, 64) == (128, 64)
