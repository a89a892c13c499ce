"""Concurrency and disconnects against a real server: dropped streams free their requests and KV
blocks; 32 concurrent streaming clients all finish and /metrics adds up to what was served."""

from __future__ import annotations

import asyncio
import json

import httpx

from server_fixture import api_server, metric, settle  # noqa: F401  (module-scoped server)

LONG = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 400,
        "ignore_eos": True, "temperature": 0.8, "stream": True}


def test_dropped_streams_free_everything(api_server) -> None:  # noqa: F811
    srv = api_server
    total = srv.engine.stats().total_blocks

    async def drop_one(i: int) -> None:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
            body = {**LONG, "messages": [{"role": "user", "content": f"Story {i} about a dragon."}]}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        break  # got real text: hang up mid-generation

    async def main() -> None:
        await asyncio.gather(*(drop_one(i) for i in range(20)))

    asyncio.run(main())
    settle(srv)
    st = srv.engine.stats()
    assert st.num_running == 0 and st.num_waiting == 0, st
    assert st.free_blocks == total, st  # no block is held (cached prefixes are free, only evictable)
    assert not srv.ctx.active
    with srv.client() as c:
        assert not any(s["is_processing"] for s in c.get("/slots").json())
        text = c.get("/metrics").text
        assert metric(text, "llamatron:num_requests_running") == 0
        assert metric(text, "llamatron:kv_cache_usage_ratio") == 0
        assert metric(text, 'llamatron:requests_total{finish_reason="abort"}') == 20


def test_dropped_non_streaming_request_is_aborted(api_server) -> None:  # noqa: F811
    srv = api_server
    body = {**LONG, "stream": False}
    aborted = 'llamatron:requests_total{finish_reason="abort"}'
    with srv.client() as c:
        before = metric(c.get("/metrics").text, aborted)
    with srv.client(timeout=1.5) as c:
        try:
            c.post("/v1/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection
    settle(srv)
    st = srv.engine.stats()
    assert st.num_running == 0 and st.free_blocks == st.total_blocks, st
    with srv.client() as c:  # it was aborted, not run to its 400 tokens
        assert metric(c.get("/metrics").text, aborted) == before + 1


def test_32_concurrent_streams_and_metrics_add_up(api_server) -> None:  # noqa: F811
    srv = api_server
    settle(srv)
    with srv.client() as c:
        before = c.get("/metrics").text

    async def one(i: int) -> tuple[str, dict]:
        body = {"messages": [{"role": "user", "content": f"Say a word about the number {i}."}],
                "max_tokens": 4, "temperature": 0.7, "seed": i, "stream": True,
                "stream_options": {"include_usage": True}}
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=300) as c:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        return text, chunks[-1]["usage"]

    async def main() -> list[tuple[str, dict]]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(1 <= u["completion_tokens"] <= 4 for _, u in results)
    with srv.client() as c:
        after = c.get("/metrics").text

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert delta("llamatron:prompt_tokens_total") == sum(u["prompt_tokens"] for _, u in results)
    assert delta("llamatron:generation_tokens_total") == sum(u["completion_tokens"] for _, u in results)
    assert delta("llamatron:time_to_first_token_seconds_count") == 32
    assert delta("llamatron:e2e_request_latency_seconds_count") == 32
    finished = sum(delta(f'llamatron:requests_total{{finish_reason="{r}"}}') for r in ("stop", "length"))
    assert finished == 32
    gaps = sum(u["completion_tokens"] - 1 for _, u in results)
    assert delta("llamatron:inter_token_latency_seconds_count") == gaps
    assert delta("llamatron:engine_generation_tokens_total") == sum(u["completion_tokens"] for _, u in results)
