"""Offline engine speed: one stream (batch-1 decode, 512-token prefill) and throughput of N prompts
x M new tokens at several max_num_seqs.

    .venv/bin/python scripts/bench_engine.py                      # 32 x 128 on smollm2, seqs 1 8 32
    .venv/bin/python scripts/bench_engine.py --seqs 8 --max-tokens 32 --threads 1
    .venv/bin/python scripts/bench_engine.py --llama-bench ~/llama.cpp/build/bin/llama-bench --threads 1

Every request generates exactly --max-tokens tokens (ignore_eos, greedy), so a throughput figure is
generated tokens / wall time of the whole generate() call (prefill included). Batch-1 decode also
prints the bytes it reads per token (packed weights + KV) as GB/s and as a fraction of the
machine's measured read bandwidth at the same threads, its limit. --llama-bench runs llama.cpp's
llama-bench (pp512, tg128) on the same file and threads, in the same run, for the ratios;
--llamacpp-python the same prompts through llama-cpp-python (one request at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ["the ocean", "a robot", "bread", "the moon", "chess", "rain", "a library", "volcanoes",
          "music", "trains", "honey bees", "winter", "a lighthouse", "coffee", "deserts", "kites"]


def make_prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i // len(TOPICS) + 1}):"
            for i in range(n)]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def read_bandwidth_gbs(threads: int) -> float:
    """What streaming a 256 MB buffer from memory reaches (torch sum), the batch-1 decode limit."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(64 * 2**20)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    torch.set_num_threads(saved)
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes of every matrix one token reads (layers + lm_head, not the embedding lookup)."""
    def nbytes(w) -> int:
        if w is None:
            return 0
        if hasattr(w, "nbytes") and not hasattr(w, "element_size"):
            return int(w.nbytes)  # PackedWeight / QuantTensor
        return w.numel() * w.element_size()
    per_layer = sum(nbytes(getattr(layer, f)) for layer in model.layers for f in (
        "wqkv", "wq", "wk", "wv", "wo", "w_gate_up", "w_gate", "w_up", "w_down"))
    return per_layer + nbytes(model.lm_head)


def graphs_mode(loaded) -> str:
    """On a GPU a benchmark must replay CUDA graphs: a failed capture is an error, not a slower eager run."""
    return "require" if loaded.ops.device.type == "cuda" else "auto"


def single_stream(loaded, args, decode_tokens: int = 128) -> dict[str, float]:
    """Batch-1 decode after a 16-token prompt, and a 512-token prefill, each the best of 3."""
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.core.sampling import SamplingParams

    cfg = EngineConfig(model=args.model, device=loaded.ops.device.type, max_model_len=1024, kv_cache_gib=0.5,
                       max_num_seqs=1, max_num_batched_tokens=2048, cuda_graphs=graphs_mode(loaded))
    eng = LLMEngine(cfg, loaded)
    vocab = loaded.config.vocab_size
    eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    decode = prefill = 0.0
    for k in range(3):
        ids = [(97 * (k + i) + 11) % vocab for i in range(16)]
        dt = _timed(lambda ids=ids: eng.generate([ids], SamplingParams(temperature=0, max_tokens=decode_tokens,
                                                                        ignore_eos=True)))
        decode = max(decode, decode_tokens / dt)
        ids = [(31 * (k + i) + 7) % vocab for i in range(512)]
        dt = _timed(lambda ids=ids: eng.generate([ids], SamplingParams(temperature=0, max_tokens=1)))
        prefill = max(prefill, 512 / dt)
    kv = loaded.config.kv_bytes_per_token(loaded.ops.kv_dtype.itemsize) * (16 + decode_tokens / 2)
    return {"decode": decode, "prefill": prefill, "bytes_per_token": weight_bytes(loaded.model) + kv}


def llama_bench(binary: str, path: Path, threads: int) -> dict[str, float]:
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3",
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    res = {r["n_prompt"] and "prefill" or "decode": r["avg_ts"] for r in json.loads(out)}
    return res


def bench_llamacpp(python: str, path: Path, prompts: list[str], max_tokens: int, threads: int) -> float:
    code = f"""
import json, sys, time
from llama_cpp import Llama
llm = Llama(model_path={str(path)!r}, n_ctx=1024, n_threads={threads}, verbose=False)
prompts = json.loads(sys.stdin.read())
llm.create_completion(prompts[0], max_tokens=4, temperature=0)  # warm-up
t0, n = time.perf_counter(), 0
for p in prompts:
    out = llm.create_completion(p, max_tokens={max_tokens}, temperature=0, logit_bias={{llm.token_eos(): -100.0}})
    n += out["usage"]["completion_tokens"]
print(json.dumps({{"tokens": n, "seconds": time.perf_counter() - t0}}))
"""
    res = subprocess.run([python, "-c", code], input=json.dumps(prompts), capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return r["tokens"] / r["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for the kernels (0: all cores)")
    ap.add_argument("--llama-bench", default=None, help="a llama-bench binary built from source, for ratios")
    ap.add_argument("--llamacpp-python", default=None, help="a python with llama-cpp-python installed")
    ap.add_argument("--llamacpp-prompts", type=int, default=0, help="run only the first K prompts there (0: all)")
    args = ap.parse_args()

    import torch

    threads = args.threads or os.cpu_count() or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.core.sampling import SamplingParams
    from engine.loading.loader import load_model

    prompts = make_prompts(args.num_prompts)
    cfg = EngineConfig(model=args.model, device=args.device, max_model_len=512, kv_cache_gib=0.5,
                       threads=args.threads)
    loaded = load_model(cfg)
    print(f"machine: {machine()}")
    print(f"model:   {loaded.path.name} ({loaded.config.arch}, {loaded.config.n_layers} layers) on {loaded.ops.device}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"work:    {args.num_prompts} prompts x {args.max_tokens} tokens, greedy, ignore_eos")
    limit = read_bandwidth_gbs(threads) if loaded.ops.device.type == "cpu" else float("nan")
    one = single_stream(loaded, args)
    gbs = one["bytes_per_token"] * one["decode"] / 1e9
    print(f"batch-1 decode: {one['decode']:7.1f} tok/s, {one['bytes_per_token'] / 1e6:.0f} MB/token = {gbs:.1f} GB/s "
          f"= {gbs / limit:.0%} of the {limit:.1f} GB/s read bandwidth ({threads} threads)")
    print(f"prefill 512:    {one['prefill']:7.1f} tok/s")
    if args.llama_bench:
        lc = llama_bench(args.llama_bench, loaded.path, threads)
        print(f"llama-bench tg128: {lc['decode']:7.1f} tok/s -> llamatron {one['decode'] / lc['decode']:.2f}x; "
              f"pp512: {lc['prefill']:7.1f} tok/s -> llamatron {one['prefill'] / lc['prefill']:.2f}x")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for n in args.seqs:
        cfg = EngineConfig(model=args.model, device=cfg.device, max_model_len=512, kv_cache_gib=0.5,
                           max_num_seqs=n, max_num_batched_tokens=max(2048, n), threads=args.threads,
                           cuda_graphs=graphs_mode(loaded))
        eng = LLMEngine(cfg, loaded)
        eng.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        t0 = time.perf_counter()
        res = eng.generate(prompts, params)
        dt = time.perf_counter() - t0
        toks = sum(len(r.token_ids) for r in res)
        print(f"max_num_seqs {n:>3}: {toks} tokens in {dt:7.1f} s = {toks / dt:7.1f} tokens/s "
              f"(preemptions {eng.scheduler.num_preemptions})", flush=True)
        del eng
    if args.llamacpp_python:
        k = args.llamacpp_prompts or len(prompts)
        tps = bench_llamacpp(args.llamacpp_python, loaded.path, prompts[:k], args.max_tokens, threads)
        print(f"llama.cpp (llama-cpp-python, sequential, {k} prompts): {tps:7.1f} tokens/s")


if __name__ == "__main__":
    main()
