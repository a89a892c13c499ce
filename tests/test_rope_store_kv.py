"""The fused attention prologue `rope_store_kv` (per-head q/k RMSNorm + RoPE + paged KV store) against
kernels/reference.py, for the Triton kernel (interpreter on CPU, compiled on a GPU) and the CPU backend.

Inputs are views of one fused QKV output (rows strided, heads contiguous), as engine/model.py passes them;
caches start as NaN so a slot written that should not be (padding slot -1) or left unwritten shows, and
the inputs are checked to be left untouched.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import reference as ref
from kernels.rope import rope_store_kv

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
NAN = float("nan")


def _case(T, nh, nkv, hd, rot, dtype, norms, seed=0, bs=16, num_blocks=6):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (nh + 2 * nkv) * hd + 5, generator=g) * 2.0).to(dtype).to(DEV)  # +5: odd row stride
    q = qkv[:, : nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:(nh + 2 * nkv) * hd].view(T, nkv, hd)
    qn = (torch.rand(hd, generator=g) + 0.5).to(DEV) if norms in ("qk", "q") else None
    kn = (torch.rand(hd, generator=g) + 0.5).to(DEV) if norms in ("qk", "k") else None
    pos = torch.randint(0, 4096, (T,), generator=g).to(DEV)
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[1::3] = -1  # padding rows
    kc = torch.full((num_blocks, bs, nkv, hd), NAN, dtype=dtype, device=DEV)
    return qkv, q, k, v, qn, kn, pos, slots.to(DEV), kc, kc.clone()


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("norms", [None, "qk", "k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd,rot", [(9, 3, 64, 64), (14, 2, 64, 48), (4, 1, 256, 256), (7, 1, 80, 32)])
def test_matches_reference(neox, norms, dtype, nh, nkv, hd, rot):
    T = 7
    qkv, q, k, v, qn, kn, pos, slots, kc, vc = _case(T, nh, nkv, hd, rot, dtype, norms, seed=hd + rot)
    cs = ref.rope_cache(10000.0, rot, 4096, DEV)
    qkv0 = qkv.clone()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = ref.rope_store_kv(q, k, v, pos, cs, neox, kc_ref, vc_ref, slots, qn, kn, 1e-6)
    got = rope_store_kv(q, k, v, pos, cs, neox, kc, vc, slots, qn, kn, 1e-6)
    assert got.shape == (T, nh, hd) and got.dtype == dtype
    torch.testing.assert_close(got, want, **_tol(dtype))
    torch.testing.assert_close(kc, kc_ref, equal_nan=True, **_tol(dtype))  # padding slots stay NaN in both
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
    assert int((~kc.isnan()).all(-1).all(-1).sum()) == int((slots >= 0).sum())
    assert torch.equal(qkv, qkv0)


def test_all_padding_and_empty():
    qkv, q, k, v, qn, kn, pos, slots, kc, vc = _case(3, 4, 2, 64, 64, torch.float32, "qk")
    cs = ref.rope_cache(10000.0, 64, 4096, DEV)
    slots.fill_(-1)
    got = rope_store_kv(q, k, v, pos, cs, True, kc, vc, slots, qn, kn, 1e-6)
    assert kc.isnan().all() and vc.isnan().all()
    torch.testing.assert_close(got, ref.rope(ref.rms_norm(q, qn, 1e-6)[0], k, pos, cs, True)[0])
    assert rope_store_kv(q[:0], k[:0], v[:0], pos[:0], cs, True, kc, vc, slots[:0]).shape == (0, 4, 64)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_backends_agree(backend):
    """The Ops method of every backend (the CPU one composes its C ops) against the reference."""
    from kernels import backend as make
    from kernels.cpu import build

    if backend == "cpu" and build.load() is None:
        pytest.skip("no C compiler for the CPU kernels")
    ops = make(backend)
    if ops.device.type != DEV and backend == "triton":
        pytest.skip("triton backend tested on the kernel device only")
    T, nh, nkv, hd = 5, 6, 2, 64
    for neox, norms in ((True, "qk"), (False, None)):
        qkv, q, k, v, qn, kn, pos, slots, kc, vc = _case(T, nh, nkv, hd, hd, torch.float32, norms, seed=3)
        qkv, q, k, v, qn, kn, pos, slots = (x.cpu() if x is not None else None
                                            for x in (qkv, q, k, v, qn, kn, pos, slots))
        q, k, v = (qkv[:, a:b].view(T, -1, hd) for a, b in ((0, nh * hd), (nh * hd, (nh + nkv) * hd),
                                                             ((nh + nkv) * hd, (nh + 2 * nkv) * hd)))
        cs = ref.rope_cache(10000.0, hd, 4096)
        kc = torch.full((6, 16, nkv, hd), NAN, dtype=ops.kv_dtype)
        vc, kc_ref, vc_ref = kc.clone(), kc.clone().float(), kc.clone().float()
        want = ref.rope_store_kv(q.clone(), k.clone(), v.clone(), pos, cs, neox, kc_ref, vc_ref, slots, qn, kn, 1e-6)
        got = ops.rope_store_kv(q, k, v, pos, cs, neox, kc, vc, slots, qn, kn, 1e-6)
        tol = dict(rtol=1e-5, atol=1e-5) if ops.kv_dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kc.float(), kc_ref, equal_nan=True, **tol)
        torch.testing.assert_close(vc.float(), vc_ref, equal_nan=True, **tol)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="bf16 arithmetic is broken in the interpreter: GPU only")
@pytest.mark.parametrize("neox,norms", [(True, "qk"), (False, None)])
def test_bf16_on_gpu(neox, norms):
    T, nh, nkv, hd = 37, 4, 1, 256
    qkv, q, k, v, qn, kn, pos, slots, kc, vc = _case(T, nh, nkv, hd, hd, torch.bfloat16, norms, num_blocks=8)
    cs = ref.rope_cache(10000.0, hd, 4096, DEV)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = ref.rope_store_kv(q, k, v, pos, cs, neox, kc_ref, vc_ref, slots, qn, kn, 1e-6)
    got = rope_store_kv(q, k, v, pos, cs, neox, kc, vc, slots, qn, kn, 1e-6)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kc, kc_ref, rtol=2e-2, atol=2e-2, equal_nan=True)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
