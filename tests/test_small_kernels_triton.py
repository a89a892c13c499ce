"""Triton RMSNorm(+residual), RoPE and gated activations against kernels/reference.py.

Interpreter on CPU (fp32/fp16; bf16 only on a GPU, see test_cuda_attention.py), compiled on a GPU.
Outputs that the kernels allocate start as torch.empty, so strided inputs, ragged widths and both
rope styles are what catch a missed element; inputs are checked to be left untouched.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import reference as ref
from kernels.act import gelu_tanh_mul, silu_mul
from kernels.norm import rms_norm
from kernels.rope import rope

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 7, 64), (3, 576), (2, 9000)])  # 9000: two-pass path
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm(dtype, shape, with_res):
    x = rnd(*shape, dtype=dtype, seed=1, scale=3.0)
    w = rnd(shape[-1], seed=2)
    r = rnd(*shape, dtype=dtype, seed=3) if with_res else None
    x0 = x.clone()
    out, res = rms_norm(x, w, 1e-6, r)
    want, want_res = ref.rms_norm(x, w, 1e-6, r)
    assert out.shape == x.shape and out.dtype == want.dtype
    torch.testing.assert_close(out, want, **tol(dtype))
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)  # the rounded sum, exactly
    assert torch.equal(x, x0)


def test_rms_norm_strided_rows():
    # A column slice of a wider buffer (e.g. q of a fused qkv): row stride != width.
    buf = rnd(6, 200, seed=4)
    x = buf[:, 30:130]
    res = rnd(6, 100, seed=5)
    w = rnd(100, seed=6)
    out, r = rms_norm(x, w, 1e-5, res)
    want, want_r = ref.rms_norm(x, w, 1e-5, res)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd,rot", [(9, 3, 64, 64), (14, 2, 80, 80), (7, 1, 64, 32)])
def test_rope(neox, dtype, nh, nkv, hd, rot):
    T = 11
    cs = ref.rope_cache(10000.0 if hd != 80 else 1e6, rot, 4096, DEV)
    q = rnd(T, nh, hd, dtype=dtype, seed=7)
    k = rnd(T, nkv, hd, dtype=dtype, seed=8)
    pos = torch.tensor([0, 5, 4095, 17, 1, 1, 300, 2048, 9, 10, 3], device=DEV)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = rope(q, k, pos, cs, neox)
    want_q, want_k = ref.rope(q, k, pos, cs, neox)
    torch.testing.assert_close(got_q, want_q, **tol(dtype))
    torch.testing.assert_close(got_k, want_k, **tol(dtype))
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("neox", [True, False])
def test_rope_inplace_on_fused_qkv_views(neox):
    T, nh, nkv, hd = 6, 8, 2, 64
    qkv = rnd(T, (nh + 2 * nkv) * hd, seed=9)
    q = qkv[:, : nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
    v0 = qkv[:, (nh + nkv) * hd:].clone()
    cs = ref.rope_cache(500000.0, 48, 64, DEV)  # partial rotary: 16 dims pass through in place
    pos = torch.arange(T, device=DEV) * 7
    want_q, want_k = ref.rope(q, k, pos, cs, neox)
    got_q, got_k = rope(q, k, pos, cs, neox, inplace=True)
    assert got_q.data_ptr() == q.data_ptr()
    torch.testing.assert_close(q, want_q, **tol(torch.float32))
    torch.testing.assert_close(k, want_k, **tol(torch.float32))
    assert torch.equal(qkv[:, (nh + nkv) * hd:], v0)


@pytest.mark.parametrize("fn,ref_fn", [(silu_mul, ref.silu_mul), (gelu_tanh_mul, ref.gelu_tanh_mul)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 300), (3, 2, 1500), (2048,)])
def test_gated_act(fn, ref_fn, dtype, shape):
    gate = rnd(*shape, dtype=dtype, seed=10, scale=4.0)
    up = rnd(*shape, dtype=dtype, seed=11)
    got = fn(gate, up)
    assert got.shape == gate.shape and got.dtype == dtype
    torch.testing.assert_close(got, ref_fn(gate, up), **tol(dtype))


@pytest.mark.parametrize("fn,ref_fn", [(silu_mul, ref.silu_mul), (gelu_tanh_mul, ref.gelu_tanh_mul)])
def test_gated_act_fused_halves_and_extremes(fn, ref_fn):
    # gate/up as the two halves of one gate_up output; values where exp overflows or underflows.
    gu = rnd(5, 2 * 333, seed=12, scale=3.0)
    gu[0, :8] = torch.tensor([-1e4, -200.0, -90.0, -20.0, 20.0, 90.0, 200.0, 1e4])
    gate, up = gu[:, :333], gu[:, 333:]
    got = fn(gate, up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref_fn(gate, up), rtol=1e-5, atol=1e-5)
