"""Full-size logits check: the CUDA backend against the torch reference backend on CPU.

    python3 scripts/gpu_logits.py /tmp/standin/*.gguf               # on the GPU machine (gpu_check.sh)
    TRITON_INTERPRET=1 python3 scripts/gpu_logits.py --device triton tiny.gguf   # a rehearsal on CPU

Weights: random-byte stand-ins (scripts/gpu_standin.py), never zeros. Each model runs, on both
backends, the same three steps through `Model.forward` + `Model.compute_logits` with hand-built
paged-attention metadata (no engine, no graphs, so nothing here depends on the runner):
  1. prefill: 8 sequences of 3..31 tokens in one flat batch (the tiled matmul path),
  2. decode:  one token for each of the 8 (M = 8),
  3. decode:  one more token for sequence 0 alone (M = 1).
For each step it prints ||gpu - ref|| / ||ref|| over the logits (fp32 reference: dense dequantized
weights, fp32 activations), the largest |difference| of log-softmax over the reference's top-5
tokens, and top-1 agreement (reported, not asserted: random weights have near-ties).
Pass: relative error <= --tol (default 0.05: bf16 activations, 2^-8 per rounding, through up to
30 layers) and no NaN/inf. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BS = 16


def load(path: Path, device: str):
    """(model, config) on `device`: "cuda"/"triton" (Triton ops) or "torch" (dense fp32 reference)."""
    from engine.config import ModelConfig
    from engine.loading.gguf import GGUFFile
    from engine.model import Model
    from kernels import backend

    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g.metadata, set(g.tensors))
    ops = backend(device, cpu_weights="exact")
    return Model.from_gguf(g, cfg, ops, max_positions=256), cfg


def steps(vocab: int) -> list[dict]:
    """Three steps of (sequence index, new token ids, start position); same for both backends."""
    gen = torch.Generator().manual_seed(1234)
    lens = [3 + 4 * i for i in range(8)]  # 3, 7, ..., 31: ragged against every tile
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
    nxt = torch.randint(0, vocab, (9,), generator=gen).tolist()
    return [
        {"name": "prefill 8 seqs", "rows": [(i, p, 0) for i, p in enumerate(prompts)]},
        {"name": "decode M=8", "rows": [(i, [nxt[i]], lens[i]) for i in range(8)]},
        {"name": "decode M=1", "rows": [(0, [nxt[8]], lens[0] + 1)]},
    ]


def run_steps(model, cfg, device: torch.device) -> list[torch.Tensor]:
    """Logits (fp32, CPU) of every token of every step, in order."""
    from kernels import AttentionMetadata

    blocks_per_seq = 4  # 64 tokens per sequence at most
    kv = model.allocate_kv_cache(8 * blocks_per_seq, BS)
    for k, v in kv:  # never read before written; filled anyway so a stray read is a finite number
        k.zero_()
        v.zero_()
    tables = torch.arange(8 * blocks_per_seq, dtype=torch.int32).view(8, blocks_per_seq).flip(1).contiguous()
    out = []
    for st in steps(cfg.vocab_size):
        ids, pos, slots, seq_lens, cu, rows = [], [], [], [], [0], []
        for seq, toks, start in st["rows"]:
            ids += toks
            pos += range(start, start + len(toks))
            slots += [int(tables[seq, p // BS]) * BS + p % BS for p in range(start, start + len(toks))]
            seq_lens.append(start + len(toks))
            cu.append(cu[-1] + len(toks))
            rows.append(seq)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=tables[rows].to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_seqlen_q=max(cu[i + 1] - cu[i] for i in range(len(rows))), max_seqlen_k=max(seq_lens),
            block_size=BS)
        with torch.inference_mode():
            h = model.forward(torch.tensor(ids, device=device), torch.tensor(pos, device=device), meta, kv)
            out.append(model.compute_logits(h).float().cpu())
    return out


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, str]:
    finite = bool(torch.isfinite(got).all())
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    lg, lr = torch.log_softmax(got, -1), torch.log_softmax(ref, -1)
    top = lr.topk(5, dim=-1).indices
    dlp = (lg.gather(1, top) - lr.gather(1, top)).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = finite and rel <= tol
    return ok, (f"{'ok  ' if ok else 'FAIL'} {name:15} rows {ref.shape[0]:3}  rel err {rel:.2e} (tol {tol:g})  "
                f"max |dlogprob| top-5 {dlp:.3f}  top-1 agree {agree:.0%}  |ref| rms {ref.pow(2).mean().sqrt():.2f}"
                + ("" if finite else "  NaN/inf in the GPU logits"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="GGUF files (stand-ins)")
    ap.add_argument("--device", default="cuda", help="cuda, or triton (the interpreter on CPU)")
    ap.add_argument("--tol", type=float, default=0.05, help="max ||gpu - ref|| / ||ref|| of the logits")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for the reference (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_logits: no CUDA device")
        return 1
    failed = 0
    for path in map(Path, args.models):
        t0 = time.perf_counter()
        model, cfg = load(path, args.device)
        dev = model.ops.device
        got = run_steps(model, cfg, dev)
        del model
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        t1 = time.perf_counter()
        ref_model, _ = load(path, "torch")
        ref = run_steps(ref_model, cfg, torch.device("cpu"))
        del ref_model
        print(f"== {path.name} ({cfg.arch}, {cfg.n_layers} layers, vocab {cfg.vocab_size}): "
              f"{args.device} {t1 - t0:.1f} s, reference {time.perf_counter() - t1:.1f} s", flush=True)
        for st, g, r in zip(steps(cfg.vocab_size), got, ref, strict=True):
            ok, line = compare(st["name"], g, r, args.tol)
            failed += not ok
            print("  " + line, flush=True)
    print(f"gpu_logits: {'FAILED ' + str(failed) + ' step(s)' if failed else 'all steps within tolerance'} "
          f"(pid {os.getpid()})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
