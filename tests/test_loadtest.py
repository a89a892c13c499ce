"""llamatron_tools/loadtest.py (`llamatron loadtest`, scripts/loadtest.py): pure statistics, the SSE
client against a scripted endpoint, and a real run.

The scripted endpoint (a few lines of Starlette below) lets the client's parsing and accounting be
checked against exact, known streams (multi-token chunks, error events, HTTP errors). The last test
drives a real llamatron server (tests/server_fixture.py) and checks that the tokens the load
generator counted equal the usage the server reported.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server_fixture import api_server  # noqa: E402,F401  (module-scoped real llamatron server)

from llamatron_tools import loadtest  # noqa: E402
from llamatron_tools import loadtest_stats as st  # noqa: E402
from llamatron_tools.loadtest_stats import RequestRecord  # noqa: E402

# ---------------------------------------------------------------- pure statistics


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    assert st.percentile(xs, 50) == statistics.median(xs)
    # statistics.quantiles(method="inclusive") is the same linear interpolation
    q = statistics.quantiles(xs, n=100, method="inclusive")
    assert st.percentile(xs, 90) == pytest.approx(q[89])
    assert st.percentile(xs, 99) == pytest.approx(q[98])
    assert st.percentile([7.0], 99) == 7.0
    assert math.isnan(st.percentile([], 50))


def _rec(start, ttft, gaps, usage=None, ok=True, prompt=10):
    times = [start + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord(ok=ok, start=start, end=times[-1], ttft=ttft, chunk_times=times, chunks=len(times),
                         prompt_tokens=prompt if usage is not None else None, completion_tokens=usage,
                         finish_reason="length")


def test_summarize_itl_tpot_throughput():
    a = _rec(0.0, 0.5, [0.1, 0.1, 0.1], usage=4)  # 4 chunks, 4 tokens, ends at 0.8
    b = _rec(0.2, 0.3, [0.2], usage=4)  # 2 chunks carrying 4 tokens (two tokens per chunk), ends at 0.7
    bad = RequestRecord(ok=False, start=0.1, end=1.0, error="HTTP 500: boom")
    s = st.summarize([a, b, bad], "c=2")
    assert (s["ok"], s["failed"], s["cancelled"]) == (2, 1, 0)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["duration_s"] == pytest.approx(1.0)
    assert s["tokens"] == {"prompt": 20, "completion_usage": 8, "completion_chunks": 6, "completion": 8}
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(8.0)
    assert s["throughput"]["total_tokens_per_s"] == pytest.approx(28.0)
    assert s["itl_ms"]["n"] == 4 and s["itl_ms"]["p50"] == pytest.approx(100.0)
    # TPOT from usage: a = (0.8-0.5)/3, b = (0.5-0.3)/3
    assert s["tpot_ms"]["mean"] == pytest.approx(1e3 * (0.1 + 0.2 / 3) / 2)
    assert s["ttft_ms"]["p50"] == pytest.approx(400.0)


def test_summarize_without_usage_counts_chunks():
    s = st.summarize([_rec(0.0, 0.1, [0.1, 0.1])], "c=1")
    assert s["usage_reported"] == 0 and s["tokens"]["completion"] == 3


def test_tables_and_compare():
    p = st.summarize([_rec(0.0, 0.5, [0.1, 0.1], usage=3)], "c=1")
    q = st.summarize([_rec(0.0, 0.25, [0.05, 0.05], usage=3)], "c=1")
    text = st.tables([p])
    lines = text.splitlines()
    assert lines[0].startswith("point") and "out tok/s" in lines[0] and lines[2].startswith("c=1")
    assert "TTFT p99" in text
    out = st.compare({"meta": {"name": "slow"}, "points": [p]}, {"meta": {"name": "fast"}, "points": [q]})
    row = next(line for line in out.splitlines() if "output tok/s" in line)
    assert "2.00x" in row and row.rstrip().endswith("B")  # twice the throughput, B better
    row = next(line for line in out.splitlines() if "TTFT p50" in line)
    assert "0.50x" in row and row.rstrip().endswith("B")  # half the latency, B better
    assert st.compare({"points": [p]}, {"points": []}) == "no point labels in common"


def test_compare_from_json_files(tmp_path, capsys):
    slow = st.summarize([_rec(0.0, 0.5, [0.1, 0.1], usage=3)], "c=1")
    fast = st.summarize([_rec(0.0, 0.25, [0.05, 0.05], usage=3)], "c=1")
    empty = st.summarize([], "c=4")  # every percentile NaN: must survive the JSON round trip as null
    for name, pts in (("a", [slow, empty]), ("b", [fast, empty])):
        text = json.dumps(loadtest._json_safe({"meta": {"name": name}, "points": pts}), allow_nan=False)
        (tmp_path / f"{name}.json").write_text(text)
    assert loadtest.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "A = a" in out and "B = b" in out
    assert any("c=1" in line and "TTFT p50" in line and "0.50x" in line for line in out.splitlines())
    assert any("c=4" in line and "TTFT p50" in line and line.split()[4:] == ["-"] * 3 for line in out.splitlines())


def test_url_guard_and_inputs(tmp_path):
    assert loadtest.is_loopback_url("http://127.0.0.1:8080")
    assert loadtest.is_loopback_url("http://localhost:1/v1")
    assert loadtest.is_loopback_url("http://[::1]:80")
    assert not loadtest.is_loopback_url("http://10.0.0.1:8080")
    assert not loadtest.is_loopback_url("http://example.com")
    assert loadtest.main(["--base-url", "http://192.168.1.5:8000", "--num-requests", "1"]) == 2
    assert loadtest.api_root("http://h:1/") == "http://h:1/v1" and loadtest.api_root("http://h:1/v1") == "http://h:1/v1"
    for bad in (["--rate", "0"], ["--concurrency", "0,4"], ["--rate", "x"], ["--max-tokens", "0"]):
        assert loadtest.main(["--num-requests", "1", *bad]) == 2
    a = loadtest.synthetic_prompts(3, 20, seed=1)
    assert a == loadtest.synthetic_prompts(3, 20, seed=1) and len(a[0].split()) == 20 and a[0] != a[1]
    f = tmp_path / "p.jsonl"
    f.write_text('"plain"\n{"prompt": "p"}\n\n{"messages": [{"role": "user", "content": "m"}]}\n')
    assert loadtest.load_prompts_file(str(f)) == ["plain", "p", [{"role": "user", "content": "m"}]]


def test_importable_by_path_for_the_cli():
    """scripts/loadtest.py, the thin entry point, still runs when loaded by path (as `python scripts/loadtest.py`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("loadtest_by_path", ROOT / "scripts" / "loadtest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:  # argparse's --help exits 0
        mod.main(["--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------- scripted SSE endpoint


def _scripted_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def complete(request: Request):
        body = await request.json()
        if "ignore_eos" in body:  # a strict server: the client must drop the field and carry on
            return JSONResponse({"error": {"message": "unknown field ignore_eos"}}, status_code=400)
        text = body["messages"][0]["content"] if "messages" in body else body["prompt"]
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
        n = body["max_tokens"]
        chat = "messages" in body

        async def events():
            if chat:
                yield 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
            sent = 0
            while sent < n:  # every third chunk carries two tokens, like a merged UTF-8 sequence
                k = 2 if sent % 3 == 2 and sent + 2 <= n else 1
                piece = "ab"[:k]
                payload = {"delta": {"content": piece}} if chat else {"text": piece}
                yield f"data: {json.dumps({'choices': [{'index': 0, **payload}]})}\n\n"
                sent += k
                await asyncio.sleep(0.002)
            if "ERREVENT" in text:
                yield 'data: {"error": {"message": "mid-stream failure"}}\n\n'
                return
            last = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
            yield f"data: {json.dumps({'choices': [last]})}\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": len(text.split()), "completion_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", complete, methods=["POST"]),
                             Route("/v1/completions", complete, methods=["POST"])])


@pytest.fixture(scope="module")
def scripted_url():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_scripted_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "scripted server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


BASE = ["--num-requests", "6", "--max-tokens", "7", "--input-len", "5", "--warmup", "1", "--no-progress"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_scripted_sweep_counts(scripted_url, tmp_path, endpoint, capsys):
    out = tmp_path / "r.json"
    rc = loadtest.main(["--base-url", scripted_url, "--endpoint", endpoint, "--concurrency", "1,3",
                        "--ignore-eos", "--json", str(out), *BASE])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["meta"]["model"] == "scripted" and res["meta"]["ignore_eos_sent"] is False
    assert [p["label"] for p in res["points"]] == ["c=1", "c=3"]
    for p in res["points"]:
        assert (p["ok"], p["failed"]) == (6, 0)
        assert p["tokens"]["completion_usage"] == 6 * 7 == p["tokens"]["completion"]
        assert p["tokens"]["completion_chunks"] == 6 * 5  # 7 tokens arrive in 5 chunks (1,1,2,1,2)
        assert p["tokens"]["prompt"] == 6 * 5 and p["finish_length"] == 6
        assert p["itl_ms"]["n"] == 6 * 4 and p["ttft_ms"]["p50"] > 0
    assert "refused ignore_eos" in capsys.readouterr().err


def test_scripted_failures_and_rate(scripted_url, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in ["good one", "FAIL now", "ERREVENT here", "fine"]))
    out = tmp_path / "r.json"
    rc = loadtest.main(["--base-url", scripted_url, "--rate", "50", "--prompts-file", str(prompts),
                        "--save-requests", "--json", str(out), *BASE[:2], "--max-tokens", "4", "--warmup", "0",
                        "--no-progress", "--seed", "3"])
    assert rc == 1  # failures make the exit status non-zero
    p = json.loads(out.read_text())["points"][0]
    assert (p["ok"], p["failed"]) == (3, 3)  # the file cycles: good FAIL ERREVENT fine good FAIL
    assert any(k.startswith("HTTP 500") for k in p["errors"]) and any("mid-stream" in k for k in p["errors"])
    assert len(p["records"]) == 6 and p["rate"] == 50.0


def test_scripted_time_limit_cancels(scripted_url, tmp_path):
    out = tmp_path / "r.json"
    rc = loadtest.main(["--base-url", scripted_url, "--concurrency", "2", "--num-requests", "50",
                        "--max-tokens", "400", "--max-duration", "0.3", "--drain-timeout", "0.2",
                        "--warmup", "0", "--no-progress", "--json", str(out)])
    p = json.loads(out.read_text())["points"][0]
    # each worker's first request needs >= 0.8 s of stream: both are cut at 0.3 + 0.2 s
    assert (p["requests"], p["cancelled"], p["ok"], p["failed"]) == (2, 2, 0, 0)
    assert p["duration_s"] < 3.0 and rc == 1  # a point with nothing ok is a failed run


# ---------------------------------------------------------------- a real llamatron server


def test_against_llamatron_usage_matches(api_server, tmp_path):  # noqa: F811
    out = tmp_path / "r.json"
    rc = loadtest.main(["--base-url", api_server.base_url, "--concurrency", "1,3", "--num-requests", "3",
                        "--max-tokens", "8", "--input-len", "16", "--ignore-eos", "--warmup", "1",
                        "--no-progress", "--save-requests", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["meta"]["model"] == "smollm2"
    assert res["meta"]["ignore_eos_sent"] and res["meta"]["usage_requested"]
    for p in res["points"]:
        assert (p["ok"], p["failed"]) == (3, 0) and p["usage_reported"] == 3
        # ignore_eos: every request runs to max_tokens, and the usage says so
        assert p["tokens"]["completion_usage"] == 3 * 8 and p["finish_length"] == 3
        # one SSE chunk per token, except where a multi-byte character spans tokens (merged chunks)
        assert 0.75 * 24 <= p["tokens"]["completion_chunks"] <= 24
        for r in p["records"]:
            assert r["prompt_tokens"] >= 16 and r["completion_tokens"] == 8 and r["finish_reason"] == "length"
        assert p["throughput"]["output_tokens_per_s"] > 0 and p["tpot_ms"]["p50"] > 0
    assert api_server.wait_idle().num_running == 0
