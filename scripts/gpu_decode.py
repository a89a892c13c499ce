"""Decode speed per model at batch 1/8/64 on CUDA, with a per-step breakdown (gpu_check.sh step 7).

    python3 scripts/gpu_decode.py /tmp/standin/*.gguf --batches 1,8,64 --copy-json $OUT/device.json

For each model and batch B:
  - engine: LLMEngine with CUDA graphs (capture failure is an error here, never an eager fallback),
    B requests of 16 prompt tokens, greedy, ignore_eos; after every sequence is decoding, STEPS
    calls of engine.step() are timed on the host clock (each ends with the sampled ids on the host):
    step ms (median) and tok/s = B / step;
  - the pieces, timed alone with CUDA events on the same model: the decoder (model.forward for B
    decode rows, context CTX tokens) captured in one CUDA graph and replayed ("graph"); lm_head
    (model.compute_logits on B rows, eager, as the engine runs it today); the sampler (Sampler on
    B greedy rows, host sync included); host = step - graph - lm_head - sampler (scheduling,
    metadata copies, output processing; a negative figure means the runner overlaps or fuses
    pieces that are timed apart here);
  - batch-1 GB/s: the weight bytes one token reads / (graph + lm_head), and its fraction of the
    measured copy bandwidth (--copy-json from gpu_device.py, or measured here).
Only public pieces are called (Model.forward/compute_logits, Sampler, LLMEngine.step), so the
runner's internals may change freely. Without CUDA it prints the plan and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BS = 16  # KV block size (EngineConfig's default)
MAX_LEN = 512  # max_model_len of every engine here (the graphs are captured for it)
CTX = 128  # context of each sequence in the timed pieces
PROMPT = 16  # prompt tokens per request in the engine runs
STEPS = 24  # timed engine steps
REPS = 20  # timed replays / calls per piece


def buckets(max_num_seqs: int) -> list[int]:
    """The decode batch sizes the engine captures (engine/core/runner.py's rule)."""
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)) if b <= max_num_seqs} | {max_num_seqs})


def decode_inputs(model, B: int, ctx: int, device: torch.device):
    """(input_ids, positions, meta, kv_caches) of B decode rows at context `ctx`, KV filled with noise."""
    from kernels import AttentionMetadata

    per_seq = -(-(ctx + 1) // BS)
    kv = model.allocate_kv_cache(B * per_seq, BS)
    for k, v in kv:
        k.normal_(0, 0.5)
        v.normal_(0, 0.5)
    tables = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(B)).to(torch.int32).view(B, per_seq)
    pos = torch.full((B,), ctx, dtype=torch.long)
    slots = tables[:, ctx // BS].long() * BS + ctx % BS
    meta = AttentionMetadata(
        slot_mapping=slots.to(device), block_tables=tables.to(device),
        seq_lens=torch.full((B,), ctx + 1, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device=device),
        max_seqlen_q=1, max_seqlen_k=MAX_LEN, block_size=BS)  # MAX_LEN: as the engine's graphs are captured
    ids = torch.randint(0, model.cfg.vocab_size, (B,), generator=torch.Generator().manual_seed(B + 1))
    return ids.to(device), pos.to(device), meta, kv


@dataclass
class _Seq:  # what the Sampler reads from a sequence
    params: object
    token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    generator: object = None


def _event_ms(fn, reps: int = REPS) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def pieces(model, B: int) -> dict[str, float]:
    """Milliseconds of the graph replay, lm_head and sampler for B decode rows."""
    from engine.core.sampling import Sampler, SamplingParams

    dev = model.ops.device
    ids, pos, meta, kv = decode_inputs(model, B, CTX, dev)
    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model.forward(ids, pos, meta, kv)  # warm-up outside the capture (compiles, allocates)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # raises on a capture failure: that is this check's finding
            hidden = model.forward(ids, pos, meta, kv)
        graph_ms = _event_ms(g.replay)
        lm_ms = _event_ms(lambda: model.compute_logits(hidden))
        logits = model.compute_logits(hidden)
        sampler = Sampler(model.cfg.vocab_size)
        seqs = [_Seq(SamplingParams(temperature=0)) for _ in range(B)]
        sampler(logits, seqs)
        ts = []
        for _ in range(REPS):
            torch.cuda.synchronize()
            t = time.perf_counter()
            sampler(logits, seqs)  # ends with the token ids on the host: its own sync
            ts.append((time.perf_counter() - t) * 1e3)
    del g, kv
    torch.cuda.empty_cache()
    return {"graph_ms": graph_ms, "lm_head_ms": lm_ms, "sampler_ms": statistics.median(ts)}


def engine_step_ms(loaded, B: int) -> float:
    """Median wall milliseconds of one engine decode step at batch B (graphs required)."""
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.core.sampling import SamplingParams

    # "require": a failed capture raises (GraphCaptureError) instead of running eagerly
    cfg = EngineConfig(model=str(loaded.path), device="cuda", max_model_len=MAX_LEN, max_num_seqs=B,
                       max_num_batched_tokens=max(2048, B * PROMPT), cuda_graphs="require")
    eng = LLMEngine(cfg, loaded)
    vocab = loaded.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=STEPS + 8, ignore_eos=True)
    for i in range(B):
        eng.add_request(f"r{i}", [(31 * i + 7 * j + 11) % vocab for j in range(PROMPT)], params)
    for _ in range(4):  # prefill (one or more steps), then the first decode steps: graphs warm
        eng.step()
    ts = []
    for _ in range(STEPS):
        t = time.perf_counter()
        eng.step()
        ts.append((time.perf_counter() - t) * 1e3)
    while eng.has_unfinished():
        eng.step()
    del eng
    torch.cuda.empty_cache()
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--copy-json", default="", help="gpu_device.py facts --json output (copy_gbs)")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if not torch.cuda.is_available():
        print(f"gpu_decode: no CUDA device; would run batches {batches} on {', '.join(args.models)} (dry run)")
        return 0
    from engine.config import EngineConfig
    from engine.loading.loader import load_model
    from scripts.bench_engine import weight_bytes

    copy = 0.0
    if args.copy_json and Path(args.copy_json).is_file():
        copy = float(json.loads(Path(args.copy_json).read_text()).get("copy_gbs", 0) or 0)
    if not copy:
        from scripts.gpu_device import copy_gbs

        copy = copy_gbs("cuda")
    rows, failed = [], 0
    for path in args.models:
        loaded = load_model(EngineConfig(model=path, device="cuda", max_model_len=MAX_LEN))
        wbytes = weight_bytes(loaded.model)
        for B in batches:
            row = {"model": Path(path).stem, "B": B}
            try:
                row |= pieces(loaded.model, B)
                row["step_ms"] = engine_step_ms(loaded, B)
                # greedy engine steps replay forward + lm_head + argmax in one graph and skip the sampler
                row["host_ms"] = row["step_ms"] - row["graph_ms"] - row["lm_head_ms"]
                row["tok_s"] = B / row["step_ms"] * 1e3
                gbs = wbytes / ((row["graph_ms"] + row["lm_head_ms"]) / 1e3) / 1e9
                row["GB/s"], row["%copy"] = gbs, 100 * gbs / copy
            except Exception as e:  # noqa: BLE001 - report every model and batch, then fail
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                failed += 1
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        del loaded
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}; copy bandwidth {copy:.0f} GB/s; context {CTX}, graphs at max_model_len "
          f"{MAX_LEN}; GB/s = weight bytes per token / (graph + lm_head)")
    print("| model | B | tok/s | step ms | graph ms | lm_head ms | sampler ms | host ms | GB/s (% copy) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['B']} | ERROR {r['error'][:80]} |||||||")
            continue
        print(f"| {r['model']} | {r['B']} | {r['tok_s']:.0f} | {r['step_ms']:.2f} | {r['graph_ms']:.3f} | "
              f"{r['lm_head_ms']:.3f} | {r['sampler_ms']:.3f} | {r['host_ms']:.2f} | "
              f"{r['GB/s']:.0f} ({r['%copy']:.0f}%) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
