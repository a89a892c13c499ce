"""Offline engine throughput: LLMEngine.generate of N prompts x M new tokens at several max_num_seqs.

    .venv/bin/python scripts/bench_engine.py                      # 32 x 128 on smollm2, seqs 1 8 32
    .venv/bin/python scripts/bench_engine.py --seqs 8 --max-tokens 32
    .venv/bin/python scripts/bench_engine.py --llamacpp-python /path/to/venv/bin/python

Every request generates exactly --max-tokens tokens (ignore_eos, greedy), so the figure is
generated tokens / wall time of the whole generate() call (prefill included). With
--llamacpp-python, the same prompts run through llama-cpp-python (`Llama.create_completion`, one
request at a time: its Python API has no batching) in that interpreter, for comparison.
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
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--llamacpp-python", default=None, help="a python with llama-cpp-python installed")
    ap.add_argument("--llamacpp-prompts", type=int, default=0, help="run only the first K prompts there (0: all)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.loading.loader import load_model
    from engine.core.sampling import SamplingParams

    prompts = make_prompts(args.num_prompts)
    cfg = EngineConfig(model=args.model, device=args.device, max_model_len=512, kv_cache_gib=0.5)
    loaded = load_model(cfg)
    print(f"machine: {machine()}")
    print(f"model:   {loaded.path.name} ({loaded.config.arch}, {loaded.config.n_layers} layers) on {loaded.ops.device}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"work:    {args.num_prompts} prompts x {args.max_tokens} tokens, greedy, ignore_eos")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for n in args.seqs:
        cfg = EngineConfig(model=args.model, device=cfg.device, max_model_len=512, kv_cache_gib=0.5,
                           max_num_seqs=n, max_num_batched_tokens=max(2048, n))
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
        tps = bench_llamacpp(args.llamacpp_python, loaded.path, prompts[:k], args.max_tokens,
                             args.threads or os.cpu_count() or 1)
        print(f"llama.cpp (llama-cpp-python, sequential, {k} prompts): {tps:7.1f} tokens/s")


if __name__ == "__main__":
    main()
