"""Per-step overhead of grammar-constrained decoding (engine/constrained/structured.py), in milliseconds.

Replays realistic outputs (JSON objects that satisfy a schema, tokenized by the model's tokenizer)
through GrammarStates: each step computes the allowed-token masks of every constrained row, applies
them to a [B, V] logits tensor, and accepts the replayed token. Batch 1 uses the sampler's per-row
seam (`state.fill_mask(row)`); batch 32 is measured both per row and with the batched
`fill_masks` (parallel mask computation in llguidance's thread pool, one apply).

    .venv/bin/python scripts/bench_structured.py [--model smollm2-135m-instruct] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.constrained import structured as S  # noqa: E402
from engine.constrained.grammar_mask import fill_masks  # noqa: E402
from engine.loading.registry import resolve  # noqa: E402
from engine.text.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"}, "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "active", "address", "tags", "score"],
    "additionalProperties": False,
}
FIRST = ["Alice", "Bob", "Chen", "Dmitri", "Eva", "Farah", "Gustavo", "Hana"]
LAST = ["Smith", "Okafor", "Nakamura", "Ivanova", "Lefebvre", "Haddad", "Silva", "Kowalski"]
CITIES = ["Paris", "Lagos", "Osaka", "San Francisco", "Berlin", "São Paulo", "Toronto", "Kraków"]
WORDS = ["engineer", "remote", "vip", "new customer", "beta tester", "newsletter", "priority", "mentor"]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        doc = {"name": f"{first} {last}", "age": rng.randint(18, 90),
               "email": f"{first.lower()}.{last.lower()}@example.com", "active": rng.random() < 0.5,
               "address": {"street": f"{rng.randint(1, 999)} {rng.choice(LAST)} Street", "city": rng.choice(CITIES),
                           "zip": f"{rng.randint(0, 99999):05d}"},
               "tags": rng.sample(WORDS, rng.randint(0, 4)), "score": round(rng.uniform(0, 100), 2)}
        docs.append(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return docs


def run(tok: Tokenizer, compiled: S.CompiledGrammar, docs: list[str], batch: int, device: str,
        batched: bool) -> list[float]:
    """Milliseconds per step (mask + apply + accept for all rows) over one replay of `batch` docs."""
    streams = [tok.encode(docs[i % len(docs)], add_special=False) for i in range(batch)]
    states = [compiled.new_state() for _ in range(batch)]
    steps = min(len(s) for s in streams)
    logits = torch.zeros(batch, tok.vocab_size, device=device)
    times = []
    for k in range(steps):
        logits.normal_()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if batched:
            errors = fill_masks(logits, list(enumerate(states)))
            assert not any(errors), errors
        else:
            for i, st in enumerate(states):
                st.fill_mask(logits[i])
        for st, s in zip(states, streams):
            st.accept(s[k])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> str:
    q = sorted(times)
    p99 = q[min(len(q) - 1, int(0.99 * len(q)))]
    return f"mean {statistics.fmean(q):.3f}  p50 {q[len(q) // 2]:.3f}  p99 {p99:.3f}  (n={len(q)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(resolve(args.model))
    t1 = time.perf_counter()
    so = S.StructuredOutputs(tok, background=False)
    t2 = time.perf_counter()
    spec = S.json_schema(SCHEMA)
    compiled = so.compile(spec)
    t3 = time.perf_counter()
    print(f"model {args.model}: vocab {tok.vocab_size}, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"tokenizer {t1 - t0:.2f} s; llguidance tokenizer {t2 - t1:.2f} s; schema compile {1e3 * (t3 - t2):.2f} ms")
    docs = documents(64)
    print(f"stream: {len(tok.encode(docs[0], add_special=False))} tokens per document, e.g. {docs[0][:80]}...")
    print("cold (first request on a new grammar):", summary(run(tok, compiled, docs, 1, args.device, False)))
    for b in [int(x) for x in args.batches.split(",")]:
        run(tok, compiled, docs[1:], b, args.device, b > 1)  # warm the lexer caches
        print(f"batch {b:>2} per-row fill_mask : {summary(run(tok, compiled, docs, b, args.device, False))}")
        if b > 1:
            print(f"batch {b:>2} batched fill_masks: {summary(run(tok, compiled, docs, b, args.device, True))}")


if __name__ == "__main__":
    main()
