"""Small Triton kernels whose sm_90 code has known properties (tests/test_kernel_report.py)."""

import triton
import triton.language as tl


@triton.jit
def loads(x_ptr, w_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i)  # contiguous, aligned fp32: 16-byte vector loads
    w = tl.load(w_ptr + 2 * i)  # every other byte: single-byte loads
    tl.store(out_ptr + tl.arange(0, 64), tl.sum(x + w.to(tl.float32)) + tl.zeros([64], tl.float32))


@triton.jit
def sum_in_loop(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = 0.0
    for k in range(0, n, BLOCK):
        acc += tl.sum(tl.load(x_ptr + k + tl.arange(0, BLOCK)))  # a cross-lane reduction every trip
    tl.store(out_ptr, acc)


@triton.jit
def sum_after_loop(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], tl.float32)
    for k in range(0, n, BLOCK):
        acc += tl.load(x_ptr + k + tl.arange(0, BLOCK))  # per-lane partial sums
    tl.store(out_ptr, tl.sum(acc))
