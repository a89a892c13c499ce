"""One small launch of every Triton kernel, for `compute-sanitizer` (run by scripts/gpu_check.sh).

    compute-sanitizer --tool memcheck --error-exitcode 99 python3 scripts/sanitizer_cases.py --all
    compute-sanitizer --tool racecheck python3 scripts/sanitizer_cases.py --case paged_attention,split_kv
    python3 scripts/sanitizer_cases.py --list
    TRITON_INTERPRET=1 python3 scripts/sanitizer_cases.py --all --device cpu     # the same on CPU

Shapes are small and ragged on purpose (row counts not a multiple of the tile, 37-token sequences,
padding slots of -1, 3 query heads per KV head) so that every mask and tail path runs once;
`qmatmul_real_k` runs the shipped models' real row lengths (K = 576/640/896 for the 32-weight
types, whose rows are then not 16-byte multiples: Q4_1 at 576 is 360 B, Q5_0 at 896 is 616 B;
K = 2048/4864 for the K-quants: Q6_K at 4864 is 3990 B) at M = 1, 8 and 40. Matrices go through
the backend as the engine uses it (`prepare_weight` at load, then `linear`). Each
case also checks its result against kernels/reference.py, loosely: the sanitizer hunts memory
errors, and a wrong answer from a clean run is worth knowing too. Run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that an out-of-bounds access is not hidden inside a pooled block.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES: dict[str, Callable[[torch.device], str]] = {}


def case(fn: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
    CASES[fn.__name__] = fn
    return fn


def _act_dtype(dev: torch.device) -> torch.dtype:
    return torch.bfloat16 if dev.type == "cuda" else torch.float32  # the interpreter has no bf16 math


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    if not err <= tol * scale:  # also catches NaN
        raise AssertionError(f"{what}: max error {err:.3g} vs scale {scale:.3g}")


def _quant(ggml_type: int, rows: int, cols: int, dev: torch.device):
    from engine.loading.gguf import QuantTensor
    from kernels import quant_layouts as L

    gen = torch.Generator().manual_seed(rows * 7 + ggml_type)
    raw = L.random_blocks(ggml_type, rows, cols, gen)
    return QuantTensor(f"w{L.NAMES[ggml_type]}", ggml_type, (rows, cols), raw.to(dev))


def _types(names: str) -> list[int]:
    from kernels import quant_layouts as L

    by_name = {v: k for k, v in L.NAMES.items()}
    return [by_name[n] for n in names.split(",")]


TYPES = "Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q5_K,Q6_K,F16"  # every type in the three models, and then some


@case
def dequant(dev: torch.device) -> str:
    from kernels import ref_quant
    from kernels.dequant import dequantize

    for t in _types(TYPES + ",Q2_K,Q3_K,Q5_1,F32,BF16"):
        w = _quant(t, 11, 512, dev)  # 11 rows: not a multiple of the 8-row tile
        got = dequantize(w.data, t, w.shape, torch.float32)
        _close(got.cpu(), ref_quant.dequantize(w.data.cpu(), t, w.shape, torch.float32), 0.0, f"dequant {w.name}")
    return "dequantize: 13 types, 11x512"


def _linear(dev: torch.device, t: int, N: int, K: int, M: int, bias: bool = False) -> None:
    """x [M, K] @ W^T through TritonOps.prepare_weight + linear, against the torch reference."""
    from kernels.reference import qmatmul as ref
    from kernels.triton_backend import TritonOps

    ops = TritonOps(dev)
    q = _quant(t, N, K, dev)
    w = ops.prepare_weight(q)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K)).to(dev, _act_dtype(dev))
    b = torch.randn(N, generator=torch.Generator().manual_seed(N)).to(dev) if bias else None
    got = ops.linear(x, w, b)
    want = ref(x.cpu().float(), q.to("cpu"))
    if b is not None:
        want = want + b.cpu()
    _close(got.cpu(), want.to(got.dtype), 3e-2, f"linear {q.name} N={N} K={K} M={M}{' +bias' if bias else ''}")


def _qmm(dev: torch.device, M: int) -> str:
    for t in _types(TYPES):
        _linear(dev, t, 37, 512, M)  # 37 output rows: ragged against every block_n
    return f"linear: M={M} N=37 K=512, {TYPES}"


@case
def qmatmul_gemv(dev: torch.device) -> str:
    return _qmm(dev, 3)


@case
def qmatmul_tiled(dev: torch.device) -> str:
    return _qmm(dev, 40)


# (type, K) of the shipped models' matrices: rows that are not 16-byte multiples
REAL_K = [("Q4_1", 576), ("Q8_0", 576), ("Q5_0", 640), ("Q8_0", 640), ("Q5_0", 896), ("Q8_0", 896),
          ("Q4_K", 2048), ("Q6_K", 2048), ("Q4_K", 4864), ("Q6_K", 4864)]


@case
def qmatmul_real_k(dev: torch.device) -> str:
    from kernels import quant_layouts as L

    # under the interpreter (CPU): the unaligned 32-weight rows at M = 1 and 8 only (seconds, not minutes)
    cases = REAL_K if dev.type == "cuda" else [c for c in REAL_K if c[1] < 1000]
    ms = (1, 8, 40) if dev.type == "cuda" else (1, 8)
    for name, K in cases:
        t = _types(name)[0]
        for M in ms:
            _linear(dev, t, 37, K, M, bias=(M == 8))  # qwen's QKV carries a bias: the epilogue path
    unaligned = [f"{n}@{k} ({L.row_bytes(_types(n)[0], k)} B)" for n, k in cases
                 if L.row_bytes(_types(n)[0], k) % 16]
    return f"linear at the real K, M={ms}, N=37: unaligned rows {', '.join(unaligned)}"


def _cache(dev: torch.device, nkv: int = 2, hd: int = 64, blocks: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    dt = _act_dtype(dev)
    kc = torch.randn(blocks, 16, nkv, hd, generator=g).to(dev, dt)
    return kc, torch.randn(blocks, 16, nkv, hd, generator=g).to(dev, dt)


@case
def store_kv(dev: torch.device) -> str:
    from kernels import reference
    from kernels.attention import store_kv as kernel

    kc, vc = _cache(dev)
    k = torch.randn(5, 2, 64).to(dev, kc.dtype)
    v = torch.randn(5, 2, 64).to(dev, kc.dtype)
    slots = torch.tensor([0, 17, -1, 80 * 16 - 1, 40], dtype=torch.int64, device=dev)  # -1: padding; the last slot
    rk, rv = kc.clone().cpu(), vc.clone().cpu()
    kernel(k, v, kc, vc, slots)
    reference.store_kv(k.cpu(), v.cpu(), rk, rv, slots.cpu())
    _close(kc.cpu(), rk, 0.0, "store_kv k")
    _close(vc.cpu(), rv, 0.0, "store_kv v")
    return "store_kv: 5 tokens (one padding), 2 KV heads x 64"


def _meta(dev: torch.device, q_lens: list[int], seq_lens: list[int]):
    from kernels.metadata import AttentionMetadata

    blocks_per_seq = 24
    bt = torch.arange(len(seq_lens) * blocks_per_seq, dtype=torch.int32).reshape(len(seq_lens), -1)
    bt = bt.flip(1).contiguous()  # non-contiguous block order: the gather must follow the table
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64, device=dev), block_tables=bt.to(dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), cu_seqlens_q=cu.to(dev),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens))


def _attn(dev: torch.device, q_lens: list[int], seq_lens: list[int], splits: int | None) -> None:
    from kernels import reference
    from kernels.attention import paged_attention

    kc, vc = _cache(dev)
    meta = _meta(dev, q_lens, seq_lens)
    q = torch.randn(sum(q_lens), 6, 64, generator=torch.Generator().manual_seed(9)).to(dev, kc.dtype)
    got = paged_attention(q, kc, vc, meta, 0.125, num_splits=splits)
    cpu_meta = _meta(torch.device("cpu"), q_lens, seq_lens)
    want = reference.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), cpu_meta, 0.125)
    _close(got.cpu(), want, 3e-2, f"paged_attention q_lens={q_lens} splits={splits}")


@case
def paged_attention(dev: torch.device) -> str:
    _attn(dev, [37, 1, 5], [37, 300, 21], splits=1)  # a prefill, a decode, a chunk on a cached prefix
    return "paged_attention: mixed prefill/decode, 6 q heads on 2 KV heads, hd 64"


@case
def split_kv(dev: torch.device) -> str:
    _attn(dev, [1, 1, 1], [300, 77, 16], splits=4)
    return "paged_attention split-KV: 3 decodes, 4 splits merged by the last to arrive"


@case
def rms_norm(dev: torch.device) -> str:
    from kernels import reference
    from kernels.norm import rms_norm as kernel

    dt = _act_dtype(dev)
    x = torch.randn(7, 576).to(dev, dt)
    r = torch.randn(7, 576).to(dev, dt)
    w = torch.randn(576).to(dev, torch.float32)
    out, res = kernel(x, w, 1e-5, r)
    want, want_res = reference.rms_norm(x.cpu(), w.cpu(), 1e-5, r.cpu())
    _close(out.cpu(), want, 2e-2, "rms_norm")
    _close(res.cpu(), want_res, 1e-2, "rms_norm residual")
    return "rms_norm: 7 x 576 with the fused residual add"


@case
def rope(dev: torch.device) -> str:
    from kernels import reference
    from kernels.rope import rope as kernel

    cs = reference.rope_cache(10000.0, 64, 512).to(dev)
    dt = _act_dtype(dev)
    pos = torch.tensor([0, 5, 511, 3, 100], device=dev)
    for neox in (False, True):
        q = torch.randn(5, 6, 64).to(dev, dt)
        k = torch.randn(5, 2, 64).to(dev, dt)
        want_q, want_k = reference.rope(q.cpu(), k.cpu(), pos.cpu(), cs.cpu(), neox)
        got_q, got_k = kernel(q, k, pos, cs, neox)
        _close(got_q.cpu(), want_q, 2e-2, f"rope q neox={neox}")
        _close(got_k.cpu(), want_k, 2e-2, f"rope k neox={neox}")
    return "rope: normal and neox, 6+2 heads x 64, positions up to 511"


@case
def act(dev: torch.device) -> str:
    from kernels import reference
    from kernels.act import gelu_tanh_mul, silu_mul

    dt = _act_dtype(dev)
    g = torch.randn(7, 1536).to(dev, dt)
    u = torch.randn(7, 1536).to(dev, dt)
    _close(silu_mul(g, u).cpu(), reference.silu_mul(g.cpu(), u.cpu()), 2e-2, "silu_mul")
    _close(gelu_tanh_mul(g, u).cpu(), reference.gelu_tanh_mul(g.cpu(), u.cpu()), 2e-2, "gelu_tanh_mul")
    return "silu_mul and gelu_tanh_mul: 7 x 1536"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--case", help=f"one or more (comma-separated) of: {', '.join(CASES)}")
    g.add_argument("--all", action="store_true")
    g.add_argument("--list", action="store_true")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = list(CASES) if args.all else args.case.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    dev = torch.device(args.device)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            what = CASES[name](dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok   {name:15} {time.perf_counter() - t0:6.2f}s  {what}", flush=True)
        except ImportError as e:  # a kernel module not written yet: say so, do not pass
            print(f"MISSING {name}: {e}", flush=True)
            failed += 1
        except Exception as e:  # noqa: BLE001  (report every case, then fail)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
