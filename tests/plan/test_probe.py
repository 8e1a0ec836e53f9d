"""The measured layer probe (whole model in memory): every weight restored, the damage scaled per layer."""

import numpy as np
import pytest
import torch


def test_layer_probe_restores_weights_and_scales_layers(small_calib):
    from moequant.calibration.data import CalibConfig, build_calibration
    from moequant.checkpoint.loading import load_model, load_tokenizer
    from moequant.plan.probe import calibrate_damage, layer_loss_increase

    model = load_model(None)  # the bundled trained model on real text: 2-bit experts must cost loss
    text = CalibConfig(str(small_calib), samples=6, seq_len=128)  # bundled-corpus text (conftest.small_calib)
    ids = build_calibration(load_tokenizer(None), text).input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inc, base = layer_loss_increase(model, ids, bits=2, group_size=128, sym=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # every weight restored exactly
    assert set(inc) == {0, 1, 2, 3} and all(v > 0 for v in inc.values()) and base > 0
    keys = [(0, 0), (0, 1), (1, 0), (1, 1)]
    damage = np.array([[4.0, 1.0], [2.0, 0.5], [1.0, 0.2], [1.0, 0.3]])  # widths (2, 3)
    scaled, scales = calibrate_damage(damage, keys, 0, {0: 0.6, 1: 0.1})
    assert scaled[:2, 0].sum() == pytest.approx(0.6) and scaled[2:, 0].sum() == pytest.approx(0.1)
    assert scaled[0, 1] / scaled[0, 0] == pytest.approx(0.25)  # within-layer ratios kept
    _, floored = calibrate_damage(damage, keys, 0, {0: 0.6, 1: -0.01})
    assert floored[1] * 2.0 == pytest.approx(0.6)  # a layer whose loss fell gets the smallest rise seen
