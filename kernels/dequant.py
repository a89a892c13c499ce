"""Triton dequantization of GGUF blocks, and the per-element decoder the matmul kernels share.

Memory layout: `raw` is uint8 [rows, row_bytes]; row r starts at byte r * row_bytes and holds
cols / QK blocks of BS bytes (kernels/quant_layouts.py). Blocks of 18/22/34/110/210 bytes are not
4-byte aligned, so every field is read with uint8 loads and f16 fields are rebuilt from two bytes
(kernels.md). F32/F16/BF16 weights arrive viewed as float32/float16/int16 elements instead.
Grid: (cdiv(rows, BLOCK_R), cdiv(cols, NSUB * SUB)); each program decodes a [BLOCK_R, NSUB, SUB]
tile (SUB weights sharing a scale innermost) and stores it in the output dtype. Launched with
enable_fp_fusion=False: a fused multiply-add would round once where gguf rounds twice (d * q + m),
and dequantization must be bit-exact.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import quant_layouts as L


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """Little-endian f16 at byte pointer p (two byte loads: the field may be unaligned) -> fp32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _i2f(q, off):
    """Small non-negative int32 q -> float(q - off), exact: q in the mantissa of 2^23, then one
    subtraction (int -> float conversion instructions run at a fraction of the FP32 rate)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + off)


@triton.jit
def _k_scale_min(sc_p, t, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block t (0..7) from the 12 packed bytes at sc_p."""
    lo = t < 4
    t4 = t % 4
    a = _u8(sc_p + t4, mask)  # bytes 0..3: scales 0..3 (low 6 bits), high 2 bits of scales 4..7
    b = _u8(sc_p + 4 + t4, mask)  # bytes 4..7: mins 0..3, high bits of mins 4..7
    c = _u8(sc_p + 8 + t4, mask)  # bytes 8..11: low 4 bits of scales / mins 4..7
    sc = tl.where(lo, a & 63, (c & 15) | ((a >> 2) & 48))
    mn = tl.where(lo, b & 63, (c >> 4) | ((b >> 2) & 48))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def decode_sub(w_ptr, row_off, s, l, mask_s, mask, TYPE: tl.constexpr, SUB: tl.constexpr):
    """Weight k = s * SUB + l of the row at w_ptr + row_off as (q, a, c): w = a * q + c for Q4_1
    and Q5_1, w = a * q - c for Q2_K, Q4_K and Q5_K, w = a * q for the other block types; q per
    weight (fp32, an exact small integer), a and c per sub-block. Float types return the weight
    itself as q (a, c unused). c is never negated: Triton 3.6 computes -x as 0 - x, which turns
    -0.0 into +0.0 and would break bit-exactness.

    s indexes sub-blocks of SUB weights sharing a scale (quant_layouts.sub_size). What depends only
    on (row_off, s) -- block pointers, f16 scales, packed sub-block scales -- is computed on the
    small [rows, subs] shape; quants on the full tile, with l (contiguous bytes) fastest. mask_s
    masks (row, sub-block), mask every weight. For block types row_off is in bytes; for F32/F16/BF16
    in elements of w_ptr's type. Scale arithmetic follows gguf.quants in order (bit-exactness).
    """
    zero = 0.0
    if TYPE == 0:  # F32
        q = tl.load(w_ptr + row_off + s * SUB + l, mask=mask, other=0.0)
        a, c = zero, zero
    elif TYPE == 1:  # F16
        q = tl.load(w_ptr + row_off + s * SUB + l, mask=mask, other=0.0).to(tl.float32)
        a, c = zero, zero
    elif TYPE == 30:  # BF16 stored as int16: its bits are the top half of an fp32
        v = tl.load(w_ptr + row_off + s * SUB + l, mask=mask, other=0).to(tl.int32)
        q = (v << 16).to(tl.float32, bitcast=True)
        a, c = zero, zero
    elif TYPE == 2:  # Q4_0: one 32-weight block per sub-block; w = d * (q - 8)
        p = w_ptr + row_off + s * 18
        q = _i2f((_u8(p + 2 + l % 16, mask) >> ((l // 16) * 4)) & 15, 8.0)
        a, c = _f16(p, mask_s), zero
    elif TYPE == 3:  # Q4_1: w = d * q + m
        p = w_ptr + row_off + s * 20
        q = _i2f((_u8(p + 4 + l % 16, mask) >> ((l // 16) * 4)) & 15, 0.0)
        a, c = _f16(p, mask_s), _f16(p + 2, mask_s)
    elif TYPE == 6:  # Q5_0: w = d * (q - 16), q = low nibble | bit l of qh << 4
        p = w_ptr + row_off + s * 22
        q = (_u8(p + 6 + l % 16, mask) >> ((l // 16) * 4)) & 15
        q = _i2f(q | (((_u8(p + 2 + l // 8, mask) >> (l % 8)) & 1) << 4), 16.0)
        a, c = _f16(p, mask_s), zero
    elif TYPE == 7:  # Q5_1: w = d * q + m
        p = w_ptr + row_off + s * 24
        q = (_u8(p + 8 + l % 16, mask) >> ((l // 16) * 4)) & 15
        q = _i2f(q | (((_u8(p + 4 + l // 8, mask) >> (l % 8)) & 1) << 4), 0.0)
        a, c = _f16(p, mask_s), _f16(p + 2, mask_s)
    elif TYPE == 8:  # Q8_0: w = q * d, q int8 (flipping the sign bit biases it by 128)
        p = w_ptr + row_off + s * 34
        q = _i2f(_u8(p + 2 + l, mask) ^ 128, 128.0)
        a, c = _f16(p, mask_s), zero
    elif TYPE == 10:  # Q2_K: sub-block t of 16: 4-bit scale and min; 2-bit quants
        t = s % 16
        p = w_ptr + row_off + (s // 16) * 84
        sc = _u8(p + t, mask_s)
        a = _f16(p + 80, mask_s) * (sc & 15).to(tl.float32)
        c = _f16(p + 82, mask_s) * (sc >> 4).to(tl.float32)
        q = _i2f((_u8(p + 16 + (t // 8) * 32 + (t % 2) * 16 + l, mask) >> (((t % 8) // 2) * 2)) & 3, 0.0)
    elif TYPE == 11:  # Q3_K: 2 low bits + inverted high bit (q - 4 where clear); signed 6-bit scales
        t = s % 16
        p = w_ptr + row_off + (s // 16) * 110
        lo = (_u8(p + 96 + t % 8, mask_s) >> ((t // 8) * 4)) & 15
        hi = (_u8(p + 104 + t % 4, mask_s) >> ((t // 4) * 2)) & 3
        a, c = _f16(p + 108, mask_s) * ((lo | (hi << 4)) - 32).to(tl.float32), zero
        ql = (_u8(p + 32 + (t // 8) * 32 + (t % 2) * 16 + l, mask) >> (((t % 8) // 2) * 2)) & 3
        q = _i2f(ql | (((_u8(p + (t % 2) * 16 + l, mask) >> (t // 2)) & 1) << 2), 4.0)
    elif TYPE == 12:  # Q4_K: 8 sub-blocks of 32, 6-bit scales and mins: (d * sc) * q - dmin * m
        t = s % 8
        p = w_ptr + row_off + (s // 8) * 144
        sc, mn = _k_scale_min(p + 4, t, mask_s)
        a, c = _f16(p, mask_s) * sc, _f16(p + 2, mask_s) * mn
        q = _i2f((_u8(p + 16 + (t // 2) * 32 + l, mask) >> ((t % 2) * 4)) & 15, 0.0)
    elif TYPE == 13:  # Q5_K: Q4_K plus a fifth bit from qh
        t = s % 8
        p = w_ptr + row_off + (s // 8) * 176
        sc, mn = _k_scale_min(p + 4, t, mask_s)
        a, c = _f16(p, mask_s) * sc, _f16(p + 2, mask_s) * mn
        q = (_u8(p + 48 + (t // 2) * 32 + l, mask) >> ((t % 2) * 4)) & 15
        q = _i2f(q | (((_u8(p + 16 + l, mask) >> t) & 1) << 4), 0.0)
    else:  # Q6_K: 4 low bits in ql, 2 high bits in qh, signed 8-bit scales per 16: (d * sc) * (q - 32)
        t = s % 16
        half = t // 8
        t8 = t % 8
        p = w_ptr + row_off + (s // 16) * 210
        sc = tl.load(p + 192 + t, mask=mask_s, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        a, c = _f16(p + 208, mask_s) * sc, zero
        ql = (_u8(p + half * 64 + (t8 % 4) * 16 + l, mask) >> ((t8 // 4) * 4)) & 15
        qh = (_u8(p + 128 + half * 32 + (t8 % 2) * 16 + l, mask) >> ((t8 // 2) * 2)) & 3
        q = _i2f(ql | (qh << 4), 32.0)
    return q, a, c


@triton.jit
def dequant_sub(w_ptr, row_off, s, l, mask_s, mask, TYPE: tl.constexpr, SUB: tl.constexpr):
    """The weights themselves, fp32, bit-exact with gguf.quants (see decode_sub for the arguments)."""
    q, a, c = decode_sub(w_ptr, row_off, s, l, mask_s, mask, TYPE, SUB)
    # conditions spelled out on TYPE (a constexpr): a jit helper returning a constexpr is not
    # folded at compile time by every Triton version we support (3.6+)
    if TYPE == 0 or TYPE == 1 or TYPE == 30:
        w = q
    elif TYPE == 3 or TYPE == 7:
        w = a * q + c
    elif TYPE == 10 or TYPE == 12 or TYPE == 13:
        w = a * q - c
    else:
        w = a * q
    return w


@triton.jit
def dequant_kernel(
    w_ptr, out_ptr, rows, cols, w_row_stride,
    TYPE: tl.constexpr, SUB: tl.constexpr, BLOCK_R: tl.constexpr, NSUB: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    s = tl.program_id(1) * NSUB + tl.arange(0, NSUB)
    l = tl.arange(0, SUB)
    r3 = r[:, None, None]
    s3 = s[None, :, None]
    k3 = s3 * SUB + l[None, None, :]
    mask_s = (r3 < rows) & (s3 * SUB < cols)
    mask = mask_s & (k3 < cols)
    w = dequant_sub(w_ptr, r3 * w_row_stride, s3, l[None, None, :], mask_s, mask, TYPE, SUB)
    tl.store(out_ptr + r3 * cols + k3, w.to(out_ptr.dtype.element_ty), mask=mask)


_FLOAT_VIEW = {L.F32: torch.float32, L.F16: torch.float16, L.BF16: torch.int16}
DEQUANT_TILE = (8, 256)  # (rows, weights per row) per program: 2048 weights, a multiple of every block


def weight_view(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """raw uint8 [rows, row_bytes] as the kernels read it: typed elements for F32/F16/BF16."""
    if raw.stride(-1) != 1:
        raw = raw.contiguous()
    v = _FLOAT_VIEW.get(ggml_type)
    return raw.view(v) if v is not None else raw


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """raw: uint8 [rows, bytes_per_row] blocks -> dense `dtype` tensor of `shape` on raw's device
    (written into `out`, contiguous, when given)."""
    cols = shape[-1]
    rows = math.prod(shape) // cols if cols else 0
    nbytes = L.row_bytes(ggml_type, cols)  # raises for unsupported types and partial blocks
    if raw.numel() != rows * nbytes:
        raise ValueError(f"{L.NAMES[ggml_type]}: {raw.numel()} bytes do not hold a tensor of shape {tuple(shape)}")
    raw = weight_view(raw.reshape(rows, nbytes), ggml_type)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    elif not out.is_contiguous() or out.numel() != rows * cols:
        raise ValueError("dequantize: `out` must be contiguous with the output's number of elements")
    if out.numel() == 0:
        return out
    br, bc = DEQUANT_TILE
    sub = L.sub_size(ggml_type)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    dequant_kernel[grid](
        raw, out, rows, cols, raw.stride(0),
        TYPE=ggml_type, SUB=sub, BLOCK_R=br, NSUB=bc // sub, num_warps=4, enable_fp_fusion=False,
    )
    return out
