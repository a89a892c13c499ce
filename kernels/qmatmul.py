"""Fused dequantize + matmul on GGUF blocks: y[M, N] = x[M, K] @ dequant(w)[N, K]^T.

Memory layout: x is [M, K] row-major (fp16/bf16/fp32); w.data is uint8 [N, row_bytes] GGUF blocks
(F32/F16/BF16 rows viewed as typed elements); y is [M, N] in x.dtype. Weights are decoded in
registers by `decode_sub` (kernels/dequant.py) as tiles [BLOCK_N, NSUB, SUB] (SUB weights sharing
a scale innermost, contiguous bytes); accumulation is fp32.

- GEMV (M <= 16, decode): grid (cdiv(N, BLOCK_N), SPLIT). A program owns BLOCK_N output columns
  for all M (padded to M_PAD) over one K range; the product is a broadcast multiply and a sum, no
  tl.dot. Weights stay as (a, q, c) with w = a * q +/- c: x . q is summed per sub-block of SUB
  weights and scaled once, so the per-weight work is unpack, convert, multiply-add. With
  SPLIT > 1 each split writes fp32 partials [SPLIT, M, N] and `_reduce_kernel` sums them in a
  fixed order (one writer per element, deterministic).
- An optional bias [N] (fp32) is added to the fp32 accumulator in the epilogue (the reduce's, with
  split-K): no separate cast and add kernels after the matmul.
- Tiled (M > 16, prefill): grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped along M for L2
  reuse; each K step dequantizes a [BLOCK_K, BLOCK_N] weight tile to x's dtype and calls tl.dot.
Configs come from `choose()` (a table keyed by M bucket, N, K, type and compute capability).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import qmatmul_packed
from . import quant_layouts as L
from .dequant import decode_sub, dequant_sub, weight_view
from .packed import PackedWeight


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om, k_per_split, b_ptr,
    TYPE: tl.constexpr, SUB: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NSUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    BLOCK_K: tl.constexpr = NSUB * SUB
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = (n.to(tl.int64) * stride_wn)[:, None, None]  # [BLOCK_N, 1, 1]
    n_mask3 = n_mask[:, None, None]
    m = tl.arange(0, M_PAD)
    m3 = m[:, None, None]  # [M_PAD, 1, 1]
    sub = tl.arange(0, NSUB)[None, :, None]
    l = tl.arange(0, SUB)[None, None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        s = k0 // SUB + sub  # k0 is a multiple of BLOCK_K
        k = s * SUB + l  # [1, NSUB, SUB]
        mask_s = n_mask3 & (s * SUB < k_hi)
        q, a, c = decode_sub(w_ptr, rows, s, l, mask_s, mask_s & (k < k_hi), TYPE, SUB)
        x = tl.load(x_ptr + m3 * stride_xm + k, mask=(m3 < M) & (k < k_hi), other=0.0).to(tl.float32)
        # w = a * q +/- c per sub-block: sum x * q over each sub-block first, scale once per sub-block.
        xq = tl.sum(x[:, None, :, :] * q[None, :, :, :], axis=3)  # [M_PAD, BLOCK_N, NSUB]
        if TYPE == 0 or TYPE == 1 or TYPE == 30:  # F32 / F16 / BF16: q is the weight
            acc += tl.sum(xq, axis=2)
        else:
            acc += tl.sum(xq * tl.reshape(a, (BLOCK_N, NSUB))[None, :, :], axis=2)
            if TYPE == 3 or TYPE == 7:  # w = a * q + c
                xs = tl.sum(x, axis=2)  # [M_PAD, NSUB]
                acc += tl.sum(xs[:, None, :] * tl.reshape(c, (BLOCK_N, NSUB))[None, :, :], axis=2)
            elif TYPE == 10 or TYPE == 12 or TYPE == 13:  # w = a * q - c
                xs = tl.sum(x, axis=2)
                acc -= tl.sum(xs[:, None, :] * tl.reshape(c, (BLOCK_N, NSUB))[None, :, :], axis=2)
    if HAS_BIAS:  # only without split-K (the reduce adds it otherwise): added once, in fp32
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s.to(tl.int64) * stride_os + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & n_mask[None, :])


@triton.jit
def _reduce_kernel(p_ptr, out_ptr, numel, split, b_ptr, N, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[i] = sum over s of partial[s, i] (partials contiguous [split, numel]), in order of s,
    plus bias[i % N]."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(split):
        acc += tl.load(p_ptr + s * numel + i, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, b_ptr,
    TYPE: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NSUB: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    BLOCK_K: tl.constexpr = NSUB * SUB
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the N tiles together, so weight tiles hit in L2.
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask3 = (n < N)[:, None, None]
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    rows = (n.to(tl.int64) * stride_wn)[:, None, None]
    sub = tl.arange(0, NSUB)[None, :, None]
    l = tl.arange(0, SUB)[None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kx = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & (kx < K)[None, :], other=0.0)
        s = k0 // SUB + sub
        k = s * SUB + l
        mask_s = n_mask3 & (s * SUB < K)
        w = dequant_sub(w_ptr, rows, s, l, mask_s, mask_s & (k < K), TYPE, SUB)  # [BLOCK_N, NSUB, SUB]
        w = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))  # [BLOCK_K, BLOCK_N]: the B operand of x @ w^T
        if x_ptr.dtype.element_ty == tl.float32:  # TF32 on a GPU (fp32 "ieee" spills); exact in the interpreter
            acc = tl.dot(x, w, acc, input_precision="tf32")
        else:
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (n < N)[None, :])


@dataclass(frozen=True)
class Config:
    kernel: str  # "gemv" or "mm"
    block_m: int  # M_PAD for gemv
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    group_m: int = 8


REDUCE_BLOCK = 1024
M_BUCKETS = (1, 2, 4, 8, 16, 64, 128)  # M is bucketed to the first bucket >= M (128: "large")

# Defaults per M bucket (any compute capability). GEMV: product tile M_PAD * BLOCK_N * BLOCK_K
# kept at 4-16K fp32 values per program (<= 64 per thread) so it stays in registers. Tiled: x tiles
# pipelined in shared memory (2 stages), weight tiles decoded in registers; decoding a weight tile
# costs the same whatever BLOCK_M, so small prefill chunks (17..64 rows) share one 64-row config.
# BLOCK_K 32 and 2 stages: with 64 or 3 stages ptxas needs 200-255 registers and spills to the
# stack for most types (the pipeliner keeps the next tiles' quant bytes in registers).
_DEFAULTS: dict[int, Config] = {
    1: Config("gemv", 1, 16, 256, 4),
    2: Config("gemv", 2, 16, 128, 4),
    4: Config("gemv", 4, 16, 64, 4),
    8: Config("gemv", 8, 16, 64, 8),
    16: Config("gemv", 16, 16, 64, 8),
    64: Config("mm", 64, 64, 32, 4, 2),
    128: Config("mm", 128, 128, 32, 8, 2),
}

# The interpreter (CPU tensors, TRITON_INTERPRET=1) runs programs one after another in numpy: a few
# large tiles are 10-50x faster there (an lm_head GEMV: 9 s -> 0.2 s). It poses as capability
# (0, 0); these configs never reach a GPU (tests run every GPU config in the interpreter explicitly).
INTERPRETER_CC = (0, 0)
_INTERPRETER: dict[int, Config] = {b: replace(c, block_n=512, block_k=128) for b, c in _DEFAULTS.items()}

# Tuned overrides: (M bucket, N, K, ggml type, (cc major, cc minor)) -> Config. Written from GPU
# runs of scripts/bench_kernels.py --tune; empty until a GPU has measured something better.
TABLE: dict[tuple[int, int, int, int, tuple[int, int]], Config] = {}


def m_bucket(M: int) -> int:
    return next((b for b in M_BUCKETS if M <= b), M_BUCKETS[-1])


def choose(M: int, N: int, K: int, ggml_type: int, cc: tuple[int, int]) -> Config:
    b = m_bucket(M)
    if cc == INTERPRETER_CC:
        return _INTERPRETER[b]
    return TABLE.get((b, N, K, ggml_type, cc), _DEFAULTS[b])


def all_configs() -> set[Config]:
    """Every config `choose` can return on a GPU (what tests/test_compile_qmatmul.py compiles)."""
    return set(_DEFAULTS.values()) | set(TABLE.values())


@lru_cache(maxsize=None)
def _device_info(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count); the interpreter on CPU poses as a 4-SM device so that the
    split-K path is taken for small test shapes."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (p.major, p.minor), p.multi_processor_count
    return INTERPRETER_CC, 4


def split_for(n_programs: int, K: int, block_k: int, sms: int) -> int:
    """K splits so that about 8 programs per SM keep enough weight bytes in flight (a GEMV is
    bound by memory latency x bytes in flight); every split keeps >= 2 K steps, at most 32 splits."""
    target = 8 * sms
    if n_programs >= target:
        return 1
    steps = triton.cdiv(K, block_k)
    return max(1, min(triton.cdiv(target, n_programs), steps // 2, 32))


def _output(x: torch.Tensor, n: int, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """Check bias [n] and `out` ([..., n] in x.dtype, contiguous); a new output tensor when out is None."""
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"qmatmul: bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")
    shape = (*x.shape[:-1], n)
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"qmatmul: out must be a contiguous {x.dtype} tensor of shape {shape}")
    return out


def qmatmul(
    x: torch.Tensor, w, config=None, split: int | None = None, out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None, act: int = 0, tail: qmatmul_packed.NormTail | None = None,
) -> torch.Tensor:
    """x [..., K] fp16/bf16/fp32 @ w ^T (+ bias [N], added in fp32 in the epilogue: no separate
    cast and add launches) -> [..., N] in x.dtype. w is a PackedWeight (kernels/packed.py: the
    decode path) or a QuantTensor [N, K] of GGUF blocks.

    `act` (1 silu, 2 gelu-tanh) with a [gate; up] PackedWeight pair: act(x @ gate^T) * (x @ up^T),
    [..., N / 2]. `tail` (packed weights): the residual add + RMSNorm of each finished row in the
    same launch (qmatmul_packed.NormTail); the result is then the normalized rows. `out`
    (contiguous, x.dtype) receives the result when given; `config` and `split` override the
    dispatcher (tests and benchmarks). No host sync: safe inside CUDA-graph capture."""
    if isinstance(w, PackedWeight):
        return _qmatmul_packed(x, w, config, split, out, bias, act, tail)
    if act or tail:
        raise ValueError("qmatmul: fused epilogues need packed weights")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"qmatmul: x {tuple(x.shape)} does not match weight {w.name!r} of shape {tuple(w.shape)}")
    sub = L.sub_size(w.ggml_type)
    L.row_bytes(w.ggml_type, K)  # raises for an unsupported type or a K that is not whole blocks
    out = _output(x, N, bias, out)
    has_bias = bias is not None
    b = bias if has_bias else x  # a placeholder pointer, never read
    x = x.reshape(-1, K)
    M = x.shape[0]
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out.view(M, N)
    wv = weight_view(w.data, w.ggml_type)
    cc, sms = _device_info(x.device)
    cfg = config or choose(M, N, K, w.ggml_type, cc)
    nsub = cfg.block_k // sub
    if cfg.kernel == "mm":
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        mm_kernel[grid](
            x, wv, y, M, N, K, x.stride(0), wv.stride(0), N, b,
            TYPE=w.ggml_type, SUB=sub, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NSUB=nsub,
            GROUP_M=cfg.group_m, HAS_BIAS=has_bias, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out
    if M > cfg.block_m:
        raise ValueError(f"gemv config pads M to {cfg.block_m} but M = {M}")
    n_prog = triton.cdiv(N, cfg.block_n)
    s = split if split is not None else split_for(n_prog, K, cfg.block_k, sms)
    k_per = triton.cdiv(triton.cdiv(K, s), cfg.block_k) * cfg.block_k
    s = triton.cdiv(K, k_per)
    dst = y if s == 1 else torch.empty(s, M, N, dtype=torch.float32, device=x.device)
    gemv_kernel[(n_prog, s)](
        x, wv, dst, M, N, K, x.stride(0), wv.stride(0), M * N, N, k_per, b,
        TYPE=w.ggml_type, SUB=sub, M_PAD=cfg.block_m, BLOCK_N=cfg.block_n, NSUB=nsub,
        HAS_BIAS=has_bias and s == 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if s > 1:
        _reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](dst, y, M * N, s, b, N, BLOCK=REDUCE_BLOCK,
                                                           HAS_BIAS=has_bias, num_warps=4)
    return out


def _qmatmul_packed(x: torch.Tensor, w: PackedWeight, config, split: int | None, out: torch.Tensor | None,
                    bias: torch.Tensor | None, act: int, tail: qmatmul_packed.NormTail | None) -> torch.Tensor:
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"qmatmul: x {tuple(x.shape)} does not match weight {w.name!r} of shape {tuple(w.shape)}")
    if act and not w.pair:
        raise ValueError(f"qmatmul: {w.name!r} is not a [gate; up] pair")
    n_out = w.pair if act else N
    out = _output(x, n_out, bias, out)
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0 or n_out == 0:
        return out
    if x2.stride(1) != 1 or (x2.shape[0] == 1 and not x2.is_contiguous()):
        x2 = x2.contiguous()
    cc, sms = _device_info(x.device)
    if tail is not None and (tail.residual.shape != out.shape or not tail.residual.is_contiguous()
                             or tail.h_out.shape != out.shape or not tail.h_out.is_contiguous()):
        raise ValueError(f"qmatmul: the residual and h_out must be contiguous {tuple(out.shape)} tensors")
    qmatmul_packed.matmul(x2, w, out.view(-1, n_out), bias, act, cc, sms, config, split, tail)
    return out
