"""Triton rotary position embedding, both styles, positions from a tensor.

Layout: q [T, nh, hd], k [T, nkv, hd] (last dim contiguous, token/head strides free: views of a fused
qkv projection work); positions [T]; cos_sin [max_pos, rot] fp32 with cos in the first rot/2 columns
and sin in the rest (reference.rope_cache). Pairs: neox = (i, i + rot/2), normal = (2i, 2i + 1).
Dims past `rot` pass through (partial rotary). Grid (T,): one program rotates every q and k head of
one token, reading its cos/sin row once. Math in fp32, stored in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope"]


@triton.jit
def _rotate_heads(src, dst, s_h, s_dh, n_heads, cos, sin, NH_P: tl.constexpr, HALF: tl.constexpr,
                  HALF_P: tl.constexpr, HEAD_DIM: tl.constexpr, PASS_P: tl.constexpr, NEOX: tl.constexpr,
                  COPY_PASS: tl.constexpr):
    h = tl.arange(0, NH_P)[:, None]
    j = tl.arange(0, HALF_P)[None, :]
    m = (h < n_heads) & (j < HALF)
    if NEOX:
        i1 = j
        i2 = j + HALF
    else:
        i1 = 2 * j
        i2 = 2 * j + 1
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
