"""The packed decode path (kernels/packed.py, packed_decode.py, qmatmul_packed.py): planes, GEMV,
tensor-core matmul, split-K finished in the last program, bias and gated-activation epilogues, and
the packed embedding lookup. Interpreter on CPU, compiled on a GPU.

Tolerances. Dequantization is exact. The matmuls are compared with x @ W^T in float64 relative
to the largest |output|: the M = 1 GEMV sums x * (1 + q 2^(P-23)) and subtracts sum x, so its fp32
sums lose up to 2^(23 - P) = 2^15 ulps of sum |x| (P = 8) -- a bound of about 2^-9 sum|x| / max|y|,
here < 2e-3 (measured 5e-5..4.5e-4); tensor-core paths (fp32 in the interpreter, exact products)
stay under 1e-5. A wrong block, scale or row fails by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch

from engine.loading.gguf import QuantTensor
from kernels import packed as P
from kernels import quant_layouts as L
from kernels import ref_quant
from kernels import workspace as W
from kernels.qmatmul import qmatmul
from kernels.qmatmul_packed import PackedConfig, choose, dequant_rows
from tests.conftest import kernel_device

DEV = kernel_device()
GEMV_TOL, MM_TOL = 2e-3, 1e-5 if DEV == "cpu" else 2e-2  # bf16/TF32 on a GPU


def _pair(t: int, n: int, k: int, seed: int) -> tuple[QuantTensor, torch.Tensor]:
    raw = L.random_blocks(t, n, k, torch.Generator().manual_seed(seed))
    return QuantTensor("w", t, (n, k), raw.to(DEV)), ref_quant.dequantize(raw, t, (n, k)).double()


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("t", P.PACKED_TYPES, ids=lambda t: L.NAMES[t])
def test_planes_dequantize_exactly(t: int) -> None:
    qt, ref = _pair(t, 21, 512, t)  # 21 rows: the last group of 8 is padded
    pw = P.pack(qt)
    assert pw.rows == 24 and pw.q.stride(-1) == 1 and pw.q.shape[-1] == 8
    ids = torch.tensor([20, 0, 7, 8, 13], device=DEV)
    got = dequant_rows(pw, ids, torch.float32).cpu()
    assert torch.equal(got, ref[ids.cpu()].float())


@pytest.mark.parametrize("t", P.PACKED_TYPES, ids=lambda t: L.NAMES[t])
@pytest.mark.parametrize("M", [1, 3, 16, 40])
def test_matmul_every_type_and_m_bucket(t: int, M: int) -> None:
    K = 512 if t in (L.Q4_K, L.Q5_K, L.Q6_K) else 96  # 96: three groups, not a multiple of any step
    qt, ref_w = _pair(t, 37, K, 100 + t)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEV)
    y = qmatmul(x, P.pack(qt))
    assert y.shape == (M, 37)
    assert _err(y, x.double().cpu() @ ref_w.T) < (GEMV_TOL if M == 1 else MM_TOL)


@pytest.mark.parametrize("t,K", [(L.Q4_1, 576), (L.Q5_0, 640), (L.Q5_0, 896), (L.Q8_0, 576), (L.Q4_K, 1024),
                                 (L.Q6_K, 1536)], ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 8])
def test_real_unaligned_shapes_with_split_k(t: int, K: int, M: int) -> None:
    """The shipped models' K (GGUF rows of 360..952 bytes), split-K finished by the last split, and
    the counters back at zero afterwards."""
    qt, ref_w = _pair(t, 24, K, K + t)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).to(DEV)
    cfg = PackedConfig("gemv", 1, 1, 2, 1) if M == 1 else PackedConfig("mm", 16, 16, 32, 4)
    pw = P.pack(qt)
    for split in (1, 3):
        y = qmatmul(x, pw, config=cfg, split=split)
        assert _err(y, x.double().cpu() @ ref_w.T) < (GEMV_TOL if M == 1 else MM_TOL), split
    assert int(W.counters(torch.device(DEV), 1).abs().sum()) == 0


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("act", [1, 2], ids=["silu", "gelu"])
def test_gate_up_pair_applies_the_activation_in_the_epilogue(M: int, act: int) -> None:
    from kernels.triton_backend import TritonOps

    gate, gw = _pair(L.Q4_K, 16, 256, 1)
    up, uw = _pair(L.Q4_K, 16, 256, 2)
    both = QuantTensor("gate+up", L.Q4_K, (32, 256), torch.cat([gate.data, up.data]))
    pair = TritonOps(torch.device(DEV), dtype=torch.float32).prepare_gate_up(both, 16)
    assert pair.pair == 16
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(3)).to(DEV)
    g, u = x.double().cpu() @ gw.T, x.double().cpu() @ uw.T
    a = g * torch.sigmoid(g) if act == 1 else 0.5 * g * (1 + torch.tanh(0.7978845608028654 * (g + 0.044715 * g**3)))
    for split in (1, 2):
        y = qmatmul(x, pair, act=act, split=split)
        assert y.shape == (M, 16)
        assert _err(y, a * u) < (GEMV_TOL if M == 1 else MM_TOL) * 4


def test_bias_is_added_once_with_split_k() -> None:
    qt, ref_w = _pair(L.Q8_0, 19, 256, 5)
    bias = torch.randn(19).to(DEV)
    x = torch.randn(1, 256).to(DEV)
    for split in (1, 4):
        y = qmatmul(x, P.pack(qt), bias=bias, split=split)
        assert _err(y, x.double().cpu() @ ref_w.T + bias.double().cpu()) < GEMV_TOL


def test_gpu_configs_fill_the_grid_and_cover_k() -> None:
    """What the dispatcher picks on an H100 for the shipped shapes: whole warps, C dividing K / 32
    where it can, row tiles a multiple of 8."""
    for n, k in [(960, 576), (576, 1536), (1152, 896), (896, 4864), (640, 2048), (262144, 640)]:
        cfg = choose(1, n, k, (9, 0))
        assert cfg.kernel == "gemv" and cfg.block_n * cfg.block_k == 32 * cfg.num_warps
        assert (k // 32) % cfg.block_k == 0
    assert choose(8, 960, 576, (9, 0)).kernel == "mm" and choose(8, 960, 576, (9, 0)).block_m == 16


def test_unpacked_types_are_refused() -> None:
    qt, _ = _pair(L.Q3_K, 8, 256, 0)
    with pytest.raises(ValueError, match="not packed"):
        P.pack(qt)


@pytest.mark.parametrize("M,split", [(1, 1), (1, 3), (5, 1), (5, 2), (40, 1)])
@pytest.mark.parametrize("post", [False, True], ids=["norm", "post-norm"])
def test_residual_add_and_rmsnorm_in_the_matmul_launch(M: int, split: int, post: bool) -> None:
    """linear_residual_norm on the Triton backend (the row tail in the matmul's launch) against the
    unfused ops: matmul, [post-norm], residual add + RMSNorm."""
    from kernels.triton_backend import TritonOps
    from kernels.unfused import linear_residual_norm as unfused_linear_residual_norm

    ops = TritonOps(torch.device(DEV), dtype=torch.float32)
    qt, _ = _pair(L.Q4_K, 44, 256, 9)  # 44 rows: the last 8-row group and the last N tile are partial
    w = ops.prepare_weight(qt)
    gen = torch.Generator().manual_seed(M)
    x, res = torch.randn(M, 256, generator=gen).to(DEV), torch.randn(M, 44, generator=gen).to(DEV)
    g, g1 = (torch.rand(44, generator=gen) + 0.5).to(DEV), (torch.rand(44, generator=gen) + 0.5).to(DEV)
    post_w = g1 if post else None
    ref_x, ref_h = unfused_linear_residual_norm(ops, x, w, res, g, 1e-6, post_w)
    from kernels.qmatmul import qmatmul
    from kernels.qmatmul_packed import NormTail

    h = torch.empty_like(res)
    got_x = qmatmul(x, w, split=split, tail=NormTail(res, g, 1e-6, h, post_w))
    tol = GEMV_TOL if M == 1 else MM_TOL
    assert _err(h, ref_h.double().cpu()) < tol * 4 and _err(got_x, ref_x.double().cpu()) < tol * 8
    assert int(W.counters(torch.device(DEV), 1).abs().sum()) == 0
