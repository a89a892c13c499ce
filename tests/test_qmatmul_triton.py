"""Fused quantized matmul (kernels/qmatmul.py) against dequantize-then-matmul in fp32.
Interpreter on CPU, compiled on a GPU. Every type x both kernels x ragged shapes.

Tolerance (`_check`): with fp32 accumulation in any order, |y - x @ W^T| <= gamma_K * (|x| @ T^T)
where gamma_K ~ K * 2^-24 (each product and partial sum rounds once; we allow 2 K 2^-24) and T
bounds the terms actually summed: |W| for the tiled kernel, |a q| + |c| for the GEMV, which sums
x . q per sub-block and adds the offset c (w = a q + c) separately. When the tiled kernel feeds
fp16 weights to tl.dot, each weight is rounded once more (2^-11 of |W|); on a GPU an fp32 tl.dot
is TF32, rounding x and W (2 * 2^-11); an fp16 output rounds once (2^-11 of |y|). These are bounds, not fitted numbers, so a wrong element (an
off-by-one block, a wrong scale) fails by orders of magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.loading.gguf import QuantTensor
from kernels import quant_layouts as L
from kernels import ref_quant
from kernels.qmatmul import Config, all_configs, choose, qmatmul

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
U16 = 2.0**-11  # unit roundoff of fp16
U32 = 2.0**-24


def _weight(t: int, n: int, k: int, seed: int) -> QuantTensor:
    raw = L.random_blocks(t, n, k, torch.Generator().manual_seed(seed))
    return QuantTensor("w", t, (n, k), raw.to(DEV))


def _k(t: int) -> int:
    """Smallest ragged-ish K per type: whole blocks, not a multiple of the 64/128/256-weight K tiles."""
    return 256 if L.BLOCK[t][0] == 256 else 96 if t in L.QUANT_TYPES else 80


def _terms(w: QuantTensor) -> torch.Tensor:
    """|a q| + |c| per weight: dequantize once with the min field zeroed, once with d zeroed."""
    raw = w.data.cpu()
    dense = ref_quant.dequantize(raw, w.ggml_type, w.shape)
    if w.ggml_type not in L.OFFSET_TYPES:  # w = a q +/- c with (d, m) f16 fields
        return dense.abs()
    (d_off, m_off), _ = L.F16_FIELDS[w.ggml_type]
    parts = []
    for off in (m_off, d_off):
        blocks = raw.clone().reshape(-1, L.BLOCK[w.ggml_type][1])
        blocks[:, off : off + 2] = 0
        parts.append(ref_quant.dequantize(blocks, w.ggml_type, w.shape).abs())
    return parts[0] + parts[1]


def _check(y: torch.Tensor, x: torch.Tensor, w: QuantTensor, tiled: bool) -> None:
    dense = ref_quant.dequantize(w.data.cpu(), w.ggml_type, w.shape)
    xf = x.float().cpu()
    want = xf @ dense.T
    mag = xf.abs() @ (dense.abs() if tiled else _terms(w)).T
    rel = 2 * x.shape[1] * U32 + (U16 if tiled and x.dtype == torch.float16 else 0.0)
    if tiled and x.dtype == torch.float32 and DEV == "cuda":
        rel += 2 * U16  # TF32 has fp16's 10-bit mantissa
    out_u = U16 if x.dtype == torch.float16 else 0.0
    yf = y.float().cpu()
    assert y.dtype == x.dtype and y.shape == want.shape
    assert not yf.isnan().any(), "unwritten (NaN) outputs"
    err = (yf - want).abs()
    bound = rel * mag + out_u * want.abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def _run(x: torch.Tensor, w: QuantTensor, **kw) -> torch.Tensor:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=DEV)
    y = qmatmul(x, w, out=out, **kw)
    assert y is out
    return y


@pytest.mark.parametrize("M", [1, 3, 16, 17, 33])
@pytest.mark.parametrize("t", L.ALL_TYPES, ids=L.NAMES.get)
def test_matches_reference(t, M):
    # N = 37: ragged against BLOCK_N 16 (gemv) and 64/128 (tiled); fp16 and fp32 activations alternate.
    w = _weight(t, 37, _k(t), seed=t)
    dtype = torch.float16 if M in (3, 17) else torch.float32
    x = torch.randn(M, _k(t), generator=torch.Generator().manual_seed(M)).to(dtype).to(DEV)
    _check(_run(x, w), x, w, tiled=M > 16)


@pytest.mark.parametrize(
    "t,K,M,split", [(L.Q4_K, 1024, 1, 3), (L.Q6_K, 768, 4, 2), (L.Q8_0, 320, 2, 2), (L.F16, 200, 1, 4)],
    ids=["Q4_K", "Q6_K", "Q8_0", "F16"],
)
def test_split_k(t, K, M, split):
    """Forced split-K (partials + reduce kernel), uneven split sizes, several super-blocks per row."""
    w = _weight(t, 21, K, seed=K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).to(DEV)
    y = _run(x, w, split=split)
    _check(y, x, w, tiled=False)
    assert torch.equal(y, _run(x, w, split=split)), "split-K must be deterministic"


@pytest.mark.parametrize("M,split", [(1, 1), (3, 2), (40, None)], ids=["gemv", "gemv-split-k", "tiled"])
def test_bias_in_the_epilogue(M, split):
    """y = x @ W^T + b with b added once in fp32 by the kernel (GEMV epilogue, the split-K reduce, or the
    tiled epilogue): within the bound of the product alone, since adding b rounds nothing more in fp32."""
    t, K = L.Q8_0, 320
    w = _weight(t, 37, K, seed=11)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(12)).to(DEV)
    bias = torch.randn(37, generator=torch.Generator().manual_seed(13)).to(DEV) * 100
    y = _run(x, w, split=split, bias=bias) if split else _run(x, w, bias=bias)
    _check(y - bias, x, w, tiled=M > 16)
    assert torch.equal(y, qmatmul(x, w, split=split, bias=bias)), "deterministic"
    with pytest.raises(ValueError, match="bias"):
        qmatmul(x, w, bias=bias[:36])


def test_tiled_multi_superblock():
    w = _weight(L.Q5_K, 70, 768, seed=3)
    x = torch.randn(40, 768, generator=torch.Generator().manual_seed(6)).half().to(DEV)
    _check(_run(x, w), x, w, tiled=True)


@pytest.mark.parametrize("cfg", sorted(all_configs(), key=repr), ids=repr)
def test_every_dispatch_config(cfg):
    """Each config the table can pick, on a 32-block and a 16-sub-block type, M ragged in its tile."""
    for t in (L.Q4_1, L.Q3_K):
        w = _weight(t, 45, _k(t), seed=11)
        M = max(1, cfg.block_m - 1) if cfg.kernel == "gemv" else cfg.block_m + 3
        x = torch.randn(M, _k(t), generator=torch.Generator().manual_seed(7)).to(DEV)
        _check(_run(x, w, config=cfg), x, w, tiled=cfg.kernel == "mm")


def test_dispatch_table():
    from kernels.qmatmul import INTERPRETER_CC

    assert choose(1, 4096, 4096, L.Q4_K, (9, 0)).kernel == "gemv"
    assert choose(1, 4096, 4096, L.Q4_K, INTERPRETER_CC) not in all_configs()
    assert choose(16, 4096, 4096, L.Q4_K, (9, 0)) == Config("gemv", 16, 16, 64, 8)
    assert choose(17, 4096, 4096, L.Q4_K, (9, 0)).kernel == "mm"
    assert choose(100000, 4096, 4096, L.Q4_K, (9, 0)).block_m == 128


def _model_tensor(name: str, tensor: str, rows: int) -> QuantTensor:
    from engine.loading.gguf import GGUFFile

    path = os.path.expanduser(f"~/.cache/llamatron/{name}.gguf")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    qt = GGUFFile(path).tensor(tensor)
    return QuantTensor(qt.name, qt.ggml_type, (rows, qt.shape[1]), qt.data[:rows].clone().to(DEV))


@pytest.mark.parametrize(
    "tensor", ["blk.0.ffn_down.weight", "blk.0.ffn_gate.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight"]
)
def test_real_gemma_weights(tensor):
    """Real Q4_K / Q5_0 / Q6_K / Q8_0 rows from gemma-3-270m (whichever type each tensor has)."""
    w = _model_tensor("gemma-3-270m", tensor, 24)
    for M in (2, 20):
        x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M)).to(DEV)
        _check(_run(x, w), x, w, tiled=M > 16)


def test_backend_linear_and_embedding():
    """kernels.backend wiring: TritonOps.linear / .embedding go through qmatmul / dequantize."""
    from kernels import backend

    ops = backend("cuda" if DEV == "cuda" else "triton")
    w = _weight(L.Q8_0, 19, 64, seed=12)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8)).to(ops.dtype).to(DEV)
    _check(ops.linear(x, w), x, w, tiled=False)
    ids = torch.tensor([3, 18, 3], device=DEV)
    want = ref_quant.dequantize(w.data.cpu(), w.ggml_type, w.shape)[ids.cpu()].to(ops.dtype)
    assert torch.equal(ops.embedding(ids, w).cpu(), want)


def test_leading_dims():
    w = _weight(L.Q4_0, 8, 64, seed=14)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(9)).to(DEV)
    y = qmatmul(x, w)
    assert y.shape == (2, 3, 8)
    assert torch.equal(y.reshape(6, 8), qmatmul(x.reshape(6, 64), w))


def test_bad_inputs():
    w = _weight(L.Q4_0, 8, 64, seed=13)
    with pytest.raises(ValueError):
        qmatmul(torch.randn(2, 96, device=DEV), w)
    with pytest.raises(ValueError):
        qmatmul(torch.randn(2, 64, device=DEV), w, out=torch.empty(2, 9, device=DEV))
    assert qmatmul(torch.randn(0, 64, device=DEV), w).shape == (0, 8)


def test_bench_script_runs(capsys, tmp_path):
    """scripts/bench_kernels.py: its GPU-less answer, and a functional dry run under the interpreter
    (so the script does not rot between the rare runs on a lent GPU)."""
    from scripts import bench_kernels

    if DEV == "cuda":
        pytest.skip("the GPU benchmark itself runs in scripts/gpu_check.sh")
    if not torch.cuda.is_available():
        assert bench_kernels.main([]) == 0
        assert "needs a CUDA GPU" in capsys.readouterr().out
    md = tmp_path / "bench.md"
    assert bench_kernels.main(["--device", "cpu", "--shapes", "tiny", "--types", "Q6_K", "--ms", "2,20",
                               "--no-attention", "--out", str(md)]) == 0
    out = capsys.readouterr().out
    # Q6_K is packed: M >= 2 takes the packed tensor-core kernel (qmatmul_packed.choose)
    assert "| tiny | Q6_K | 40 | 256 | 2 | mm |" in out and "| 20 | mm |" in out and "2 rows, 0 errors" in out
    assert "| 20 | mm |" in md.read_text()
