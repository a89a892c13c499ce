"""GPU-only checks of the quantized kernels: bf16 activations (the interpreter cannot do bf16
arithmetic, and truncates fp32 -> bf16) and CUDA-graph capture. Skipped without CUDA.

bf16 tolerance: the tiled kernel rounds each weight to bf16 for tl.dot (2^-8 relative) and the
output is bf16 (2^-8 of |y|); fp32 accumulation adds at most 2 K 2^-24 of |x| @ |W|^T.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.loading.gguf import QuantTensor
from kernels import quant_layouts as L
from kernels import ref_quant

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU"
    ),
]
U8 = 2.0**-8


def _weight(t: int, n: int, k: int, seed: int) -> QuantTensor:
    return QuantTensor("w", t, (n, k), L.random_blocks(t, n, k, torch.Generator().manual_seed(seed)).cuda())


def _x(M: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).cuda()


def _check_bf16(y: torch.Tensor, x: torch.Tensor, w: QuantTensor) -> None:
    dense = ref_quant.dequantize(w.data.cpu(), w.ggml_type, w.shape)
    xf = x.float().cpu()
    want = xf @ dense.T
    bound = (U8 + 2 * x.shape[1] * 2.0**-24) * (xf.abs() @ dense.abs().T) + U8 * want.abs()
    err = (y.float().cpu() - want).abs()
    assert y.dtype == torch.bfloat16 and not y.isnan().any()
    assert (err <= bound).all(), f"max err {err.max():.3g}"


@pytest.mark.parametrize("M", [1, 2, 5, 16, 17, 64, 300])
@pytest.mark.parametrize("t", L.ALL_TYPES, ids=L.NAMES.get)
def test_bf16_matches_reference(t, M):
    from kernels.qmatmul import qmatmul

    K = 768 if L.BLOCK[t][0] == 256 else 320
    w = _weight(t, 300, K, seed=t)
    x = _x(M, K, seed=M)
    _check_bf16(qmatmul(x, w), x, w)


@pytest.mark.parametrize("t", L.ALL_TYPES, ids=L.NAMES.get)
def test_bf16_dequant_rounds_like_torch(t):
    from kernels.dequant import dequantize

    raw = L.random_blocks(t, 9, 512, torch.Generator().manual_seed(t))
    want = ref_quant.dequantize(raw, t, (9, 512), torch.bfloat16)
    assert torch.equal(dequantize(raw.cuda(), t, (9, 512), torch.bfloat16).cpu(), want)


@pytest.mark.parametrize("M,N", [(1, 40), (4, 4096), (16, 96), (48, 200)])
def test_cuda_graph_capture(M, N):
    """Capture qmatmul (split-K with its partial buffer for small N, direct gemv, tiled) and replay
    with new inputs written into the captured buffers."""
    from kernels.qmatmul import qmatmul

    w = _weight(L.Q4_K, N, 1024, seed=N)
    x_static = _x(M, 1024, seed=1)
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    qmatmul(x_static, w, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qmatmul(x_static, w, out=out)
        y_alloc = qmatmul(x_static, w)  # allocating inside capture uses the graph's pool
    for seed in (2, 3):
        x_new = _x(M, 1024, seed=seed)
        x_static.copy_(x_new)
        g.replay()
        torch.cuda.synchronize()
        eager = qmatmul(x_new, w)
        assert torch.equal(out, eager) and torch.equal(y_alloc, eager)
        _check_bf16(out, x_new, w)
