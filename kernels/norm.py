"""Triton RMSNorm with the residual add fused in.

Layout: x (and residual) viewed as rows [R, H], last dim contiguous; rows may be strided (a view of a
wider buffer). Grid (R,): one program per row. Rows up to SINGLE_MAX wide stay in registers (one read,
one write); wider rows take two passes over BLOCK-wide chunks, the second re-reading the stored sum.
Math in fp32; the summed residual is rounded to its storage dtype before normalizing, as the
reference does (x + residual in that dtype, then .float()).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import as_rows

__all__ = ["rms_norm"]

SINGLE_MAX = 8192
CHUNK = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, n_cols, eps, s_x, s_r, s_o, s_res,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row, o_row, res_row = x_ptr + row * s_x, r_ptr + row * s_r, out_ptr + row * s_o, res_ptr + row * s_res
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        h = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(r_row + cols, mask=m, other=0.0).to(tl.float32)
            hr = h.to(res_ptr.dtype.element_ty)
            tl.store(res_row + cols, hr, mask=m)
            h = hr.to(tl.float32)
        inv = tl.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(o_row + cols, (h * inv * w).to(out_ptr.dtype.element_ty), mask=m)
    else:
        src = res_row if HAS_RES else x_row  # pass 2 reads the rounded sum back
        sq = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            h = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                h = h + tl.load(r_row + cols, mask=m, other=0.0).to(tl.float32)
                hr = h.to(res_ptr.dtype.element_ty)
                tl.store(res_row + cols, hr, mask=m)
                h = hr.to(tl.float32)
            sq += h * h
        inv = tl.rsqrt(tl.sum(sq, 0) / n_cols + eps)
        tl.debug_barrier()  # the stored sum is visible to every thread of the program before pass 2
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < n_cols
            h = tl.load(src + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(o_row + cols, (h * inv * w).to(out_ptr.dtype.element_ty), mask=m)


def launch_params(n_cols: int) -> dict:
    """Constexprs and warps for a row width (shared with the compile test)."""
    single = triton.next_power_of_2(n_cols) <= SINGLE_MAX
    block = triton.next_power_of_2(n_cols) if single else CHUNK
    warps = 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8
    return dict(BLOCK=block, SINGLE=single, num_warps=warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized, new residual); with `residual`, x + residual is normalized and returned as the residual."""
    H = x.shape[-1]
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    res_out = x if residual is None else torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2
    o2, res2 = out.view(-1, H), res_out.view(-1, H) if residual is not None else out.view(-1, H)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, res2, H, float(eps), x2.stride(0), r2.stride(0), o2.stride(0), res2.stride(0),
        HAS_RES=residual is not None, **launch_params(H))
    return out, res_out
