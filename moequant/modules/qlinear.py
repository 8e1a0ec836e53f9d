"""Storage modules for one expert's one projection: packed integer, 16-bit dense, or bitsandbytes.

Each holds its tensors as persistent buffers (so `state_dict` / `from_pretrained` see them under stable
names) and exposes `dequantize(dtype) -> W [N, K]` (out, in), the reference every fast path must match.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.config import Method, QuantSpec
from moequant.quantizers.packed import PackedLinear
from moequant.quantizers.packing import dequantize, dequantize_t, packed_rows


class PackedWeight(nn.Module):
    """Group-wise integer codes (GPTQ / RTN), layout in packing.py."""

    def __init__(
        self, out_features: int, in_features: int, spec: QuantSpec, act_order: bool = False, device=None
    ):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group_size, self.sym, self.act_order = spec.bits, spec.group_size, spec.sym, act_order
        groups = (in_features + spec.group_size - 1) // spec.group_size
        kw = packed_rows(in_features, spec.bits)
        self.register_buffer("qweight", torch.zeros(kw, out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if not spec.sym:
            self.register_buffer(
                "qzeros", torch.zeros(groups, out_features, dtype=torch.uint8, device=device)
            )
        else:
            self.qzeros = None
        if act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None

    @classmethod
    def from_packed(cls, p: PackedLinear, spec: QuantSpec) -> PackedWeight:
        m = cls(p.out_features, p.in_features, spec, act_order=p.g_idx is not None, device="meta")
        for name, t in p.tensors().items():
            setattr(m, name, t)  # replaces the meta buffers (register_buffer semantics kept by nn.Module)
        return m

    def packed(self) -> PackedLinear:
        return PackedLinear(
            self.qweight,
            self.scales,
            self.qzeros,
            self.g_idx,
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed().dequantize(dtype)  # [N, K]

    def dequantize_rows(
        self, r1: int, r2: int, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows r1..r2-1 of W: [r2 - r1, K], equal to dequantize(dtype)[r1:r2] (elementwise per weight);
        written into `out` [r2 - r1, K] when given."""
        q, s = self.qweight[:, r1:r2], self.scales[:, r1:r2]  # output rows are packed columns
        z = None if self.qzeros is None else self.qzeros[:, r1:r2]
        return dequantize(q, s, z, self.bits, self.in_features, self.group_size, self.g_idx, dtype, out)

    def dequantize_cols(self, r1: int, r2: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W[r1:r2]^T: [K, r2 - r1] float32 in the packed layout's own order (no transposing copy), written
        into `out` when given; the values of dequantize_rows(r1, r2).T."""
        q, s = self.qweight[:, r1:r2], self.scales[:, r1:r2]  # output rows are packed columns
        z = None if self.qzeros is None else self.qzeros[:, r1:r2]
        return dequantize_t(q, s, z, self.bits, self.in_features, self.group_size, self.g_idx, out)

    def extra_repr(self) -> str:
        sym = "sym" if self.sym else "asym"
        return f"{self.out_features}x{self.in_features}, int{self.bits} g{self.group_size} {sym}"


class DenseWeight(nn.Module):
    """An expert kept in 16-bit ("keep")."""

    def __init__(self, out_features: int, in_features: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("dense", torch.zeros(out_features, in_features, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, dtype=torch.bfloat16) -> DenseWeight:
        m = cls(w.shape[0], w.shape[1], dtype=dtype, device="meta")
        m.dense = w.detach().to(dtype).contiguous()
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dense.to(dtype)  # [N, K]

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.dense.dtype}"


ROW_SLICE_BYTES = 8 * 2**20  # a row slice of a dequantized weight (see dequantized_rows)


def dequantized_rows(w: nn.Module | torch.Tensor, dtype: torch.dtype = torch.float32, scratch: bool = False):
    """Yield (r1, r2, W[r1:r2] in dtype) over W [N, K] in row slices of about ROW_SLICE_BYTES.

    `w` is a storage module of this file or a plain [N, K] tensor. The slices depend on W's shape only, so
    every caller that multiplies slice by slice does the same arithmetic. bitsandbytes storage (no row
    access: 4-bit blocks run across rows) yields its whole matrix once. `scratch`: packed slices are written
    into one buffer, reused from slice to slice (no fresh pages per slice): the caller is done with a slice
    before it asks for the next."""
    if isinstance(w, torch.Tensor):
        (N, K), read = w.shape, (lambda a, b: w[a:b].to(dtype))
    elif isinstance(w, PackedWeight):
        N, K = w.out_features, w.in_features
        buf = torch.empty(0, dtype=dtype, device=w.qweight.device)  # grown to the first slice when scratch

        def read(a: int, b: int) -> torch.Tensor:
            if not scratch:
                return w.dequantize_rows(a, b, dtype)
            if buf.numel() < (b - a) * K:
                buf.resize_((b - a) * K)
            return w.dequantize_rows(a, b, dtype, out=buf[: (b - a) * K].view(b - a, K))
    elif isinstance(w, DenseWeight):
        N, K, read = w.out_features, w.in_features, (lambda a, b: w.dense[a:b].to(dtype))
    else:
        yield 0, w.out_features, w.dequantize(dtype)
        return
    rows = max(1, ROW_SLICE_BYTES // (torch.empty((), dtype=dtype).element_size() * K))
    for r1 in range(0, N, rows):
        r2 = min(r1 + rows, N)
        yield r1, r2, read(r1, r2)  # [r, K]


def project(w: nn.Module | torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ W^T for x in xs] (x [T, K] float32 -> [T, N] float32) with W dequantized once, one row slice at a
    time (dequantized_rows' slices, transposed: _transposed_slices): no whole float32 copy of a large weight
    exists. The arithmetic depends on W's shape only, not on how many inputs share the pass."""
    N = _out_features(w)
    outs: list[torch.Tensor] | None = None
    for r1, r2, Wt in _transposed_slices(w):  # Wt [K, r] = W[r1:r2]^T, done with before the next
        if (r1, r2) == (0, N):  # one slice: the plain product
            return [x @ Wt for x in xs]  # [T, N] each
        if outs is None:
            outs = [x.new_empty(x.shape[0], N) for x in xs]  # [T, N] each
        for x, o in zip(xs, outs, strict=True):
            o[:, r1:r2] = x @ Wt  # [T, r]
        del Wt
    return outs if outs is not None else [x.new_empty(x.shape[0], N) for x in xs]  # N == 0: no slice


def _transposed_slices(w: nn.Module | torch.Tensor):
    """(r1, r2, W[r1:r2]^T [K, r] float32) over dequantized_rows' slices: packed storage dequantizes each into
    one reused [K, r] buffer in its own layout (PackedWeight.dequantize_cols: no transposing copy, no fresh
    pages); any other storage gives the transposed view of its row slice."""
    if not isinstance(w, PackedWeight):
        for r1, r2, Wr in dequantized_rows(w, torch.float32, scratch=True):  # Wr [r, K]
            yield r1, r2, Wr.T
        return
    N, K = w.out_features, w.in_features
    rows = max(1, ROW_SLICE_BYTES // (4 * K))  # dequantized_rows' float32 slices
    buf = torch.empty(min(rows, N) * K, dtype=torch.float32, device=w.qweight.device)
    for r1 in range(0, N, rows):
        r2 = min(r1 + rows, N)
        yield r1, r2, w.dequantize_cols(r1, r2, out=buf[: (r2 - r1) * K].view(K, r2 - r1))


def _out_features(w: nn.Module | torch.Tensor) -> int:
    return w.shape[0] if isinstance(w, torch.Tensor) else w.out_features


def storage_for(
    spec: QuantSpec, out_features: int, in_features: int, act_order: bool, dtype, device=None
) -> nn.Module:
    """An empty storage module with the right buffer shapes for `spec` (what from_pretrained fills)."""
    if spec.method.is_integer:  # act-order (a stored g_idx) applies to GPTQ experts only
        g_idx = act_order and spec.method is Method.GPTQ
        return PackedWeight(out_features, in_features, spec, act_order=g_idx, device=device)
    if spec.method is Method.KEEP:
        return DenseWeight(out_features, in_features, dtype=dtype, device=device)
    from moequant.modules.bnb_storage import BnbWeight

    return BnbWeight(out_features, in_features, spec.method, dtype=dtype, device=device)


class QuantLinear(nn.Module):
    """A non-expert nn.Linear (attention, shared experts, dense MLPs, lm_head) stored at one fixed spec.

    State dict: `w.<storage tensors>` (+ `bias`). Forward dequantizes one row slice at a time and multiplies in
    fp32 (reference path): no whole dequantized copy of the weight exists.
    """

    def __init__(
        self, storage: nn.Module, in_features: int, out_features: int, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w = storage
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    @classmethod
    def empty(cls, spec: QuantSpec, linear: nn.Module, dtype, act_order: bool = False) -> QuantLinear:
        storage = storage_for(spec, linear.out_features, linear.in_features, act_order, dtype, device="meta")
        bias = None if linear.bias is None else torch.zeros(linear.out_features, dtype=dtype, device="meta")
        return cls(storage, linear.in_features, linear.out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # [T, in]
        y = project(self.w, [flat])[0].view(
            *x.shape[:-1], self.out_features
        )  # [..., out], weight in row slices
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
