"""GPU benchmark of the quantized kernels against the memory-bandwidth limit and bf16 torch.matmul.

    python3 scripts/bench_kernels.py                    # the real decode shapes, M 1/8/16/64 (gpu_check.sh)
    python3 scripts/bench_kernels.py --types Q4_K,Q8_0 --ms 1,4,16,512 --shapes 8b
    python3 scripts/bench_kernels.py --tune             # also try every config; print TABLE entries

For each weight type and shape (by default the three shipped models' decode matrices, at their
real unaligned K = 576/640/896; `--shapes 8b` adds an 8B-class layer) and each M (decode 1/8/16/64
by default): time of `ops.linear` on the weight as `TritonOps.prepare_weight` packs it at load,
achieved GB/s (packed weight + activation + output bytes) and its fraction of the measured
device-to-device copy bandwidth (bytes read + written), TFLOP/s, and the speed-up over
torch.matmul on the same weights dequantized to bf16. Timing:
20 calls captured in a CUDA graph (no launch gaps), rotating over enough weight copies to defeat
L2, median of 5 replays. Attention rows come from scripts/bench_attention.py's `rows(device)`
when that module exists. Tables go to stdout and --out ($OUT/bench_kernels.md by default when OUT
is set); a short summary (the issue's goals) prints last. Without CUDA it says so and exits 0;
--device cpu runs the same code under TRITON_INTERPRET=1 on a tiny shape (a functional check).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, N, K, types): matrices of the three real models (their types) and an 8B-class layer.
SHAPES = {
    "models": [
        ("smollm2 ffn_up", 1536, 576, ["Q4_1"]), ("smollm2 lm_head", 49152, 576, ["Q8_0"]),
        ("gemma3 ffn_up", 2048, 640, ["Q5_0"]), ("gemma3 ffn_down", 640, 2048, ["Q4_K", "Q6_K"]),
        ("gemma3 lm_head", 262144, 640, ["Q8_0"]), ("qwen2.5 ffn_up", 4864, 896, ["Q5_0"]),
        ("qwen2.5 ffn_down", 896, 4864, ["Q4_K", "Q6_K"]), ("qwen2.5 lm_head", 151936, 896, ["Q8_0"]),
    ],
    "8b": [("8B attn_o", 4096, 4096, None), ("8B ffn_up", 14336, 4096, None), ("8B ffn_down", 4096, 14336, None)],
    "tiny": [("tiny", 40, 256, None)],  # --device cpu: exercises this script under the interpreter
}
CALLS = 20  # per captured graph
DEFAULT_MS = (1, 8, 16, 64)  # decode batch sizes (gpu_precompile.py compiles these too)


def copy_bandwidth(dev: str) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written (as gpu_check.sh)."""
    if dev == "cpu":
        return 10.0
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (s.elapsed_time(e) / 1e3) / 1e9


def time_graph(fns: list, dev: str) -> float:
    """Seconds per call: `fns` (one per weight copy) cycled CALLS times inside one CUDA graph."""
    if dev == "cpu":  # the interpreter: one timed call, only to exercise the script
        fns[0]()
        t = time.perf_counter()
        fns[0]()
        return time.perf_counter() - t
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up: compile, allocate, cuBLAS handles
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            fns[i % len(fns)]()
    g.replay()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def copies_for(nbytes: int, dev: str) -> int:
    if dev == "cpu":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(32, math.ceil(3 * l2 / max(nbytes, 1))))


@lru_cache(maxsize=1)  # one shape at a time: reused for every M, then freed
def weights(t: int, N: int, K: int, dev: str) -> tuple[list, list]:
    """Enough copies of random blocks, packed as the backend packs them at load (and of their bf16
    dequantization), to defeat L2."""
    from engine.loading.gguf import QuantTensor
    from kernels import quant_layouts as L
    from kernels import ref_quant

    raw = L.random_blocks(t, N, K, torch.Generator().manual_seed(N + K + t))
    ops = get_ops(dev)
    ws = [ops.prepare_weight(QuantTensor("w", t, (N, K), raw.to(dev))) for _ in range(copies_for(raw.numel(), dev))]
    dense = ref_quant.dequantize(raw, t, (N, K), act_dtype(dev)).to(dev)
    denses = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * 2, dev) - 1)]
    return ws, denses


@lru_cache(maxsize=None)
def get_ops(dev: str):
    """The Triton backend on `dev` (cuda, or cpu under the interpreter): prepare_weight + linear."""
    from kernels.triton_backend import TritonOps

    return TritonOps(torch.device(dev))


def packed_bytes(w) -> int:
    """Bytes a multiply reads of a prepared weight, whatever object prepare_weight returns."""
    n = getattr(w, "nbytes", None)
    if isinstance(n, int):
        return n
    if hasattr(w, "data") and isinstance(w.data, torch.Tensor):
        return w.data.numel() * w.data.element_size()
    return sum(v.numel() * v.element_size() for v in vars(w).values() if isinstance(v, torch.Tensor))


def kernel_name(M: int, N: int, K: int, t: int, dev: str, config=None) -> str:
    """The kernel the dispatch picks (informational)."""
    try:
        from kernels import packed as P
        from kernels import qmatmul as Q
        from kernels import qmatmul_packed as QP

        cc = Q._device_info(torch.device(dev))[0]
        cfg = config or (QP.choose(M, N, K, cc, t) if t in P.PACKED_TYPES else Q.choose(M, N, K, t, cc))
        return str(getattr(cfg, "kernel", cfg))
    except Exception:  # noqa: BLE001 - the chooser is internal and may change
        return "?"


def act_dtype(dev: str) -> torch.dtype:
    return torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter has no bf16 arithmetic


def bench_one(t: int, N: int, K: int, M: int, copy_gbs: float, dev: str, config=None) -> dict:
    from kernels import quant_layouts as L

    ws, denses = weights(t, N, K, dev)
    ops = get_ops(dev)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(act_dtype(dev)).to(dev)
    out = torch.empty(M, N, dtype=x.dtype, device=dev)
    if config is None:
        fns = [lambda w=w: ops.linear(x, w) for w in ws]
    else:  # --tune: a config forced on the kernel (qmatmul_packed.PackedConfig or qmatmul.Config)
        from kernels.qmatmul import qmatmul

        fns = [lambda w=w: qmatmul(x, w, config=config, out=out) for w in ws]
    sec = time_graph(fns, dev)
    ref_sec = time_graph([lambda d=d: torch.matmul(x, d.T, out=out) for d in denses], dev)
    got = ops.linear(x, ws[0]).float()
    want = x.float() @ denses[0].float().T
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    moved = packed_bytes(ws[0]) + x.numel() * x.element_size() + out.numel() * out.element_size()
    return {"type": L.NAMES[t], "N": N, "K": K, "M": M, "kernel": kernel_name(M, N, K, t, dev, config),
            "us": sec * 1e6,
            "GB/s": moved / sec / 1e9, "%copy": 100 * moved / sec / 1e9 / copy_gbs,
            "TFLOP/s": 2 * M * N * K / sec / 1e12, "bf16_us": ref_sec * 1e6, "speedup": ref_sec / sec,
            "rel_err": err}


def tune(t: int, N: int, K: int, M: int, copy_gbs: float, dev: str) -> tuple:
    """Time every candidate config of M's kernel family; return the TABLE key and the fastest config
    (qmatmul_packed.TABLE for the packed types, qmatmul.TABLE for the GGUF-block ones)."""
    from kernels import packed as P

    cc = torch.cuda.get_device_capability() if dev == "cuda" else (9, 0)
    if t in P.PACKED_TYPES:
        from kernels import qmatmul_packed as QP

        cands = set(QP.candidates(M)) | {QP.choose(M, N, K, cc, t)}
        b = QP.m_bucket(M)
    else:
        from kernels.qmatmul import _DEFAULTS, Config, m_bucket

        b = m_bucket(M)
        cands = {_DEFAULTS[b]}
        if _DEFAULTS[b].kernel == "gemv":
            cands |= {Config("gemv", b, bn, bk, nw) for bn in (8, 16, 32) for bk in (64, 128, 256)
                      for nw in (2, 4, 8) if b * bn * bk <= 16384}
        else:  # BLOCK_K 64 or 3+ stages spill registers for most types (see qmatmul._DEFAULTS)
            cands |= {Config("mm", bm, bn, bk, nw, st) for bm in (64, 128) for bn in (64, 128) for bk in (32, 64)
                      for nw in (4, 8) for st in (1, 2) if bm >= b or bm == 128}
    best = min(cands, key=lambda c: bench_one(t, N, K, M, copy_gbs, dev, config=c)["us"])
    return (b, N, K, t, tuple(cc)), best


def table_lines(rows: list[dict]) -> list[str]:
    """A markdown table over the union of the rows' keys (error rows carry other keys)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    head = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return head + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows] if rows else []


def attention_rows(device: str) -> list[dict]:
    try:
        mod = importlib.import_module("scripts.bench_attention")
    except ModuleNotFoundError:
        return []
    return mod.rows(device)


def main(argv: list[str] | None = None) -> int:
    from kernels import quant_layouts as L

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="all", help="comma list of ggml type names, or 'all'")
    ap.add_argument("--shapes", default="models", help="comma list of: models, 8b, tiny")
    ap.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    ap.add_argument("--budget", type=float, default=35.0, help="seconds; later rows are skipped past it")
    ap.add_argument("--tune", action="store_true", help="search configs and print TABLE entries")
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--copy-gbs", type=float, default=0.0, help="measured copy bandwidth (default: measure it)")
    ap.add_argument("--device", default="cuda", help="cpu: a functional dry run under TRITON_INTERPRET=1")
    ap.add_argument("--out", default="", help="also write the tables here (default: $OUT/bench_kernels.md)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (none visible); nothing to measure.")
        return 0
    by_name = {v: k for k, v in L.NAMES.items()}
    # the goal types first, so that a spent --budget cuts the least interesting rows
    order = [L.Q4_K, L.Q8_0, L.Q6_K, L.Q5_0, L.Q4_1, L.Q4_0, L.Q5_1, L.Q5_K, L.Q3_K, L.Q2_K, L.F16, L.BF16, L.F32]
    types = order if args.types == "all" else [by_name[n] for n in args.types.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    copy_gbs = args.copy_gbs or copy_bandwidth(dev)
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(f"{p.name} (cc {p.major}.{p.minor}, {p.multi_processor_count} SMs); copy bandwidth {copy_gbs:.0f} GB/s")
    t0, rows, table, skipped = time.perf_counter(), [], {}, 0
    attn = [] if args.no_attention else attention_rows(dev)  # first: its own rows are few and fast
    for group in args.shapes.split(","):
        for label, N, K, names in SHAPES[group]:
            for t in types if names is None else [by_name[n] for n in names if by_name[n] in types]:
                for M in ms:
                    if time.perf_counter() - t0 > args.budget:
                        skipped += 1
                        continue
                    try:
                        rows.append({"shape": label, **bench_one(t, N, K, M, copy_gbs, dev)})
                        if args.tune:
                            key, cfg = tune(t, N, K, M, copy_gbs, dev)
                            table[key] = cfg
                    except Exception as e:  # one failing case must not hide the others
                        rows.append({"shape": label, "type": L.NAMES[t], "M": M, "error": repr(e)[:200]})
    lines = table_lines(rows) + table_lines(attn)
    if skipped:
        lines.append(f"({skipped} cases skipped: --budget {args.budget:.0f} s spent; narrow --types/--shapes/--ms)")
    if table:
        lines += ["# TABLE entries (qmatmul_packed.TABLE for packed types, qmatmul.TABLE otherwise):"]
        lines += [f"    {k}: {v!r}," for k, v in sorted(table.items())]
    out_file = args.out or (os.path.join(os.environ["OUT"], "bench_kernels.md") if os.environ.get("OUT") else "")
    if out_file:
        Path(out_file).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    # Last, for readers of the output's tail: the goals and each type's decode bandwidth.
    print(f"## summary (full table{' in ' + out_file if out_file else ' above'})")
    for r in rows:
        if r.get("M") == 1 and "us" in r:
            print(f"{r['shape']:18} {r['type']:5} M=1: {r['GB/s']:6.0f} GB/s = {r['%copy']:3.0f}% of copy bandwidth, "
                  f"{r['speedup']:.2f}x bf16 torch.matmul")
    errors = [r for r in rows if "error" in r]
    print(f"{len(rows)} rows, {len(errors)} errors, {time.perf_counter() - t0:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
