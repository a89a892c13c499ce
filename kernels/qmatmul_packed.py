"""Matmuls on packed planes (kernels/packed.py): y[M, N] = x[M, K] @ w[N, K]^T (+ bias, or the gated
activation of a [gate; up] pair), fp32 accumulation, output in x's dtype.

- `gemv_kernel` (M = 1). Grid (row tiles, splits). A program owns BG groups of 8 interleaved rows
  and walks its K range in steps of C groups of 32 weights. Thread layout of a step: [BG, C, 8]
  words, i.e. each thread holds one quant word of 8 rows (two 16-byte loads) and one group of 32
  weights; it reads each activation once for 8 rows and accumulates per thread across the whole
  K loop (packed_decode.word_value: one LOP3 per value, one FFMA). The 8 x C partial sums are reduced
  across threads once, after the loop: no shuffles inside it.
- `mm_kernel` (M >= 2). Grid (M tiles, N tiles, splits). Each K step decodes a [BLOCK_N, BLOCK_K]
  weight tile (packed_decode.tile) and multiplies on tensor cores (tl.dot, M padded to 16).
- Split-K without a reduce launch: each split stores fp32 partials in a workspace [split, M, N'],
  bumps its tile's arrival counter (kernels/workspace.py), and the last split to arrive sums the
  partials in split order (deterministic, one writer per output), applies the epilogue, stores the
  result and resets the counter.
- Epilogues: bias [N] (fp32) added once; with a [gate; up] pair (PAIR = gate rows) a program also
  computes the up rows PAIR below its gate rows and stores act(gate) * up ([M, PAIR] output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import packed as P
from . import workspace as W
from .packed_decode import shifted, tile, word_value


@triton.jit
def _gated(g, u, ACT: tl.constexpr):
    """act(gate) * up in fp32: 1 = silu, 2 = gelu (tanh approximation, through exp: no libdevice)."""
    if ACT == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:
        a = g / (1.0 + tl.exp(-g))
    return a * u


@triton.jit
def _store(out_ptr, b_ptr, y, y_up, m, n, mask, stride_om, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    if ACT != 0:
        y = _gated(y, y_up, ACT)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms(v, w_ptr, cols, mask, N, eps):
    """v * rsqrt(mean(v^2) + eps) * w[cols] (fp32)."""
    inv = tl.rsqrt(tl.sum(v * v, 0) / N + eps)
    return v * inv * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_tail(out_ptr, res_ptr, g_ptr, g1_ptr, hout_ptr, cnt_ptr, row_id, n_tiles, row0, M, N, stride_om, eps,
              BM: tl.constexpr, NB: tl.constexpr, TAIL: tl.constexpr):
    """Once every N tile of rows row0 .. row0 + BM - 1 is stored (the last program to arrive does
    this): y = out (the matmul), [y = rmsnorm(y, g1)], h = y + residual -> hout, out = rmsnorm(h, g).
    Each sum is rounded to the output dtype before it is used, as the unfused ops do."""
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr + row_id, 1, sem="acq_rel") == n_tiles - 1:
        cols = tl.arange(0, NB)
        cm = cols < N
        for i in range(BM):
            row = row0 + i
            if row < M:
                o_row = out_ptr + row.to(tl.int64) * stride_om
                y = tl.load(o_row + cols, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float32)
                if TAIL == 2:  # gemma's post-norm of the matmul output before the residual add
                    y = _rms(y, g1_ptr, cols, cm, N, eps).to(out_ptr.dtype.element_ty).to(tl.float32)
                h = y + tl.load(res_ptr + row.to(tl.int64) * N + cols, mask=cm, other=0.0).to(tl.float32)
                h = h.to(hout_ptr.dtype.element_ty)
                tl.store(hout_ptr + row.to(tl.int64) * N + cols, h, mask=cm)
                tl.store(o_row + cols, _rms(h.to(tl.float32), g_ptr, cols, cm, N, eps).to(out_ptr.dtype.element_ty),
                         mask=cm)
        tl.atomic_xchg(cnt_ptr + row_id, 0)


@triton.jit
def _finish(out_ptr, b_ptr, ws_ptr, cnt_ptr, y, y_up, m, n, mask, stride_om, ws_split, ws_row, split, tile_id,
            HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PAIR,
            res_ptr, g_ptr, g1_ptr, hout_ptr, row_off, n_tiles, row0, M, N, eps,
            BM: tl.constexpr, NB: tl.constexpr, TAIL: tl.constexpr):
    """Store y (or, with split-K, the sum of every split's y once the last split has arrived), then
    with TAIL the residual add and RMSNorm of whole rows (_row_tail)."""
    if split == 1:
        _store(out_ptr, b_ptr, y, y_up, m, n, mask, stride_om, HAS_BIAS, ACT)
        if TAIL != 0:
            _row_tail(out_ptr, res_ptr, g_ptr, g1_ptr, hout_ptr, cnt_ptr + row_off, row0 // BM, n_tiles, row0, M, N,
                      stride_om, eps, BM, NB, TAIL)
    else:
        pid_s = tl.program_id(2)
        part = ws_ptr + m.to(tl.int64) * ws_row + n
        tl.store(part + pid_s * ws_split, y, mask=mask)
        if ACT != 0:
            tl.store(part + pid_s * ws_split + PAIR, y_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        if tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel") == split - 1:
            tot = tl.zeros(y.shape, tl.float32)
            tot_up = tl.zeros(y.shape, tl.float32)
            for s in range(split):
                tot += tl.load(part + s * ws_split, mask=mask, other=0.0, cache_modifier=".cg")
                if ACT != 0:
                    tot_up += tl.load(part + s * ws_split + PAIR, mask=mask, other=0.0, cache_modifier=".cg")
            _store(out_ptr, b_ptr, tot, tot_up, m, n, mask, stride_om, HAS_BIAS, ACT)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
            if TAIL != 0:
                _row_tail(out_ptr, res_ptr, g_ptr, g1_ptr, hout_ptr, cnt_ptr + row_off, row0 // BM, n_tiles, row0, M,
                          N, stride_om, eps, BM, NB, TAIL)


@triton.jit
def _gemv_rows(x_ptr, q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, g, gmask, kg_lo, kg_hi, K,
               TYPE: tl.constexpr, QBITS: tl.constexpr, HBITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
               OFF: tl.constexpr, BG: tl.constexpr, C: tl.constexpr):
    """sum over k in groups [kg_lo, kg_hi) of x[k] * w[8g + r, k] -> [BG, 8] (g: [BG, 1, 1] int64)."""
    r = tl.arange(0, 8)[None, None, :]
    c = tl.arange(0, C)[None, :, None]
    VPW: tl.constexpr = 32 // QBITS  # values per word
    WPG: tl.constexpr = 32 // VPW  # words per group of 32 weights
    NSG: tl.constexpr = 2 if S == 16 else 1  # scale groups per 32 weights
    KG = K // 32
    acc = tl.zeros([BG, C, 8], dtype=tl.float32)
    for kg0 in range(kg_lo, kg_hi, C):
        grp = kg0 + c
        gm = grp < kg_hi
        msk = gmask & gm
        d = tl.load(d_ptr + (g * (K // G) + grp // (G // 32)) * 8 + r, mask=msk, other=0.0).to(tl.float32)
        if S == 32:  # K-quants: a = d * sc, c = -(dmin * mn)
            sc = tl.load(sc_ptr + (g * KG + grp) * 8 + r, mask=msk, other=0).to(tl.float32)
            mn = tl.load(mn_ptr + (g * KG + grp) * 8 + r, mask=msk, other=0).to(tl.float32)
            dmin = tl.load(m_ptr + (g * (K // G) + grp // (G // 32)) * 8 + r, mask=msk, other=0.0).to(tl.float32)
            a0 = d * sc
            c0 = -(dmin * mn)
        elif TYPE == 3 or TYPE == 7:  # w = d * q + m
            a0 = d
            c0 = tl.load(m_ptr + (g * KG + grp) * 8 + r, mask=msk, other=0.0).to(tl.float32)
        else:
            a0 = d
            c0 = d * (-OFF)
        if HBITS == 1:
            hw0 = tl.load(h_ptr + (g * KG + grp) * 8 + r, mask=msk, other=0).to(tl.uint32, bitcast=True)
        for half in tl.static_range(NSG):
            if S == 16:  # Q6_K: a scale per 16 weights, two high bits per weight, a word per 16
                sc = tl.load(sc_ptr + (g * (2 * KG) + 2 * grp + half) * 8 + r, mask=msk, other=0)
                a0 = d * sc.to(tl.int8, bitcast=True).to(tl.float32)
                c0 = a0 * (-OFF)
                hw0 = tl.load(h_ptr + (g * (2 * KG) + 2 * grp + half) * 8 + r, mask=msk,
                              other=0).to(tl.uint32, bitcast=True)
            s8 = tl.zeros([BG, C, 8], dtype=tl.float32)
            s12 = tl.zeros([BG, C, 8], dtype=tl.float32)
            s16 = tl.zeros([BG, C, 8], dtype=tl.float32)
            x8 = tl.zeros([1, C, 1], dtype=tl.float32)
            x12 = tl.zeros([1, C, 1], dtype=tl.float32)
            x16 = tl.zeros([1, C, 1], dtype=tl.float32)
            for uu in tl.static_range(WPG // NSG):
                u = half * (WPG // NSG) + uu
                w = tl.load(q_ptr + (g * (KG * WPG) + grp * WPG + u) * 8 + r, mask=msk,
                            other=0).to(tl.uint32, bitcast=True)
                wlo = w << 8
                whi = w >> 12
                for j in tl.static_range(VPW):
                    P = 8 if QBITS == 8 else 4 * j + 8 if j < 2 else 4 * j if j < 5 else 4 * j - 12  # value_pos
                    xj = tl.load(x_ptr + grp * 32 + u * VPW + j, mask=gm, other=0.0).to(tl.float32)
                    if HBITS == 1:
                        hi = shifted(hw0, u * 8 + j - (P + 4)) & (1 << (P + 4))
                    elif HBITS == 2:
                        hi = shifted(hw0, 2 * (uu * 8 + j) - (P + 4)) & (3 << (P + 4))
                    else:
                        hi = 0
                    f = word_value(w, wlo, whi, j, QBITS, hi)
                    if P == 8:
                        s8 += xj * f
                        x8 += xj
                    elif P == 12:
                        s12 += xj * f
                        x12 += xj
                    else:
                        s16 += xj * f
                        x16 += xj
            # sum x * q = 2^(23 - P) * (sum x * f - sum x) per mantissa position P
            sq = 32768.0 * (s8 - x8) + 2048.0 * (s12 - x12) + 128.0 * (s16 - x16)
            acc += a0 * sq + c0 * (x8 + x12 + x16)
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(
    x_ptr, q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, out_ptr, ws_ptr, cnt_ptr, b_ptr,
    res_ptr, g_ptr, g1_ptr, hout_ptr, N, K, groups_per_split, split, PAIR, eps,
    TYPE: tl.constexpr, QBITS: tl.constexpr, HBITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    OFF: tl.constexpr, BG: tl.constexpr, C: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    NB: tl.constexpr, TAIL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(2)
    gi = pid_n * BG + tl.arange(0, BG)
    g = gi.to(tl.int64)[:, None, None]
    gmask = g * 8 < N
    kg_lo = pid_s * groups_per_split
    kg_hi = tl.minimum(kg_lo + groups_per_split, K // 32)
    y = _gemv_rows(x_ptr, q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, g, gmask, kg_lo, kg_hi, K,
                   TYPE, QBITS, HBITS, G, S, OFF, BG, C)
    if ACT != 0:
        y_up = _gemv_rows(x_ptr, q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, g + PAIR // 8, gmask, kg_lo, kg_hi, K,
                          TYPE, QBITS, HBITS, G, S, OFF, BG, C)
    else:
        y_up = y
    n = gi[:, None] * 8 + tl.arange(0, 8)[None, :]
    m = tl.zeros([BG, 8], tl.int32)
    _finish(out_ptr, b_ptr, ws_ptr, cnt_ptr, y, y_up, m, n, n < N, 0, 2 * N, 0, split, pid_n, HAS_BIAS, ACT, PAIR,
            res_ptr, g_ptr, g1_ptr, hout_ptr, tl.num_programs(0), tl.num_programs(0), 0, 1, N, eps, 1, NB, TAIL)


@triton.jit
def mm_kernel(
    x_ptr, q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, out_ptr, ws_ptr, cnt_ptr, b_ptr,
    res_ptr, g_ptr, g1_ptr, hout_ptr, M, N, K, stride_xm, stride_om, k_per_split, split, PAIR, eps,
    TYPE: tl.constexpr, QBITS: tl.constexpr, HBITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    OFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    NB: tl.constexpr, TAIL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_col = n[None, :].to(tl.int64)  # weight rows [1, BLOCK_N]
    n_ok = n_col < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    for k0 in range(k_lo, k_hi, 32):  # k_per_split is a multiple of 32
        kk = k0 + tl.arange(0, 32)
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
        w = tile(q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n_col, k0, n_ok, K, TYPE, QBITS, HBITS, G, S, OFF)
        acc = _mma(x, w, acc)
        if ACT != 0:
            wu = tile(q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n_col + PAIR, k0, n_ok, K, TYPE, QBITS, HBITS, G,
                      S, OFF)
            acc_up = _mma(x, wu, acc_up)
    mm = m[:, None]
    nn = n[None, :]
    tile_id = pid_m * tl.num_programs(1) + pid_n
    _finish(out_ptr, b_ptr, ws_ptr, cnt_ptr, acc, acc_up, mm, nn, (mm < M) & (nn < N), stride_om, M * 2 * N,
            2 * N, split, tile_id, HAS_BIAS, ACT, PAIR, res_ptr, g_ptr, g1_ptr, hout_ptr,
            tl.num_programs(0) * tl.num_programs(1), tl.num_programs(1), pid_m * BLOCK_M, M, N, eps, BLOCK_M, NB, TAIL)


@triton.jit
def _mma(x, w, acc):
    """acc + x [BM, BK] @ w [BK, BN] on tensor cores (bf16/fp16 x; fp32 x: TF32 on a GPU)."""
    if x.dtype == tl.float32:
        acc = tl.dot(x, w, acc, input_precision="tf32")
    else:
        acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit
def dequant_rows_kernel(
    q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, ids_ptr, out_ptr, n_ids, K,
    TYPE: tl.constexpr, QBITS: tl.constexpr, HBITS: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    OFF: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[i, :] = row ids[i] of the packed matrix (an embedding lookup); grid (row tiles, K / 32)."""
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * 32
    ok = (i < n_ids)[None, :]
    rows = tl.load(ids_ptr + i, mask=i < n_ids, other=0).to(tl.int64)[None, :]
    w = tile(q_ptr, h_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, ok, K, TYPE, QBITS, HBITS, G, S, OFF)
    kk = k0 + tl.arange(0, 32)[:, None]
    tl.store(out_ptr + i[None, :].to(tl.int64) * K + kk, w.to(out_ptr.dtype.element_ty), mask=ok)


# ---- launchers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedConfig:
    kernel: str  # "gemv" (M = 1) or "mm"
    block_m: int  # mm: rows of x per program
    block_n: int  # gemv: row groups of 8 per program (BG); mm: weight rows per program
    block_k: int  # gemv: groups of 32 weights per step (C); mm: 32 weights per step (the decoder's tile)
    num_warps: int


INTERPRETER_CC = (0, 0)


def _type_args(t: int) -> dict[str, int]:
    qbits, hbits, g, s, off = P.FORMAT[t]
    return {"TYPE": t, "QBITS": qbits, "HBITS": hbits, "G": g, "S": s, "OFF": off}


M_BUCKETS = (1, 16, 32, 64, 128)  # M is bucketed to the first bucket >= M (128: prefill)

# Tuned overrides: (M bucket, N, K, ggml type, (cc major, cc minor)) -> PackedConfig, written from GPU
# runs of scripts/bench_kernels.py --tune; empty until a GPU has measured something better.
TABLE: dict[tuple[int, int, int, int, tuple[int, int]], PackedConfig] = {}


def m_bucket(M: int) -> int:
    return next((b for b in M_BUCKETS if M <= b), M_BUCKETS[-1])


def choose(M: int, N: int, K: int, cc: tuple[int, int], ggml_type: int = -1) -> PackedConfig:
    """The config for an [M, K] x [N, K]^T product (N: output rows): TABLE, else the defaults."""
    tuned = TABLE.get((m_bucket(M), N, K, ggml_type, cc))
    if tuned is not None:
        return tuned
    if M == 1:
        if cc == INTERPRETER_CC:  # few large programs: the interpreter runs them one after another
            return PackedConfig("gemv", 1, 16, 8, 4)
        kg = K // 32
        warps = 4 if N >= 4096 else 2 if N >= 1024 else 1
        c = max((8, 4, 2), key=lambda c: (kg / (-(-kg // c) * c), c))  # least padding of the last step
        return PackedConfig("gemv", 1, 32 * warps // c, c, warps)
    if cc == INTERPRETER_CC:
        return PackedConfig("mm", 16 if M <= 16 else 64, 64, 32, 4)
    if M <= 16:  # 256 weight rows per program: the dequantized tile reaches shared memory through stmatrix
        return PackedConfig("mm", 16, 256, 32, 4)
    # wider tiles spill registers on sm_90 (64 x 256, 128 x 128): 64 x 64 for prefill too
    return PackedConfig("mm", 32 if M <= 32 else 64, 64, 32, 4)


def candidates(M: int) -> list[PackedConfig]:
    """Configs worth timing for M's bucket on a GPU (bench_kernels.py --tune); all compile without
    spills for every packed type (tests/test_compile_packed.py)."""
    if M == 1:
        return [PackedConfig("gemv", 1, 32 * w // c, c, w) for w in (1, 2, 4) for c in (2, 4, 8)]
    if M <= 16:
        return [PackedConfig("mm", 16, bn, 32, 4) for bn in (64, 128, 256)]
    return [PackedConfig("mm", bm, 64, 32, 4) for bm in (32, 64) if bm >= min(M, 32)]


def split_for(programs: int, steps: int, sms: int) -> int:
    """K splits so that about 2 programs per SM are in flight, each split keeping >= 2 K steps."""
    if programs >= 2 * sms:
        return 1
    return max(1, min(-(-2 * sms // programs), steps // 2, 16))


def _planes(w: P.PackedWeight) -> list:
    q = w.q
    return [q, *(t if t is not None else q for t in (w.h, w.d, w.m, w.sc, w.mn))]


@dataclass
class NormTail:
    """After the matmul, per row: [y = rmsnorm(y, post_w)]; h = y + residual -> h_out; y = rmsnorm(h, w)."""

    residual: torch.Tensor  # [M, N], contiguous
    w: torch.Tensor  # [N] fp32
    eps: float
    h_out: torch.Tensor  # [M, N], contiguous: the new residual
    post_w: torch.Tensor | None = None


def matmul(x: torch.Tensor, w: P.PackedWeight, y: torch.Tensor, bias: torch.Tensor | None, act: int,
           cc: tuple[int, int], sms: int, config: PackedConfig | None = None, split: int | None = None,
           tail: NormTail | None = None) -> None:
    """y [M, N_out] = x [M, K] @ w^T (+ bias) or act(x @ gate^T) * (x @ up^T) for a pair (act 1 silu, 2 gelu);
    with `tail`, the residual add and RMSNorm of each finished row (y becomes the normalized rows)."""
    M, K = x.shape
    n_out = w.pair if act else w.shape[0]
    cfg = config or choose(M, n_out, K, cc, w.ggml_type)
    has_bias = bias is not None
    b = bias if has_bias else y
    kw = _type_args(w.ggml_type)
    if tail is not None:
        t_args = [tail.residual, tail.w, tail.post_w if tail.post_w is not None else tail.w, tail.h_out]
        kw |= {"NB": triton.next_power_of_2(n_out), "TAIL": 2 if tail.post_w is not None else 1}
        eps = float(tail.eps)
    else:
        t_args, eps = [y, y, y, y], 0.0
        kw |= {"NB": 1, "TAIL": 0}
    if cfg.kernel == "gemv":
        if M != 1:
            raise ValueError(f"the packed GEMV takes one row of x, got {M}")
        groups = K // 32
        n_prog = triton.cdiv(triton.cdiv(n_out, 8), cfg.block_n)
        steps = triton.cdiv(groups, cfg.block_k)
        s = split if split is not None else split_for(n_prog, steps, sms)
        gps = triton.cdiv(triton.cdiv(groups, s), cfg.block_k) * cfg.block_k
        s = triton.cdiv(groups, gps)
        ws = torch.empty(s * 2 * n_out if s > 1 else 1, dtype=torch.float32, device=x.device)
        cnt = W.counters(x.device, n_prog + 1)
        gemv_kernel[(n_prog, 1, s)](
            x, *_planes(w), y, ws, cnt, b, *t_args, n_out, K, gps, s, w.pair, eps, **kw, BG=cfg.block_n,
            C=cfg.block_k,
            HAS_BIAS=has_bias, ACT=act, num_warps=cfg.num_warps, num_stages=1)
        return
    grid_m, grid_n = triton.cdiv(M, cfg.block_m), triton.cdiv(n_out, cfg.block_n)
    steps = triton.cdiv(K, cfg.block_k)
    s = split if split is not None else (split_for(grid_m * grid_n, steps, sms) if M <= 64 else 1)
    kps = triton.cdiv(triton.cdiv(K, s), cfg.block_k) * cfg.block_k
    s = triton.cdiv(K, kps)
    ws = torch.empty(s * M * 2 * n_out if s > 1 else 1, dtype=torch.float32, device=x.device)
    cnt = W.counters(x.device, grid_m * grid_n + grid_m)
    mm_kernel[(grid_m, grid_n, s)](
        x, *_planes(w), y, ws, cnt, b, *t_args, M, n_out, K, x.stride(0), y.stride(0), kps, s, w.pair, eps, **kw,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_BIAS=has_bias, ACT=act,
        num_warps=cfg.num_warps, num_stages=1)


def dequant_rows(w: P.PackedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of w, dequantized (bit-exact with gguf.quants), [len(ids), K] in dtype."""
    K = w.shape[1]
    out = torch.empty(ids.shape[0], K, dtype=dtype, device=ids.device)
    if ids.shape[0]:
        br = 16
        dequant_rows_kernel[(triton.cdiv(ids.shape[0], br), K // 32)](
            *_planes(w), ids, out, ids.shape[0], K, **_type_args(w.ggml_type), BLOCK_R=br, num_warps=4,
            enable_fp_fusion=False)
    return out
