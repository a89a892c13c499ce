"""Device facts, copy bandwidth and the floor cost of one CUDA-graph node (steps 1-2 of gpu_check.sh).

    python3 scripts/gpu_device.py facts --json $OUT/device.json   # versions, SMs, L2, copy GB/s
    python3 scripts/gpu_device.py graph-floor --nodes 1000          # empty Triton kernels in a graph

Copy bandwidth: a 1 GiB device-to-device copy, GB/s counting bytes read plus bytes written (the
yardstick of bench_kernels.py and gpu_decode.py), median of 5 timed runs of 10 copies.
Graph floor: NODES launches of an empty Triton kernel captured in one CUDA graph, replayed 20
times: microseconds per node is what each kernel of a decoded token costs at the least (so
kernels per token x this = the decode step's floor), next to the same launches made eagerly.
Without CUDA both print what they can and exit 0 (a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def copy_gbs(dev: str) -> float:
    import torch

    n = (1 << 30) if dev == "cuda" else (32 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(5):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            for _ in range(10):
                b.copy_(a)
            times.append(time.perf_counter() - t)
    return 2 * n * 10 / sorted(times)[2] / 1e9


def facts(args) -> int:
    import torch
    import triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "device": dev}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info |= {"name": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                 "memory_gib": round(p.total_memory / 2**30, 1),
                 "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
    info["copy_gbs"] = round(copy_gbs(dev), 1)
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    print(f"device-to-device copy ({dev}): {info['copy_gbs']:.0f} GB/s counting bytes read + written")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f)
    return 0


def graph_floor(args) -> int:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def empty_kernel(x_ptr, n: tl.constexpr):
        pass

    if not torch.cuda.is_available():
        print("graph-floor: no CUDA device; nothing to measure (dry run)")
        return 0
    x = torch.empty(1, device="cuda")
    empty_kernel[(1,)](x, 1)  # compile
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.nodes):
        empty_kernel[(1,)](x, 1)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - t) / args.nodes * 1e6
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):  # a capture failure raises: never an eager fallback here
            for _ in range(args.nodes):
                empty_kernel[(1,)](x, 1)
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        torch.cuda.synchronize()
        times.append(st.elapsed_time(en) * 1e3 / args.nodes)
    times.sort()
    print(f"graph floor: {times[len(times) // 2]:.2f} us per node (median of 20 replays of {args.nodes} empty "
          f"Triton kernels; min {times[0]:.2f}, max {times[-1]:.2f}); eager launch {eager_us:.2f} us per kernel")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"us_per_node": times[len(times) // 2], "eager_us": eager_us, "nodes": args.nodes}, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("facts", "graph-floor"))
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    return facts(args) if args.what == "facts" else graph_floor(args)


if __name__ == "__main__":
    sys.exit(main())
