"""Triton rotary position embedding, both styles, positions from a tensor.

Layout: q [T, nh, hd], k [T, nkv, hd] (last dim contiguous, token/head strides free: views of a fused
qkv projection work); positions [T]; cos_sin [max_pos, rot] fp32 with cos in the first rot/2 columns
and sin in the rest (reference.rope_cache). Pairs: neox = (i, i + rot/2), normal = (2i, 2i + 1).
Dims past `rot` pass through (partial rotary). Grid (T,): one program rotates every q and k head of
one token, reading its cos/sin row once. Math in fp32, stored in the input dtype.

`rope_store_kv` is the whole attention prologue in one launch: per-head RMSNorm of q and k (gemma3/qwen3
q_norm/k_norm), RoPE, and the store of the rotated k and of v into the paged KV cache (layout as
kernels/attention.py: [num_blocks, block_size, nkv, hd], slot = block * block_size + offset, -1 = padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope", "rope_store_kv"]


@triton.jit
def _pairs(n_heads, NH_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, NEOX: tl.constexpr):
    """Heads [NH_P, 1], the two offsets of each rotated pair [1, HALF_P] (neox: j and j + HALF;
    interleaved: 2j and 2j + 1) and their mask."""
    h = tl.arange(0, NH_P)[:, None]
    j = tl.arange(0, HALF_P)[None, :]
    if NEOX:
        i1 = j
        i2 = j + HALF
    else:
        i1 = 2 * j
        i2 = 2 * j + 1
    return h, i1, i2, (h < n_heads) & (j < HALF)


@triton.jit
def _rotate_heads(src, dst, s_h, s_dh, n_heads, cos, sin, NH_P: tl.constexpr, HALF: tl.constexpr,
                  HALF_P: tl.constexpr, HEAD_DIM: tl.constexpr, PASS_P: tl.constexpr, NEOX: tl.constexpr,
                  COPY_PASS: tl.constexpr):
    h, i1, i2, m = _pairs(n_heads, NH_P, HALF, HALF_P, NEOX)
    x1 = tl.load(src + h * s_h + i1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * s_h + i2, mask=m, other=0.0).to(tl.float32)
    ty = dst.dtype.element_ty
    tl.store(dst + h * s_dh + i1, (x1 * cos - x2 * sin).to(ty), mask=m)
    tl.store(dst + h * s_dh + i2, (x2 * cos + x1 * sin).to(ty), mask=m)
    if COPY_PASS:  # out of place with partial rotary: copy the untouched tail
        d = 2 * HALF + tl.arange(0, PASS_P)[None, :]
        pm = (h < n_heads) & (d < HEAD_DIM)
        tl.store(dst + h * s_dh + d, tl.load(src + h * s_h + d, mask=pm), mask=pm)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr, n_q, n_k, s_qt, s_qh, s_kt, s_kh,
                 s_qot, s_qoh, s_kot, s_koh, s_cs, NQ_P: tl.constexpr, NK_P: tl.constexpr,
                 HALF: tl.constexpr, HALF_P: tl.constexpr, HEAD_DIM: tl.constexpr, PASS_P: tl.constexpr,
                 NEOX: tl.constexpr, COPY_PASS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P)[None, :]
    cos = tl.load(cs_ptr + pos * s_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * s_qt, qo_ptr + t * s_qot, s_qh, s_qoh, n_q, cos, sin, NQ_P, HALF, HALF_P,
                  HEAD_DIM, PASS_P, NEOX, COPY_PASS)
    _rotate_heads(k_ptr + t * s_kt, ko_ptr + t * s_kot, s_kh, s_koh, n_k, cos, sin, NK_P, HALF, HALF_P,
                  HEAD_DIM, PASS_P, NEOX, COPY_PASS)


def launch_params(nh: int, nkv: int, head_dim: int, rot: int, inplace: bool) -> dict:
    """Constexprs and warps (shared with the compile test)."""
    half = rot // 2
    return dict(NQ_P=triton.next_power_of_2(nh), NK_P=triton.next_power_of_2(nkv), HALF=half,
                HALF_P=triton.next_power_of_2(half), HEAD_DIM=head_dim,
                PASS_P=triton.next_power_of_2(max(head_dim - rot, 1)), COPY_PASS=rot < head_dim and not inplace,
                num_warps=4 if nh * half >= 2048 else 2 if nh * half >= 512 else 1)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool,
         inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, nh, hd] and k [T, nkv, hd] by positions [T]; new tensors unless `inplace`."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    rot = cos_sin.shape[-1]
    assert rot % 2 == 0 and rot <= hd and q.stride(-1) == k.stride(-1) == cos_sin.stride(-1) == 1
    qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    if T == 0:
        return qo, ko
    _rope_kernel[(T,)](
        q, k, qo, ko, positions, cos_sin, nh, nkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_sin.stride(0), NEOX=bool(neox),
        **launch_params(nh, nkv, hd, rot, inplace))
    return qo, ko


@triton.jit
def _norm_rope_heads(src, s_h, n_heads, cos, sin, w_ptr, eps, NH_P: tl.constexpr, HALF: tl.constexpr,
                     HALF_P: tl.constexpr, HEAD_DIM: tl.constexpr, PASS_P: tl.constexpr, NEOX: tl.constexpr,
                     HAS_PASS: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotated pair halves and the pass-through tail of `n_heads` heads, fp32, each head first
    RMS-normalized (HAS_NORM: weight `w_ptr`, rounded to the input dtype as the unfused norm stores it)."""
    h, i1, i2, m = _pairs(n_heads, NH_P, HALF, HALF_P, NEOX)
    d = 2 * HALF + tl.arange(0, PASS_P)[None, :]
    pm = (h < n_heads) & (d < HEAD_DIM)
    x1 = tl.load(src + h * s_h + i1, mask=m, other=0.0)
    x2 = tl.load(src + h * s_h + i2, mask=m, other=0.0)
    ty = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    xp = tl.zeros([NH_P, PASS_P], tl.float32)
    if HAS_PASS:
        xp = tl.load(src + h * s_h + d, mask=pm, other=0.0).to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
        if HAS_PASS:
            ss += tl.sum(xp * xp, 1)
        inv = tl.rsqrt(ss / HEAD_DIM + eps)[:, None]
        x1 = (x1 * inv * tl.load(w_ptr + i1, mask=i2 < 2 * HALF, other=0.0).to(tl.float32)).to(ty).to(tl.float32)
        x2 = (x2 * inv * tl.load(w_ptr + i2, mask=i2 < 2 * HALF, other=0.0).to(tl.float32)).to(ty).to(tl.float32)
        if HAS_PASS:
            xp = (xp * inv * tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)).to(ty).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, xp


@triton.jit
def _store_heads(dst, s_h, o1, o2, op, n_heads, NH_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PASS_P: tl.constexpr, NEOX: tl.constexpr, HAS_PASS: tl.constexpr):
    h, i1, i2, m = _pairs(n_heads, NH_P, HALF, HALF_P, NEOX)
    ty = dst.dtype.element_ty
    tl.store(dst + h * s_h + i1, o1.to(ty), mask=m)
    tl.store(dst + h * s_h + i2, o2.to(ty), mask=m)
    if HAS_PASS:
        d = 2 * HALF + tl.arange(0, PASS_P)[None, :]
        tl.store(dst + h * s_h + d, op.to(ty), mask=(h < n_heads) & (d < HEAD_DIM))


@triton.jit
def _rope_store_kv_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, cs_ptr, slot_ptr, qw_ptr, kw_ptr,
                          eps, n_q, n_k, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_qot, s_qoh, s_cs,
                          s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch,
                          NQ_P: tl.constexpr, NK_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HD_P: tl.constexpr, PASS_P: tl.constexpr, NEOX: tl.constexpr,
                          HAS_PASS: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr):
    # grid (T,): one token: norm + rotate its q heads into qo, its k heads into the cache, copy its v.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P)[None, :]
    cos = tl.load(cs_ptr + pos * s_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * s_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    q1, q2, qp = _norm_rope_heads(q_ptr + t * s_qt, s_qh, n_q, cos, sin, qw_ptr, eps, NQ_P, HALF, HALF_P, HEAD_DIM,
                                  PASS_P, NEOX, HAS_PASS, Q_NORM)
    _store_heads(qo_ptr + t * s_qot, s_qoh, q1, q2, qp, n_q, NQ_P, HALF, HALF_P, HEAD_DIM, PASS_P, NEOX,
                 HAS_PASS)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok = slot >= 0  # -1: a padding row, nothing stored
    blk = tl.maximum(slot, 0) // BLOCK_SIZE
    off = tl.maximum(slot, 0) % BLOCK_SIZE
    if ok:
        k1, k2, kp = _norm_rope_heads(k_ptr + t * s_kt, s_kh, n_k, cos, sin, kw_ptr, eps, NK_P, HALF, HALF_P,
                                      HEAD_DIM, PASS_P, NEOX, HAS_PASS, K_NORM)
        _store_heads(kc_ptr + blk * s_kcb + off * s_kcs, s_kch, k1, k2, kp, n_k, NK_P, HALF, HALF_P, HEAD_DIM,
                     PASS_P, NEOX, HAS_PASS)
        h = tl.arange(0, NK_P)[:, None]
        d = tl.arange(0, HD_P)[None, :]
        vm = (h < n_k) & (d < HEAD_DIM)
        vx = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=vm)
        tl.store(vc_ptr + blk * s_vcb + off * s_vcs + h * s_vch + d, vx.to(vc_ptr.dtype.element_ty), mask=vm)


def rope_store_kv_params(nh: int, nkv: int, head_dim: int, rot: int) -> dict:
    """Constexprs and warps of `_rope_store_kv_kernel` (shared with the compile test); norm flags apart."""
    half = rot // 2
    return dict(NQ_P=triton.next_power_of_2(nh), NK_P=triton.next_power_of_2(nkv), HALF=half,
                HALF_P=triton.next_power_of_2(half), HEAD_DIM=head_dim, HD_P=triton.next_power_of_2(head_dim),
                PASS_P=triton.next_power_of_2(max(head_dim - rot, 1)), HAS_PASS=rot < head_dim,
                num_warps=4 if nh * half >= 2048 else 2 if nh * half >= 512 else 1)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                  neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch for the attention prologue (semantics: reference.rope_store_kv): per-head RMSNorm of q and
    k (where a weight is given), RoPE of both, k and v stored into the paged cache at `slot_mapping` (-1: no
    write); returns the rotated q ([T, nh, hd], contiguous, or `out`). Inputs are only read; q/k/v may be
    strided views of one fused QKV output (heads contiguous)."""
    T, nh, hd = q.shape
    nkv = k.shape[1]
    rot = cos_sin.shape[-1]
    assert rot % 2 == 0 and rot <= hd and k.shape[2] == v.shape[2] == hd and v.shape[1] == nkv
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == cos_sin.stride(-1) == 1
    assert k_cache.stride(-1) == v_cache.stride(-1) == 1
    qo = torch.empty(T, nh, hd, dtype=q.dtype, device=q.device) if out is None else out
    if T == 0:
        return qo
    _rope_store_kv_kernel[(T,)](
        q, k, v, qo, k_cache, v_cache, positions, cos_sin, slot_mapping,
        q_norm if q_norm is not None else cos_sin, k_norm if k_norm is not None else cos_sin, float(eps), nh, nkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(1),
        cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), NEOX=bool(neox), Q_NORM=q_norm is not None, K_NORM=k_norm is not None,
        BLOCK_SIZE=k_cache.shape[1], **rope_store_kv_params(nh, nkv, hd, rot))
    return qo
