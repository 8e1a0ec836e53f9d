"""`moequant` with one simulated failure, for the torchrun tests (tests/quantize/test_ranks.py): the rank and
layer in MOEQUANT_TEST_FAIL ("rank:layer") raise an out-of-memory error while quantizing that layer's experts."""

import os
import sys

from moequant.errors import MoEQuantError
from moequant.quantize import experts

_rank, _layer = map(int, os.environ["MOEQUANT_TEST_FAIL"].split(":"))
_real = experts._quantize_chunk


def _failing(block, *args, **kwargs):
    if int(os.environ.get("RANK", "0")) == _rank and block.ref.layer_idx == _layer:
        raise MoEQuantError("simulated out of memory")
    return _real(block, *args, **kwargs)


experts._quantize_chunk = _failing

from moequant.cli.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
