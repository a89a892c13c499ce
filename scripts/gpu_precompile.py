"""Compile every Triton variant the later gpu_check.sh steps launch, in parallel, into one cache.

    TRITON_CACHE_DIR=/tmp/triton-cache python3 scripts/gpu_precompile.py /tmp/standin/*.gguf --workers 12

Triton compiles a kernel variant on its first launch (1-4 s each, one CPU core); the lent machine
has 16 cores and the timed steps run one process. So each worker process here runs, eagerly, on
one model: decode steps at every batch bucket the engine captures (1, 2, 4, ... 64, with the
graphs' max_seqlen_k), the engine's prefill sizes (B prompts of 16 tokens), lm_head on those
rows, and the logits check's steps (scripts/gpu_logits.py); one more worker runs
scripts/bench_kernels.py's shapes through ops.linear. Jobs are dealt round-robin; what one worker
compiles lands in TRITON_CACHE_DIR for all (the later steps must use the same directory). A job
that fails is reported and makes the exit status 1; the later steps will then compile (and fail)
on their own. --dry-run lists the jobs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def model_jobs(path: str, max_seqs: int) -> list[tuple]:
    from scripts.gpu_decode import PROMPT, buckets

    jobs = [("decode", path, b) for b in buckets(max_seqs)]
    jobs += [("prefill", path, b * PROMPT) for b in (1, 8, 64) if b <= max_seqs]
    return jobs + [("logits", path, 0)]


def kernel_jobs() -> list[tuple]:
    from scripts.bench_kernels import DEFAULT_MS, SHAPES

    return [("linear", label, (N, K, tuple(types), DEFAULT_MS)) for label, N, K, types in SHAPES["models"]]


_MODELS: dict[str, object] = {}


def _model(path: str):
    if path not in _MODELS:
        from engine.config import EngineConfig
        from engine.loading.loader import load_model
        from scripts.gpu_decode import MAX_LEN

        _MODELS[path] = load_model(EngineConfig(model=path, device="cuda", max_model_len=MAX_LEN)).model
    return _MODELS[path]


def run_job(job: tuple) -> None:
    import torch

    kind, what, arg = job
    with torch.inference_mode():
        if kind == "decode":
            from scripts.gpu_decode import CTX, decode_inputs

            m = _model(what)
            ids, pos, meta, kv = decode_inputs(m, arg, CTX, m.ops.device)
            m.compute_logits(m.forward(ids, pos, meta, kv))
        elif kind == "prefill":
            from kernels import AttentionMetadata

            m = _model(what)
            B, dev = arg // 16, m.ops.device
            kv = m.allocate_kv_cache(B * 2, 16)
            n = torch.full((B,), 16, dtype=torch.int32)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(arg, device=dev), block_tables=torch.arange(B * 2, dtype=torch.int32,
                                                                                     device=dev).view(B, 2),
                seq_lens=n.to(dev), cu_seqlens_q=torch.cat([torch.zeros(1, dtype=torch.int32), n.cumsum(0)]).to(
                    torch.int32).to(dev), max_seqlen_q=16, max_seqlen_k=16, block_size=16)
            h = m.forward(torch.zeros(arg, dtype=torch.long, device=dev), torch.arange(16, device=dev).repeat(B),
                          meta, kv)
            m.compute_logits(h[15::16])
        elif kind == "logits":
            from scripts.gpu_logits import run_steps

            m = _model(what)
            run_steps(m, m.cfg, m.ops.device)
        elif kind == "linear":
            from engine.loading.gguf import QuantTensor
            from kernels import backend
            from kernels import quant_layouts as L

            N, K, types, ms = arg
            ops = backend("cuda")
            by_name = {v: k for k, v in L.NAMES.items()}
            for t in types:
                raw = L.random_blocks(by_name[t], N, K, torch.Generator().manual_seed(N + K))
                w = ops.prepare_weight(QuantTensor("w", by_name[t], (N, K), raw.to("cuda")))
                for M in ms:
                    ops.linear(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), w)
        else:
            raise ValueError(kind)
        torch.cuda.synchronize()


def _tag(job: tuple) -> str:
    kind, what, arg = job
    return f"{kind} {what}" if kind == "linear" else f"{kind} {Path(what).stem} {arg}"


def worker(jobs: list[tuple], results) -> None:
    for job in jobs:
        t0 = time.perf_counter()
        try:
            run_job(job)
            results.put((job, time.perf_counter() - t0, ""))
        except Exception as e:  # noqa: BLE001 - report, go on with the next job
            results.put((job, time.perf_counter() - t0, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--no-kernels", action="store_true", help="skip bench_kernels.py's shapes")
    ap.add_argument("--dry-run", action="store_true", help="list the jobs and exit")
    args = ap.parse_args(argv)
    per_model = [model_jobs(p, args.max_seqs) for p in args.models]
    kjobs = [] if args.no_kernels else kernel_jobs()
    # One model per worker (each loads only its model); workers shared out by job count.
    nw = max(1, args.workers - (1 if kjobs else 0))
    shares = [max(1, round(nw * len(j) / max(1, sum(map(len, per_model))))) for j in per_model]
    lists: list[list[tuple]] = []
    for jobs, k in zip(per_model, shares, strict=True):
        lists += [jobs[i::k] for i in range(min(k, len(jobs)))]
    if kjobs:
        lists.append(kjobs)
    print(f"precompile: {sum(map(len, lists))} jobs in {len(lists)} processes; "
          f"TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR', '(triton default)')}", flush=True)
    if args.dry_run:
        for i, jobs in enumerate(lists):
            print(f"  worker {i}: " + ", ".join(_tag(j) for j in jobs))
        return 0
    ctx = mp.get_context("spawn")  # CUDA in children: never fork a process that has touched the GPU
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(jobs, results)) for jobs in lists]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    failed, done, total = 0, 0, sum(map(len, lists))
    while done < total:
        try:
            job, sec, err = results.get(timeout=5)
        except Exception:  # noqa: BLE001 - queue.Empty: see whether a worker died
            if all(not p.is_alive() for p in procs) and results.empty():
                print(f"workers exited with {total - done} jobs unreported", flush=True)
                failed += total - done
                break
            continue
        done += 1
        print(f"{'ok  ' if not err else 'FAIL'} {_tag(job)} {sec:.1f}s" + (f"\n{err}" if err else ""), flush=True)
        failed += bool(err)
    for p in procs:
        p.join()
    print(f"precompile: {done} jobs, {failed} failed, {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
