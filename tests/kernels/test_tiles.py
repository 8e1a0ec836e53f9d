"""The kernels' device functions: unpacking one tile of codes from the packed words, every width (3 bits: the
codes that straddle two words), against the bit stream packing.py writes (kernel case: see kernel_cases.py)."""

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import keep_runnable, kernel_case

from moequant.kernels.tiles import unpack_codes
from moequant.quantizers.packing import pack


@triton.jit
def _unpack_kernel(qw_ptr, out_ptr, KW, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program p writes the codes of input channels p * BLOCK_K ... [BLOCK_K, N] as unpack_codes reads them."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    codes = unpack_codes(qw_ptr, k0, offs_n, mask_n, KW, N, BITS, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
    rows = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], codes, mask=mask_n[None, :])


@kernel_case
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_codes_reads_the_packed_bit_stream(dev, bits):
    k, n, block_k = 96, 5, 32  # three K tiles (one 3-bit word triple each), a partial N tile
    codes = torch.randint(0, 1 << bits, (k, n), generator=torch.Generator().manual_seed(bits))  # [K, N]
    qweight = pack(codes, bits).to(dev)  # [KW, N] int32
    out = torch.full((k, n), -1, dtype=torch.int32, device=dev)
    _unpack_kernel[(k // block_k,)](qweight, out, qweight.shape[0], n, bits, block_k, 8)
    assert torch.equal(out.cpu(), codes.to(torch.int32))


keep_runnable(globals())
