"""GGUF blocks -> the planes the CPU kernels read (layouts in csrc/common.h).

Every quantized type becomes unsigned quants u with a scale d and an offset m per group of G
weights, so that each weight is d * u + m exactly as kernels/ref_quant.py computes it (checked
in tests: the scale products involved are exact in fp32). Symmetric types (Q4_0, Q5_0, Q8_0,
Q3_K, Q6_K) keep no m plane: m = offset * d. Storage per weight: 4-bit types 4 bits (nibbles
arranged so one 64-byte load holds 128 weights), 5-bit types those nibbles plus a plane of fifth
bits, 6 and 8-bit types a byte. Scales stay fp16 where GGUF stores them as fp16 (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0), else fp32 (K-quant sub-block scales are products). Rows are padded to an even
count (the kernel runs row pairs) and converted a few million weights at a time, so packing
never holds a tensor twice.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import quant_layouts as L
from ..ref_quant import _HI16, _crumbs, _expand, _f16, _fields, _k_scale_min, _nibbles, _planes

_CHUNK = 1 << 22  # weights per conversion step
KIND = {"q4": 0, "q5": 1, "q8": 2}


class WeightDesc(ctypes.Structure):
    """csrc/qgemm.c's lt_weight: what lt_linear needs to know about a packed matrix."""

    _fields_ = [("qs", ctypes.c_void_p), ("hb", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p),
                ("offset", ctypes.c_float), ("f16", ctypes.c_int32), ("kind", ctypes.c_int32),
                ("group", ctypes.c_int32), ("N", ctypes.c_int64), ("K", ctypes.c_int64)]


@dataclass
class PackedWeight:
    """A [N, K] matrix in kernel planes (N padded to even rows), with its lt_linear descriptor."""

    qs: torch.Tensor  # uint8 [Np, K/2] (q4, q5) or [Np, K] (q8)
    hb: torch.Tensor | None  # q5: uint8 [Np, K/8], bit i of 64-bit word w = the fifth bit of weight 64 w + i
    d: torch.Tensor  # fp16/fp32 [Np, K/G]
    m: torch.Tensor | None  # None: symmetric, m = offset * d
    offset: float
    kind: str
    group: int
    shape: tuple[int, int]
    desc: WeightDesc = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.desc = WeightDesc(self.qs.data_ptr(), ptr(self.hb), self.d.data_ptr(), ptr(self.m), self.offset,
                               int(self.f16), KIND[self.kind], self.group, *self.shape)
        self.desc_ptr = ctypes.addressof(self.desc)

    @property
    def f16(self) -> bool:
        return self.d.dtype == torch.float16

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.hb, self.d, self.m) if t is not None)


def _q4_0(b):
    return _nibbles(b[:, 2:18], 1).reshape(-1, 32), _f16(b, 0)[:, None], None


def _q4_1(b):
    return _nibbles(b[:, 4:20], 1).reshape(-1, 32), _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _q5_0(b):
    return _nibbles(b[:, 6:22], 1).reshape(-1, 32) | _expand(b[:, 2:6], _HI16), _f16(b, 0)[:, None], None


def _q5_1(b):
    u = _nibbles(b[:, 8:24], 1).reshape(-1, 32) | _expand(b[:, 4:8], _HI16)
    return u, _f16(b, 0)[:, None], _f16(b, 2)[:, None]


def _q8_0(b):
    return b[:, 2:] ^ 0x80, _f16(b, 0)[:, None], None  # two's complement q + 128 as an unsigned byte


def _q2_k(b):
    sc = b[:, :16]
    return (_crumbs(b[:, 16:80], 2).reshape(-1, 16, 16), _f16(b, 80)[:, None] * (sc & 15),
            -(_f16(b, 82)[:, None] * (sc >> 4)))


def _q3_k(b):
    n, raw = b.shape[0], b[:, 96:108]
    lo = _nibbles(raw[:, :8], 1).reshape(n, 16)
    hi = _fields(raw[:, 8:12], 1, 2, 4).reshape(n, 16)
    dl = _f16(b, 108)[:, None] * ((lo | (hi << 4)).view(torch.int8) - 32)
    u = _crumbs(b[:, 32:96], 2).reshape(n, 8, 32) | (_planes(b[:, :32]) << 2)
    return u.reshape(n, 16, 16), dl, None


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
    return u.reshape(n, 16, 16), dl, None


# ggml type -> (unpack blocks -> (u, d, m or None), storage, group size, fp16 scales, symmetric offset)
FORMATS: dict[int, tuple[Callable, str, int, bool, float]] = {
    L.Q4_0: (_q4_0, "q4", 32, True, -8.0), L.Q4_1: (_q4_1, "q4", 32, True, 0.0),
    L.Q4_K: (_q4_k, "q4", 32, False, 0.0), L.Q5_0: (_q5_0, "q5", 32, True, -16.0),
    L.Q5_1: (_q5_1, "q5", 32, True, 0.0), L.Q5_K: (_q5_k, "q5", 32, False, 0.0),
    L.Q8_0: (_q8_0, "q8", 32, True, -128.0), L.Q2_K: (_q2_k, "q8", 16, False, 0.0),
    L.Q3_K: (_q3_k, "q8", 16, False, -4.0), L.Q6_K: (_q6_k, "q8", 16, False, -32.0),
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


def high_bits(u: torch.Tensor) -> torch.Tensor:
    """uint8 u [R, K] -> [R, K/8]: bit i of byte b is bit 4 of u[8 b + i] (64-bit words in order)."""
    R, K = u.shape
    bits = ((u >> 4) & 1).reshape(R, K // 8, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def pack(raw: torch.Tensor, ggml_type: int, shape: tuple[int, int]) -> PackedWeight:
    """raw uint8 [N, bytes per row] GGUF blocks -> PackedWeight, a few million weights at a time."""
    fn, kind, group, f16, offset = FORMATS[ggml_type]
    qk, bs = L.BLOCK[ggml_type]
    N, K = shape
    Np, ng = N + N % 2, K // group
    qs = torch.zeros(Np, K if kind == "q8" else K // 2, dtype=torch.uint8)
    hb = torch.zeros(Np, K // 8, dtype=torch.uint8) if kind == "q5" else None
    d = torch.zeros(Np, ng)
    m = torch.zeros(Np, ng) if not offset else None
    rows = max(1, _CHUNK // K)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        u, dd, mm = fn(raw[r0:r1].reshape(-1, bs))
        u = u.reshape(r1 - r0, K)
        qs[r0:r1] = u if kind == "q8" else nibble_layout(u & 15)
        if hb is not None:
            hb[r0:r1] = high_bits(u)
        d[r0:r1] = dd.reshape(r1 - r0, ng)
        if m is not None:
            m[r0:r1] = mm.reshape(r1 - r0, ng)
    if f16:
        dh = d.half()
        mh = m.half() if m is not None else None
        if torch.equal(dh.float(), d) and (m is None or torch.equal(mh.float(), m)):
            d, m = dh, mh
    return PackedWeight(qs, hb, d, m, offset, kind, group, (N, K))


def unpack(w: PackedWeight) -> torch.Tensor:
    """The fp32 weights d * u + m (tests: must equal kernels/ref_quant.dequantize exactly)."""
    N, K = w.shape
    qs = w.qs[:N]
    if w.kind != "q8":
        full = K // 128 * 128
        head = qs[:, : full // 2].reshape(N, -1, 64)
        parts = [torch.stack([head & 15, head >> 4], dim=2).reshape(N, full)]
        if K > full:
            tail = qs[:, full // 2:]
            parts.append(torch.cat([tail & 15, tail >> 4], dim=1))
        u = torch.cat(parts, dim=1)
        if w.hb is not None:
            bits = (w.hb[:N, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1
            u = u | (bits.reshape(N, K) << 4)
    else:
        u = qs
    d = w.d[:N].float()
    m = w.m[:N].float() if w.m is not None else w.offset * d
    return u.float() * d.repeat_interleave(w.group, dim=1) + m.repeat_interleave(w.group, dim=1)


def unpack_rows(w: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows `ids` of the matrix (an embedding lookup on a tied lm_head)."""
    ids = ids.long()
    pick = lambda t: None if t is None else t.index_select(0, ids)  # noqa: E731
    sub = PackedWeight(pick(w.qs), pick(w.hb), pick(w.d), pick(w.m), w.offset, w.kind, w.group,
                       (ids.shape[0], w.shape[1]))
    return unpack(sub)
