"""bitsandbytes storage of one projection: fixed buffer shapes (what from_pretrained builds from the bit map)
that hold what bitsandbytes' own quantization gives."""

import pytest
import torch

from moequant.config import Method
from moequant.modules.bnb_storage import BnbWeight
from moequant.quantizers.bnb import BnbMatrix


@pytest.mark.parametrize("method", [Method.BNB_NF4, Method.BNB_INT8])
def test_buffers_have_fixed_shapes_and_reload_exactly(method):
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q = BnbWeight.quantize(W, method)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    if method is Method.BNB_INT8:
        assert shapes == {"data": (24, 40), "absmax": (24,)}
    else:  # 960 weights: two per byte, one absmax per 64 weights, the 16-entry code book
        assert shapes == {"data": (480, 1), "absmax": (15,), "quant_map": (16,)}
    empty = BnbWeight(24, 40, method)
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == shapes
    empty.load_state_dict(q.state_dict())
    want = BnbMatrix.quantize(W, method).dequantize(torch.float32)  # bitsandbytes' own round trip
    assert torch.equal(empty.dequantize(), want) and torch.equal(q.dequantize(), want)
    assert q.extra_repr() == f"24x40, {method.value}"
