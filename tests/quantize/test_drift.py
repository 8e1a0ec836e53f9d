"""quantize/drift.py: the unquantized stream beside the quantized one, and each layer's drift between them."""

from __future__ import annotations

import torch

from moequant.calibration.capture import LayerInputs
from moequant.quantize.drift import layer_drift, unquantized_stream


def test_layer_drift_is_the_difference_of_the_two_streams_and_advances_the_unquantized_one():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    q = LayerInputs([torch.randn(2, 5, 8) for _ in range(3)], [{0: {}} for _ in range(3)])
    stream = unquantized_stream(q)
    assert all(torch.equal(a, b) and a is not b for a, b in zip(stream.hidden, q.hidden, strict=True))
    assert all(float(d.abs().max()) == 0.0 for d in layer_drift(layer, 0, stream, q))  # same inputs: none
    q.hidden = [h + 0.1 for h in q.hidden]  # the quantized stream drifted
    before = [h.clone() for h in stream.hidden]
    drift = layer_drift(layer, 0, stream, q)
    with torch.no_grad():
        for d, h0, hq, h1 in zip(drift, before, q.hidden, stream.hidden, strict=True):
            assert d.shape == (10, 8)
            torch.testing.assert_close(d, (layer(h0) - layer(hq)).reshape(10, 8))
            torch.testing.assert_close(h1, layer(h0))
