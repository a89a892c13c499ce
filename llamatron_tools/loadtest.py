"""Load generator for any OpenAI-compatible server (llamatron, llama-server, vLLM, ...).

    python scripts/loadtest.py --base-url http://127.0.0.1:8080 --concurrency 1,4,16 \
        --num-requests 32 --input-len 128 --max-tokens 64 --ignore-eos --json run.json
    python scripts/loadtest.py --rate 2,8 --num-requests 50 ...        # Poisson arrivals
    python scripts/loadtest.py --compare a.json b.json                  # side by side, B/A ratios

Streams every request (SSE parsed here, over httpx) and asks for usage in the last chunk
(`stream_options.include_usage`); output tokens come from that usage and are cross-checked against
the text-carrying chunks seen. Each point is bounded by --num-requests and --max-duration; only
loopback URLs are accepted unless --allow-remote. `main(argv)` is what `llamatron loadtest` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import loadtest_stats as stats
from .loadtest_client import Target, preflight, run_concurrency, run_rate

# Common English words; with BPE tokenizers " word" is nearly always one token, so N words ~ N tokens.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "good new first last long great little own other old big high different small large next early young "
    "important few public bad same able make go know take see come think look want give use find tell ask "
    "seem feel try leave call keep let begin show hear play run move live believe hold bring happen write "
    "provide sit stand lose pay meet include continue set learn lead understand watch follow stop create speak"
).split()


def synthetic_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


def load_prompts_file(path: str) -> list[Any]:
    """JSONL: each line a string, {"prompt": str}, {"text": str} or {"messages": [...]}."""
    out: list[Any] = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            out.append(item["messages"])
        elif isinstance(item, dict) and isinstance(item.get("prompt", item.get("text")), str):
            out.append(item.get("prompt", item.get("text")))
        else:
            raise ValueError(f"{path}:{i}: expected a string, prompt, text or messages")
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # other names are refused: resolving them is exactly what we must not trust


def api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def _json_safe(x: Any) -> Any:
    """NaN (a percentile of nothing) is not JSON: write null instead."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8080", help="server root or its /v1")
    p.add_argument("--api-key", default=os.environ.get("LLAMATRON_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default=None, help="model id (default: the first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in words (~tokens)")
    p.add_argument("--prompts-file", default=None, help="JSONL prompts instead of synthetic ones")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (dropped if the server refuses it)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", default=None, help="comma list of in-flight request counts (default 1,4,16)")
    mode.add_argument("--rate", default=None, help="comma list of Poisson arrival rates, requests/s")
    p.add_argument("--max-concurrency", type=int, default=0, help="cap on in-flight requests in --rate mode")
    p.add_argument("--num-requests", type=int, default=32, help="requests per point")
    p.add_argument("--max-duration", type=float, default=300.0, help="seconds per point before no new requests")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after that")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrivals depend only on this")
    p.add_argument("--name", default=None, help="label of this run in --compare (default: url + model)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--save-requests", action="store_true", help="include every request's record in --json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two runs side by side")
    return p


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(api_root(args.base_url), args.endpoint, args.api_key, args.request_timeout)
    pool = load_prompts_file(args.prompts_file) if args.prompts_file else []  # fail fast on a bad file
    meta = await preflight(target, args)  # resolves the model, probes extras, warms up
    points: list[dict[str, Any]] = []
    settings = [("rate", r) for r in parse_list(args.rate, float)] if args.rate else \
        [("concurrency", c) for c in parse_list(args.concurrency or "1,4,16", int)]
    for k, (kind, value) in enumerate(settings):
        n = args.num_requests
        if args.prompts_file:  # walk on through the file so no two points send the same prompts
            prompts = [pool[(k * n + i) % len(pool)] for i in range(n)]
        else:  # a fresh seed per point: repeated prompts would only measure the prefix cache
            prompts = synthetic_prompts(n, args.input_len, args.seed * 1000 + k)
        label = f"c={value}" if kind == "concurrency" else f"rate={value:g}"
        t0 = time.perf_counter()
        if kind == "concurrency":
            records = await run_concurrency(target, prompts, int(value), args, label)
        else:
            records = await run_rate(target, prompts, float(value), args, label, args.seed * 1000 + k)
        summary = stats.summarize(records, label, {kind: value, "wall_s": time.perf_counter() - t0})
        summary["finish_length"] = sum(r.finish_reason == "length" for r in records if r.ok)
        if args.save_requests:
            summary["records"] = [r.to_json() for r in records]
        points.append(summary)
        print(f"{label}: {summary['ok']} ok, {summary['failed']} failed, "
              f"{summary['throughput']['output_tokens_per_s']:.1f} output tok/s", file=sys.stderr)
    return {"meta": meta, "points": points}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        print(stats.compare(a, b))
        return 0
    if not is_loopback_url(args.base_url) and not args.allow_remote:
        print(f"refusing non-loopback URL {args.base_url} (pass --allow-remote to load-test another host)",
              file=sys.stderr)
        return 2
    try:
        bad_setting = args.num_requests < 1 or args.max_tokens < 1 or \
            (args.rate and min(parse_list(args.rate, float)) <= 0) or \
            (args.concurrency and min(parse_list(args.concurrency, int)) < 1)
    except ValueError:
        bad_setting = True
    if bad_setting:
        print("--num-requests, --max-tokens, --rate and --concurrency take positive numbers", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_run(args))
    except (RuntimeError, OSError, ValueError, httpx.HTTPError) as e:  # no server there, or it refused us
        print(f"loadtest: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    result["meta"].update({"argv": sys.argv[1:] if argv is None else list(argv), "host": platform.node(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    result["meta"].setdefault("name", args.name or f"{args.base_url} {result['meta'].get('model')}")
    print(stats.tables(result["points"]))
    if args.ignore_eos and result["meta"].get("ignore_eos_sent"):
        short = sum(p["ok"] - p["finish_length"] for p in result["points"])
        if short:
            print(f"note: {short} requests stopped before max_tokens although ignore_eos was sent", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_json_safe(result), indent=1, default=str) + "\n")
    bad = any(p["failed"] or not p["ok"] for p in result["points"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
