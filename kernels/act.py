"""Triton gated activations: silu(gate) * up and gelu_tanh(gate) * up.

Layout: gate/up viewed as rows [R, C] with the last dim contiguous and free row strides, so the two
halves of a fused gate_up projection are read in place; the output is a new contiguous tensor.
Grid (R, cdiv(C, BLOCK)). Math in fp32, stored in gate's dtype. tanh is written through exp (no
libdevice): tanh(z) = 1 - 2 / (exp(2z) + 1), exact at both infinities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import as_rows

__all__ = ["silu_mul", "gelu_tanh_mul"]

BLOCK = 1024


@triton.jit
def _gated_kernel(g_ptr, u_ptr, o_ptr, n_cols, s_g, s_u, s_o, BLOCK: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(g_ptr + row * s_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * s_u + cols, mask=m, other=0.0).to(tl.float32)
    if GELU:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (g + 0.044715 g^3)
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))  # 0.5 g (1 + tanh z)
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(o_ptr + row * s_o + cols, (a * u).to(o_ptr.dtype.element_ty), mask=m)


def _gated(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    assert gate.shape == up.shape, (gate.shape, up.shape)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return out
    g2, u2 = as_rows(gate), as_rows(up)
    o2 = out.view(-1, gate.shape[-1])
    C = g2.shape[1]
    block = min(BLOCK, triton.next_power_of_2(C))
    _gated_kernel[(g2.shape[0], triton.cdiv(C, block))](
        g2, u2, o2, C, g2.stride(0), u2.stride(0), o2.stride(0), BLOCK=block, GELU=gelu,
        num_warps=4 if block >= 512 else 1)
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _gated(gate, up, False)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _gated(gate, up, True)
