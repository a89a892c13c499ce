"""Vectorized torch dequantization of GGUF blocks: the CPU load path and the test oracle.

Bit-exact with `gguf.quants.dequantize`: every value is computed in fp32 with the same operations
in the same order (see kernels/quant_layouts.py), then cast to the requested dtype once.

Raw rows are viewed as [n_blocks, block_bytes] and processed in chunks of about 2M weights so the
integer temporaries stay in the L3 cache; each chunk writes straight into the output (through an
fp32 scratch buffer when the output dtype is not fp32). Speed (2 cores): gemma-3-270m's 262144 x
640 Q8_0 embedding in about 0.35 s, Q4/Q5 types 1-2 ns per weight, 2-7x gguf's numpy code.
Torch's element-wise ops are fast on long inner dimensions and on scalar operands, slow on shifts
by a broadcast tensor over short rows: hence scalar shifts per field and bit tables below.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import quant_layouts as L

_CHUNK_ELEMS = 1 << 21


def _bit_lut(one: int, zero: int) -> torch.Tensor:
    """int64 [256]: byte i of entry v is `one` if bit i of v is set, else `zero` (as uint8)."""
    vals = [sum(((one if (v >> i) & 1 else zero) & 255) << (8 * i) for i in range(8)) for v in range(256)]
    return torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in vals], dtype=torch.int64)


# Expanding bits through a table is one gather; shifting a broadcast [n, 4, 8] is a slow, tiny-inner-dim loop.
_HI16 = _bit_lut(16, 0)  # the fifth bit of Q5_1, already shifted
_HI16_M16 = _bit_lut(0, -16)  # Q5_0: (bit << 4) - 16, so q - 16 = low nibble + this (int8)


def _f16(b: torch.Tensor, byte_off: int) -> torch.Tensor:
    """The f16 field at `byte_off` of each block, as fp32 [n] (every f16 field sits at an even offset)."""
    return b.view(torch.float16)[:, byte_off // 2].float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """qs [n, G*W] -> uint8 [n, G, 2, W]: the low nibbles of each group of W bytes, then its high nibbles."""
    n = qs.shape[0]
    q3 = qs.reshape(n, groups, -1)
    out = torch.empty(n, groups, 2, q3.shape[2], dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(q3, 15, out=out[:, :, 0])
    torch.bitwise_right_shift(q3, 4, out=out[:, :, 1])
    return out


def _expand(qh: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """qh [n, W] -> uint8 [n, W * 8] via `lut`: element 8w + i comes from bit i of byte w."""
    lut = lut.to(qh.device)
    return lut.index_select(0, qh.reshape(-1).long()).view(torch.uint8).view(qh.shape[0], -1)


def _fields(qs: torch.Tensor, groups: int, width: int, count: int) -> torch.Tensor:
    """qs [n, G*W] -> uint8 [n, G, count, W]: field f of each byte is (byte >> width*f) & mask.

    One scalar shift per field: torch vectorizes those, not a shift by a broadcast tensor."""
    n = qs.shape[0]
    q3 = qs.reshape(n, groups, -1)
    out = torch.empty(n, groups, count, q3.shape[2], dtype=torch.uint8, device=qs.device)
    mask = (1 << width) - 1
    for f in range(count):
        torch.bitwise_and(q3 >> (width * f) if f else q3, mask, out=out[:, :, f])
    return out


def _planes(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 32] -> uint8 [n, 8, 32]: plane i holds bit i of every byte."""
    return _fields(qh, 1, 1, 8).view(qh.shape[0], 8, 32)


def _crumbs(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """qs [n, G*32] -> uint8 [n, G, 4, 32]: 2-bit fields at shifts 0, 2, 4, 6 of each group of 32 bytes."""
    return _fields(qs, groups, 2, 4)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 2:18], 1).view(torch.int8).reshape(-1, 32) - 8
    torch.mul(q, _f16(b, 0)[:, None], out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_nibbles(b[:, 4:20], 1).reshape(-1, 32), _f16(b, 0)[:, None], out=out)
    out.add_(_f16(b, 2)[:, None])


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    lo = _nibbles(b[:, 6:22], 1).view(torch.int8).reshape(-1, 32)
    q = lo + _expand(b[:, 2:6], _HI16_M16).view(torch.int8)  # (low | high << 4) - 16, in int8
    torch.mul(q, _f16(b, 0)[:, None], out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:24], 1).reshape(-1, 32) | _expand(b[:, 4:8], _HI16)
    torch.mul(q, _f16(b, 0)[:, None], out=out)
    out.add_(_f16(b, 2)[:, None])


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b[:, 2:].view(torch.int8))  # in place: a mixed-dtype mul would build an fp32 temporary
    out.mul_(_f16(b, 0)[:, None])


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    sc = b[:, :16]
    dl = _f16(b, 80)[:, None] * (sc & 15)  # [n, 16] fp32
    ml = _f16(b, 82)[:, None] * (sc >> 4)
    q = _crumbs(b[:, 16:80], 2).reshape(n, 16, 16)
    o = out.view(n, 16, 16)
    torch.mul(q, dl[:, :, None], out=o)
    o.sub_(ml[:, :, None])


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    raw = b[:, 96:108]
    lo = _nibbles(raw[:, :8], 1).reshape(n, 16)  # low 4 bits of scale i: byte i%8, nibble i//8
    hi = _fields(raw[:, 8:12], 1, 2, 4).reshape(n, 16)  # high 2 bits of scale i: byte i%4, shift 2*(i//4)
    dl = _f16(b, 108)[:, None] * ((lo | (hi << 4)).view(torch.int8) - 32)  # [n, 16] fp32
    # q = ql - 4 where the hmask bit is clear: since ql < 4, that is (ql | bit << 2) - 4.
    q = (_crumbs(b[:, 32:96], 2).reshape(n, 8, 32) | (_planes(b[:, :32]) << 2)).view(torch.int8) - 4
    torch.mul(q.view(n, 16, 16), dl[:, :, None], out=out.view(n, 16, 16))


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins -> two uint8 [n, 8]."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> None:
    """(d * sc) * q - dmin * m over 8 sub-blocks of 32; q is [n, 8, 32]."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = _f16(b, 0)[:, None] * sc
    ml = _f16(b, 2)[:, None] * mn
    o = out.view(n, 8, 32)
    torch.mul(q, dl[:, :, None], out=o)
    o.sub_(ml[:, :, None])


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    _k_affine(b, _nibbles(b[:, 16:144], 4).reshape(-1, 8, 32), out)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    q = _nibbles(b[:, 48:176], 4).reshape(n, 8, 32) | (_planes(b[:, 16:48]) << 4)
    _k_affine(b, q, out)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    # [half, nibble, 64 bytes] flattens to half*128 + nibble*64 + l: the same order as qh's [half, shift, 32]
    ql = _nibbles(b[:, :128], 2).reshape(n, 2, 4, 32)
    q = (ql | (_crumbs(b[:, 128:192], 2) << 4)).view(torch.int8) - 32
    dl = _f16(b, 208)[:, None] * b[:, 192:208].view(torch.int8)
    torch.mul(q.view(n, 16, 16), dl[:, :, None], out=out.view(n, 16, 16))


_BLOCK_FNS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    L.Q4_0: _q4_0, L.Q4_1: _q4_1, L.Q5_0: _q5_0, L.Q5_1: _q5_1, L.Q8_0: _q8_0,
    L.Q2_K: _q2_k, L.Q3_K: _q3_k, L.Q4_K: _q4_k, L.Q5_K: _q5_k, L.Q6_K: _q6_k,
}
_FLOAT_VIEW = {L.F32: torch.float32, L.F16: torch.float16, L.BF16: torch.bfloat16}


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """raw: uint8 [rows, bytes_per_row] blocks -> dense `dtype` tensor of logical `shape` (raw's device)."""
    qk, bs = L.check_type(ggml_type)
    numel = math.prod(shape)
    raw = raw.contiguous().view(-1)
    if raw.numel() != numel // qk * bs or numel % qk:
        raise ValueError(f"{L.NAMES[ggml_type]}: {raw.numel()} bytes do not hold a tensor of shape {tuple(shape)}")
    if ggml_type in _FLOAT_VIEW:
        # bf16 -> fp32 and f16 -> fp32 are exact; copy so the result never aliases a (read-only) mmap.
        return raw.view(_FLOAT_VIEW[ggml_type]).to(dtype, copy=True).reshape(shape)
    fn = _BLOCK_FNS[ggml_type]
    blocks = raw.view(-1, bs)
    nb = blocks.shape[0]
    out = torch.empty(nb, qk, dtype=dtype, device=raw.device)
    step = max(1, _CHUNK_ELEMS // qk)
    scratch = None if dtype == torch.float32 else torch.empty(min(step, nb), qk, device=raw.device)
    for s in range(0, nb, step):
        e = min(nb, s + step)
        if scratch is None:
            fn(blocks[s:e], out[s:e])
        else:
            fn(blocks[s:e], scratch[: e - s])
            out[s:e].copy_(scratch[: e - s])
    return out.view(shape)
