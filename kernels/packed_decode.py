"""Triton decoders of the packed planes (kernels/packed.py), shared by the GEMV, the tensor-core
matmul and the dequantizer.

Two ways to turn quants into arithmetic:

- `word_value` (the M = 1 GEMV): value j of a quant word becomes the float 1 + q * 2^(P - 23) by
  moving it to mantissa bits P.. and or-ing in the exponent of 1.0, with P in {8, 12, 16} chosen so
  that most values need no shift (a nibble already at bits 8, 12 or 16 needs one LOP3). Then
  sum x * f - sum x = 2^(P - 23) * sum x * q: no int-to-float conversion and no per-weight subtract.
  The fp32 rounding of the sums costs about 2^(P - 23 + ...) relative: ~1e-4 at P = 8, far below the
  bf16 activations' 4e-3. The high bits of 5- and 6-bit types are moved to bit P + 4 the same way.
- `tile` (matmuls with M >= 2, dequantization): the weights of a [rows, k] tile, exact: w = a * (q -
  off) + c in fp32 in gguf's order (bit-exact when the caller compiles without FMA fusion).
"""

from __future__ import annotations

import triton
import triton.language as tl

ONE = tl.constexpr(0x3F800000)  # the bits of 1.0f


def value_pos(j: int, qbits: int) -> int:
    """Mantissa position P where value j of a word is read: bytes at 8; nibbles 0, 2, 5 at 8, 1, 3, 6
    at 12, 4 and 7 at 16 (w << 8 serves nibbles 0-1, w itself 2-4, w >> 12 5-7). Kernels spell the
    same expression inline (a jit helper returning a constexpr is not folded by every Triton)."""
    return 8 if qbits == 8 else 4 * j + 8 if j < 2 else 4 * j if j < 5 else 4 * j - 12


@triton.jit
def shifted(w, s: tl.constexpr):
    """w (uint32) shifted right by s bits (left by -s)."""
    if s > 0:
        r = w >> s
    elif s < 0:
        r = w << (-s)
    else:
        r = w
    return r


@triton.jit
def word_value(w, wsh_lo, wsh_hi, j: tl.constexpr, QBITS: tl.constexpr, hi):
    """Value j of word w as 1 + q * 2^(P - 23) (P from value_pos); `wsh_lo`/`wsh_hi` are w << 8 and
    w >> 12 (4-bit) or unused (8-bit); `hi` is the value's high bits already at P + 4 (or 0)."""
    if QBITS == 8:
        src = shifted(w, 8 * j - 8)
        f = (src & 0xFF00) | ONE
    else:
        if j < 2:
            src = wsh_lo
        elif j < 5:
            src = w
        else:
            src = wsh_hi
        f = (src & (15 << (4 * j + 8 if j < 2 else 4 * j if j < 5 else 4 * j - 12))) | hi | ONE
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _i2f(q, off: tl.constexpr):
    """Small non-negative int32 q -> float(q - off), exact: q in the mantissa of 2^23, one subtract."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + off)


@triton.jit
def tile(q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, mask, K,
         TYPE: tl.constexpr, QBITS: tl.constexpr, HBITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
         OFF: tl.constexpr):
    """The 32 weights k0 .. k0 + 31 (k0 a multiple of 32) of rows n [1, rows] (int64), k-major: fp32
    [32, rows] (the B operand of x @ w^T; consecutive rows are consecutive in the planes).

    Quant words are loaded whole ([words, rows]) and split by broadcast shifts; scales once per row."""
    g = n // 8
    r = n % 8
    VPW: tl.constexpr = 32 // QBITS
    WPG: tl.constexpr = 32 // VPW
    grp = k0 // 32
    KG = K // 32
    u = tl.arange(0, WPG)[:, None]
    words = tl.load(q_ptr + (g * (KG * WPG) + grp * WPG + u) * 8 + r, mask=mask, other=0).to(tl.uint32, bitcast=True)
    sh = (tl.arange(0, VPW) * QBITS).to(tl.uint32)[None, :, None]
    q = tl.reshape((words[:, None, :] >> sh) & ((1 << QBITS) - 1), (32, n.shape[1]))  # [32, rows], k order
    j = tl.arange(0, 32)[:, None]
    if HBITS == 1:
        hw = tl.load(h_ptr + (g * KG + grp) * 8 + r, mask=mask, other=0).to(tl.uint32, bitcast=True)
        q = q | (((hw >> j.to(tl.uint32)) & 1) << 4)
    elif HBITS == 2:
        hw0 = tl.load(h_ptr + (g * (2 * KG) + 2 * grp) * 8 + r, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hw1 = tl.load(h_ptr + (g * (2 * KG) + 2 * grp + 1) * 8 + r, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hw = tl.where(j < 16, hw0, hw1)
        q = q | (((hw >> ((j % 16) * 2).to(tl.uint32)) & 3) << 4)
    qf = _i2f(q.to(tl.int32), OFF)
    d = tl.load(d_ptr + (g * (K // G) + k0 // G) * 8 + r, mask=mask, other=0.0).to(tl.float32)
    if S == 32:  # Q4_K / Q5_K: (d * sc) * q - dmin * mn
        sc = tl.load(sc_ptr + (g * KG + grp) * 8 + r, mask=mask, other=0).to(tl.float32)
        mn = tl.load(mn_ptr + (g * KG + grp) * 8 + r, mask=mask, other=0).to(tl.float32)
        dmin = tl.load(m_ptr + (g * (K // G) + k0 // G) * 8 + r, mask=mask, other=0.0).to(tl.float32)
        w = (d * sc) * qf - dmin * mn
    elif S == 16:  # Q6_K: (d * sc) * (q - 32), sc int8 per 16
        sc0 = tl.load(sc_ptr + (g * (2 * KG) + 2 * grp) * 8 + r, mask=mask, other=0).to(tl.int8, bitcast=True)
        sc1 = tl.load(sc_ptr + (g * (2 * KG) + 2 * grp + 1) * 8 + r, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = (d * tl.where(j < 16, sc0, sc1).to(tl.float32)) * qf
    elif TYPE == 3 or TYPE == 7:  # Q4_1 / Q5_1: d * q + m
        m = tl.load(m_ptr + (g * KG + grp) * 8 + r, mask=mask, other=0.0).to(tl.float32)
        w = d * qf + m
    else:  # Q4_0 / Q5_0 / Q8_0: d * (q - off)
        w = d * qf
    return w
