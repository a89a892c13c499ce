"""GGUF blocks -> the planes the CPU kernels read (layouts in csrc/common.h).

Every quantized type becomes unsigned quants u with a scale d and an offset m per group of G
weights, so that each weight is d * u + m exactly as kernels/ref_quant.py computes it (checked
bit for bit in tests: the scale products involved are exact in fp32). 4-bit types keep 4 bits
(nibbles rearranged so one 64-byte load holds 128 weights); 5, 6 and 8-bit types become one byte
per weight. Scales stay fp16 where GGUF stores them as fp16 and the offset is exact in fp16
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else fp32 (K-quant sub-block scales are products).
Rows are converted a few million weights at a time, so packing never holds a tensor twice.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import quant_layouts as L
from ..ref_quant import (_HI16, _crumbs, _expand, _f16, _k_scale_min, _nibbles, _planes)

_CHUNK = 1 << 22  # weights per conversion step


class WeightDesc(ctypes.Structure):
    """csrc/qgemm.c's lt_weight: what lt_linear needs to know about a packed matrix."""

    _fields_ = [("qs", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("f16", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64)]


@dataclass
class PackedWeight:
    """A [N, K] matrix in kernel planes, with its descriptor for lt_linear (built once)."""

    qs: torch.Tensor  # uint8 [N, K/2] (4-bit) or [N, K]
    d: torch.Tensor  # fp16/fp32 [N, K/G]
    m: torch.Tensor
    bits: int
    group: int
    shape: tuple[int, int]
    desc: WeightDesc = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.desc = WeightDesc(self.qs.data_ptr(), self.d.data_ptr(), self.m.data_ptr(), int(self.f16), self.bits,
                               self.group, 0, *self.shape)
        self.desc_ptr = ctypes.addressof(self.desc)

    @property
    def f16(self) -> bool:
        return self.d.dtype == torch.float16

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m))


def _q4_0(b):
    d = _f16(b, 0)[:, None]
    return _nibbles(b[:, 2:18], 1).reshape(-1, 32), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:20], 1).reshape(-1, 32), _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _q5_0(b):
    d = _f16(b, 0)[:, None]
    return _nibbles(b[:, 6:22], 1).reshape(-1, 32) | _expand(b[:, 2:6], _HI16), d, -16 * d


def _q5_1(b):
    u = _nibbles(b[:, 8:24], 1).reshape(-1, 32) | _expand(b[:, 4:8], _HI16)
    return u, _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _q8_0(b):
    d = _f16(b, 0)[:, None]
    return b[:, 2:] ^ 0x80, d, -128 * d  # two's complement q + 128 as an unsigned byte


def _q2_k(b):
    sc = b[:, :16]
    return (_crumbs(b[:, 16:80], 2).reshape(-1, 16, 16), _f16(b, 80)[:, None] * (sc & 15),
            -(_f16(b, 82)[:, None] * (sc >> 4)))


def _q3_k(b):
    n, raw = b.shape[0], b[:, 96:108]
    from ..ref_quant import _fields

    lo = _nibbles(raw[:, :8], 1).reshape(n, 16)
    hi = _fields(raw[:, 8:12], 1, 2, 4).reshape(n, 16)
    dl = _f16(b, 108)[:, None] * ((lo | (hi << 4)).view(torch.int8) - 32)
    u = _crumbs(b[:, 32:96], 2).reshape(n, 8, 32) | (_planes(b[:, :32]) << 2)
    return u.reshape(n, 16, 16), dl, -4 * dl


def _k_scales(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    return _f16(b, 0)[:, None] * sc, -(_f16(b, 2)[:, None] * mn)


def _q4_k(b):
    return (_nibbles(b[:, 16:144], 4).reshape(-1, 8, 32), *_k_scales(b))


def _q5_k(b):
    n = b.shape[0]
    return (_nibbles(b[:, 48:176], 4).reshape(n, 8, 32) | (_planes(b[:, 16:48]) << 4), *_k_scales(b))


def _q6_k(b):
    n = b.shape[0]
    u = _nibbles(b[:, :128], 2).reshape(n, 2, 4, 32) | (_crumbs(b[:, 128:192], 2) << 4)
    dl = _f16(b, 208)[:, None] * b[:, 192:208].view(torch.int8)
    return u.reshape(n, 16, 16), dl, -32 * dl


# ggml type -> (unpack blocks -> (u, d, m), bits stored, group size, fp16 scales)
FORMATS: dict[int, tuple[Callable, int, int, bool]] = {
    L.Q4_0: (_q4_0, 4, 32, True), L.Q4_1: (_q4_1, 4, 32, True), L.Q4_K: (_q4_k, 4, 32, False),
    L.Q5_0: (_q5_0, 8, 32, True), L.Q5_1: (_q5_1, 8, 32, True), L.Q8_0: (_q8_0, 8, 32, True),
    L.Q5_K: (_q5_k, 8, 32, False), L.Q2_K: (_q2_k, 8, 16, False), L.Q3_K: (_q3_k, 8, 16, False),
    L.Q6_K: (_q6_k, 8, 16, False),
}


def nibble_layout(u: torch.Tensor) -> torch.Tensor:
    """uint8 u [R, K] (values < 16) -> [R, K/2]: per 128 weights byte j = u[j] | u[j + 64] << 4; a
    64-weight tail packs byte j = u[j] | u[j + 32] << 4."""
    R, K = u.shape
    full = K // 128 * 128
    head = u[:, :full].reshape(R, -1, 2, 64)
    out = [(head[:, :, 0] | (head[:, :, 1] << 4)).reshape(R, -1)]
    if K > full:
        tail = u[:, full:].reshape(R, 2, 32)
        out.append(tail[:, 0] | (tail[:, 1] << 4))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def supported(ggml_type: int, shape: tuple[int, ...]) -> bool:
    return ggml_type in FORMATS and len(shape) == 2 and shape[1] % 64 == 0


def pack(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> PackedWeight:
    """raw uint8 [N, bytes per row] GGUF blocks -> PackedWeight, a few million weights at a time."""
    fn, bits, group, f16 = FORMATS[ggml_type]
    qk, bs = L.BLOCK[ggml_type]
    N, K = shape
    nbk = K // qk
    qs = torch.empty(N, K // 2 if bits == 4 else K, dtype=torch.uint8)
    d = torch.empty(N, K // group)
    m = torch.empty(N, K // group)
    rows = max(1, _CHUNK // K)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        u, dd, mm = fn(raw[r0:r1].reshape(-1, bs))
        u = u.reshape(r1 - r0, K)
        qs[r0:r1] = nibble_layout(u) if bits == 4 else u
        d[r0:r1] = dd.reshape(r1 - r0, nbk * (qk // group))
        m[r0:r1] = mm.reshape(r1 - r0, nbk * (qk // group))
    if f16:
        dh, mh = d.half(), m.half()
        if torch.equal(dh.float(), d) and torch.equal(mh.float(), m):  # offsets like -128 d fit fp16
            d, m = dh, mh
    return PackedWeight(qs, d, m, bits, group, (N, K))


def unpack(w: PackedWeight) -> torch.Tensor:
    """The fp32 weights d * u + m (tests: must equal kernels/ref_quant.dequantize bit for bit)."""
    N, K = w.shape
    if w.bits == 4:
        full = K // 128 * 128
        head = w.qs[:, : full // 2].reshape(N, -1, 64)
        parts = [torch.stack([head & 15, head >> 4], dim=2).reshape(N, full)]
        if K > full:
            tail = w.qs[:, full // 2:]
            parts.append(torch.cat([tail & 15, tail >> 4], dim=1))
        u = torch.cat(parts, dim=1)
    else:
        u = w.qs
    d = w.d.float().repeat_interleave(w.group, dim=1)
    m = w.m.float().repeat_interleave(w.group, dim=1)
    return u.float() * d + m


def unpack_rows(w: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows `ids` of the matrix (an embedding lookup on a tied lm_head)."""
    ids = ids.long()
    sub = PackedWeight(w.qs.index_select(0, ids), w.d.index_select(0, ids), w.m.index_select(0, ids), w.bits,
                       w.group, (ids.shape[0], w.shape[1]))
    return unpack(sub)
