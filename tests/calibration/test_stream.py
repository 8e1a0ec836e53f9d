"""The layer-streaming driver: each layer loaded in turn, run once, released, its outputs the next one's inputs."""

import torch
from helpers import layer_output

from moequant.arch import decoder_layers
from moequant.arch.tiny import tiny_model
from moequant.calibration.data import CalibData
from moequant.calibration.stream import first_inputs, model_device, stream_layers
from moequant.checkpoint.source import open_source


def _data() -> CalibData:
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    return CalibData(ids, ["x"] * 4, "random ids")


def _last_layer_output(model, ids) -> torch.Tensor:
    return layer_output(model, decoder_layers(model, open_source(model).arch)[-1], ids)


def test_each_layer_is_loaded_run_once_and_released_in_order(monkeypatch):
    model = tiny_model("mixtral", seed=1)
    source = open_source(model)
    calls = []
    monkeypatch.setattr(source, "load_layer", lambda i: calls.append(("load", i)))
    monkeypatch.setattr(source, "release_layer", lambda i: calls.append(("release", i)))
    data = _data()
    inputs = first_inputs(source, data, batch_size=2)
    assert len(inputs.hidden) == 2  # two batches of two sequences
    seen = []
    for step in stream_layers(source, inputs, "test", progress=False):
        assert calls[-1] == ("load", step.index)
        seen.append(step.index)
        if step.index == 0:
            step.advance()  # a body that runs the layer itself: the driver does not run it again
    assert seen == [0, 1]
    assert calls == [("load", 0), ("release", 0), ("load", 1), ("release", 1)]
    want = _last_layer_output(model, data.input_ids)  # [4, 12, H]
    torch.testing.assert_close(torch.cat(inputs.hidden), want, rtol=1e-5, atol=1e-5)


def test_a_stream_can_start_at_a_later_layer():
    model = tiny_model("mixtral", seed=1)
    source = open_source(model)
    inputs = first_inputs(source, _data(), batch_size=4)
    assert [step.index for step in stream_layers(source, inputs, "test", progress=False, start_layer=1)] == [
        1
    ]
    assert model_device(model) == torch.device("cpu")
