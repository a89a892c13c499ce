"""Benchmark paged attention against torch SDPA on the same data laid out dense (GPU only).

Rows, per head layout (default: the three shipped models' layouts, `--layouts 8b` a Llama-8B-like
one of 32 query heads on 8 KV heads, head_dim 128): decode at batch 1/8/64 x context 512/4096 and
one 2048-token prefill, bf16. Decode is memory-bound:
each row prints the achieved GB/s of KV read and its fraction of the device's measured copy
bandwidth; prefill prints TFLOP/s. `rows(device)` feeds scripts/bench_kernels.py; run alone to print.
Goal (issue 4): decode within 1.5x of SDPA's flash backend, prefill within 2x.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BS = 16
# name -> (query heads, KV heads, head_dim)
LAYOUTS = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256), "qwen2.5": (14, 2, 64), "8b": (32, 8, 128)}
DEFAULT_LAYOUTS = ("smollm2", "gemma3", "qwen2.5")
DECODE = [(b, ctx) for b in (1, 8, 64) for ctx in (512, 4096)]
PREFILL = 2048


def _time_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer: the roofline the rows compare to."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


def _paged(dense_k: torch.Tensor, dense_v: torch.Tensor, gen: torch.Generator):
    """Dense [B, L, nkv, hd] -> shuffled block cache + block table (the kernel's view of the same data)."""
    B, L, NKV, HD = dense_k.shape
    nb = L // BS
    perm = torch.randperm(B * nb, device=dense_k.device, generator=gen)
    kc = torch.empty(B * nb, BS, NKV, HD, dtype=dense_k.dtype, device=dense_k.device)
    vc = torch.empty_like(kc)
    kc[perm] = dense_k.reshape(B * nb, BS, NKV, HD)
    vc[perm] = dense_v.reshape(B * nb, BS, NKV, HD)
    return kc, vc, perm.view(B, nb).int()


def _sdpa(q, k, v, causal: bool):
    """Flash backend where it takes the case (GQA natively), else whatever SDPA picks; returns (fn, name)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend, name in ((SDPBackend.FLASH_ATTENTION, "flash"), (None, "default")):
        def fn(backend=backend):
            if backend is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        try:
            fn()
            return fn, name
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend ran")


def _case(device, layout: str, B: int, ctx: int, q_len: int, bw: float, gen) -> dict:
    from kernels.attention import attention_workspace, paged_attention
    from kernels.metadata import AttentionMetadata

    NH, NKV, HD = LAYOUTS[layout]
    dt = torch.bfloat16
    dk = torch.randn(B, ctx, NKV, HD, device=device, dtype=dt, generator=gen)
    dv = torch.randn(B, ctx, NKV, HD, device=device, dtype=dt, generator=gen)
    kc, vc, bt = _paged(dk, dv, gen)
    q = torch.randn(B * q_len, NH, HD, device=device, dtype=dt, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.full((B * q_len,), -1, dtype=torch.int64, device=device), block_tables=bt,
        seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device) * q_len,
        max_seqlen_q=q_len, max_seqlen_k=ctx, block_size=BS)
    out = torch.empty_like(q)
    ws = attention_workspace(B, NH, HD, device) if q_len == 1 else None
    scale = HD ** -0.5
    ours = _time_ms(lambda: paged_attention(q, kc, vc, meta, scale, out=out, workspace=ws))
    qd = q.view(B, q_len, NH, HD).transpose(1, 2).contiguous()
    kd, vd = dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    del dk, dv
    ref_fn, backend = _sdpa(qd, kd, vd, causal=q_len > 1)
    ref_ms = _time_ms(ref_fn)
    err = (out.view(B, q_len, NH, HD).transpose(1, 2).float() - ref_fn().float()).abs().max().item()
    kv_bytes = 2 * B * ctx * NKV * HD * kc.element_size()
    row = dict(kernel=f"paged_attention {layout} {NH}/{NKV}x{HD}",
               case=f"{'decode' if q_len == 1 else 'prefill'} b={B} ctx={ctx}",
               ms=round(ours, 4), ref=f"sdpa-{backend}", ref_ms=round(ref_ms, 4),
               vs_ref=round(ours / ref_ms, 2), max_abs_err=round(err, 4))
    if q_len == 1:
        row.update(gbps=round(kv_bytes / ours / 1e6, 1), bw_frac=round(kv_bytes / ours / 1e6 / bw, 3))
    else:
        flops = 4 * B * NH * HD * ctx * ctx / 2  # causal: half the score matrix
        row.update(tflops=round(flops / ours / 1e9, 1), ref_tflops=round(flops / ref_ms / 1e9, 1))
    return row


def rows(device: torch.device | str = "cuda", layouts=DEFAULT_LAYOUTS) -> list[dict]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return []
    gen = torch.Generator(device=device).manual_seed(0)
    bw = copy_bandwidth(device)
    out = []
    for layout in layouts:
        for B, ctx in DECODE:
            out.append(_case(device, layout, B, ctx, 1, bw, gen))
            torch.cuda.empty_cache()
        out.append(_case(device, layout, 1, PREFILL, PREFILL, bw, gen))
    for r in out:
        r["copy_gbps"] = round(bw, 1)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; nothing to measure")
        return 0
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help=f"comma list of: {', '.join(LAYOUTS)}")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    for r in rows("cuda", args.layouts.split(",")):
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
