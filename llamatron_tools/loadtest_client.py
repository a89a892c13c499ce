"""The HTTP side of llamatron_tools/loadtest.py: one streamed request, the preflight, and the two drivers.

SSE is parsed here from raw lines (events end at a blank line; `data:` lines join with newlines;
`[DONE]` ends the stream) so the timing of every chunk is ours, not a client library's.
A request is ok when the stream ends with [DONE] or a finish_reason and carried no error event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .loadtest_stats import RequestRecord

try:
    from tqdm import tqdm
except ImportError:  # the bar is a convenience, not a dependency
    tqdm = None


@dataclass
class Target:
    api_root: str  # .../v1
    endpoint: str  # "chat" | "completions"
    api_key: str | None
    timeout: float
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # body fields the preflight found accepted

    @property
    def url(self) -> str:
        return self.api_root + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, prompt: Any, max_tokens: int, temperature: float) -> dict[str, Any]:
        b: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature,
                             "stream": True, **self.extra}
        if self.endpoint == "chat":
            b["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt if isinstance(prompt, str) else "\n".join(m.get("content", "") for m in prompt)
        return b


def _chunk_text(obj: dict[str, Any]) -> tuple[bool, str | None]:
    """(carries generated text, finish_reason) of one chunk's first choice."""
    choices = obj.get("choices") or []
    if not choices:
        return False, None
    c = choices[0]
    delta = c.get("delta") or {}
    has = bool(c.get("text") or delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))
    return has, c.get("finish_reason")


def _handle_event(data: str, rec: RequestRecord) -> bool:
    """Apply one SSE event to the record; True when the stream is over."""
    if data.strip() == "[DONE]":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        rec.error = f"bad SSE data: {data[:120]!r}"
        return True
    if obj.get("error"):
        err = obj["error"]
        rec.error = "error event: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
        return True
    now = time.perf_counter()
    has_text, finish = _chunk_text(obj)
    if has_text:
        if rec.ttft is None:
            rec.ttft = now - rec.start
        rec.chunks += 1
        rec.chunk_times.append(now)
    if finish:
        rec.finish_reason = finish
    usage = obj.get("usage")
    if isinstance(usage, dict):
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens")
    return False


async def one_request(client: httpx.AsyncClient, target: Target, body: dict[str, Any],
                      records: list[RequestRecord] | None = None) -> RequestRecord:
    rec = RequestRecord(ok=False, start=time.perf_counter(), end=0.0)
    done = False
    try:
        async with client.stream("POST", target.url, json=body, headers=target.headers()) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
            else:
                data: list[str] = []
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line.strip() and data:  # blank line: the event is complete
                        done = _handle_event("\n".join(data), rec)
                        data = []
                        if done:
                            break
                if data and not done:  # a last event without its blank line
                    done = _handle_event("\n".join(data), rec)
                rec.ok = rec.error is None and (done or rec.finish_reason is not None)
                if not rec.ok and rec.error is None:
                    rec.error = "stream ended without [DONE] or finish_reason"
    except asyncio.CancelledError:
        rec.cancelled, rec.error, rec.end = True, "cancelled at the time limit", time.perf_counter()
        if records is not None:
            records.append(rec)
        raise
    except (httpx.HTTPError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter()
    if records is not None:
        records.append(rec)
    return rec


def _client(target: Target, limit: int) -> httpx.AsyncClient:
    timeout = httpx.Timeout(target.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=max(limit, 1), max_keepalive_connections=max(limit, 1))
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def preflight(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Find the model, learn which optional body fields the server takes, warm it up."""
    meta: dict[str, Any] = {"base_url": args.base_url, "endpoint": args.endpoint, "max_tokens": args.max_tokens,
                            "input_len": None if args.prompts_file else args.input_len, "name": args.name}
    async with _client(target, 4) as client:
        if args.model is None:
            r = await client.get(target.api_root + "/models", headers=target.headers())
            if r.status_code != 200:
                raise RuntimeError(f"GET /v1/models: HTTP {r.status_code}; pass --model")
            models = r.json().get("data") or []
            if not models:
                raise RuntimeError("the server lists no models; pass --model")
            target.model = models[0]["id"]
        else:
            target.model = args.model
        meta["model"] = target.model
        wanted = {"stream_options": {"include_usage": True}}
        if args.ignore_eos:
            wanted["ignore_eos"] = True
        # Try with every extra, then drop them one by one: a strict server answers 400/422 to unknown fields.
        tries = [dict(wanted)] + ([{"stream_options": wanted["stream_options"]}] if args.ignore_eos else []) + [{}]
        last = None
        for extra in tries:
            target.extra = extra
            last = await one_request(client, target, target.body("Say hello.", 4, 0.0))
            if last.ok:
                break
            if not (last.error or "").startswith(("HTTP 400", "HTTP 422")):
                break
        if last is None or not last.ok:
            raise RuntimeError(f"preflight request failed: {last.error if last else '?'}")
        meta["ignore_eos_sent"] = "ignore_eos" in target.extra
        meta["usage_requested"] = "stream_options" in target.extra
        meta["usage_seen_in_preflight"] = last.completion_tokens is not None
        if args.ignore_eos and not meta["ignore_eos_sent"]:
            print("warning: the server refused ignore_eos; running without it", file=sys.stderr)
        for i in range(args.warmup):
            await one_request(client, target, target.body(f"Warm-up {i}: count to ten.", args.max_tokens,
                                                          args.temperature))
    return meta


def _bar(total: int, label: str, off: bool) -> Any:
    if tqdm is None or off:
        return None
    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)


async def _finish(tasks: list[asyncio.Task], limit_s: float) -> None:
    """Wait for the tasks up to limit_s, then cancel the rest (they record themselves as cancelled)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(limit_s, 0.0))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def run_concurrency(target: Target, prompts: list[Any], concurrency: int, args: argparse.Namespace,
                          label: str) -> list[RequestRecord]:
    """`concurrency` workers each send their next request as soon as the previous one ends."""
    records: list[RequestRecord] = []
    bar = _bar(len(prompts), label, args.no_progress)
    t0 = time.perf_counter()
    next_i = iter(range(len(prompts)))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_i:  # a shared iterator: each index is taken once
            if time.perf_counter() - t0 > args.max_duration:
                return
            await one_request(client, target, target.body(prompts[i], args.max_tokens, args.temperature), records)
            if bar is not None:
                bar.update(1)

    async with _client(target, concurrency) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        await _finish(tasks, args.max_duration + args.drain_timeout)
    if bar is not None:
        bar.close()
    return records


async def run_rate(target: Target, prompts: list[Any], rate: float, args: argparse.Namespace, label: str,
                   seed: int) -> list[RequestRecord]:
    """Poisson arrivals: exponential gaps of mean 1/rate; inf sends everything at once."""
    records: list[RequestRecord] = []
    rng = random.Random(seed)
    bar = _bar(len(prompts), label, args.no_progress)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency > 0 else None

    async def send(client: httpx.AsyncClient, prompt: Any) -> None:
        body = target.body(prompt, args.max_tokens, args.temperature)
        if sem is None:
            await one_request(client, target, body, records)
        else:
            async with sem:
                await one_request(client, target, body, records)
        if bar is not None:
            bar.update(1)

    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    at = 0.0
    async with _client(target, args.max_concurrency or len(prompts)) as client:
        for prompt in prompts:
            if at > args.max_duration:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, prompt)))
            at += rng.expovariate(rate) if math.isfinite(rate) and rate > 0 else 0.0
        await _finish(tasks, t0 + args.max_duration + args.drain_timeout - time.perf_counter())
    if bar is not None:
        bar.close()
    return records
