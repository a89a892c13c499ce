"""`python -m api.cli_serve` as a real process: start-up line, SIGTERM drains in-flight requests
within the grace period, refuses new ones, and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_process import ROOT, serve_process


def test_serve_process_graceful_sigterm(smollm2_path) -> None:
    with serve_process(smollm2_path, "-c", "512", "-np", "2", "--kv-cache-gib", "0.05",
                       "--grace-period", "60") as sp:
        proc, base, banner = sp.proc, sp.base_url, sp.banner
        assert "smollm2" in banner and "cpu" in banner and "KV cache" in banner
        assert f"http://127.0.0.1:{sp.port}" in banner
        assert httpx.get(base + "/health").json() == {"status": "ok"}

        body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 6,
                "ignore_eos": True, "temperature": 0, "stream": True}
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(120)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # not admitting: the listening socket is closed
            httpx.get(base + "/health", timeout=5)
        t.join(120)
        assert proc.wait(60) == 0
        assert events[-1] == "[DONE]"
        finish = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finish == ["length"]  # the in-flight request ran to its end


def test_sigterm_past_grace_aborts_streams_cleanly(smollm2_path) -> None:
    """Streams that cannot finish within the grace period end with a final error event (never a cut
    connection), and the process exits 0 soon after the grace period."""
    grace = 2
    with serve_process(smollm2_path, "-c", "2048", "-np", "4", "--kv-cache-gib", "0.1",
                       "--grace-period", str(grace)) as sp:
        proc, base = sp.proc, sp.base_url
        results: list[tuple[str, list[str]]] = []
        started = threading.Semaphore(0)

        def stream(content: str) -> None:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1000,
                    "ignore_eos": True, "temperature": 0, "stream": True}
            events: list[str] = []
            try:
                with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
                    started.release()
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                results.append(("ok", events))
            except httpx.HTTPError as e:
                results.append((f"transport error: {e!r}", events))

        threads = [threading.Thread(target=stream, args=(f"Story number {i}. " * (1 + 40 * i),)) for i in range(4)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < grace + 15
        assert len(results) == 4
        for status, events in results:
            assert status == "ok", status
            last = [json.loads(e) for e in events if e != "[DONE]"][-1]
            ended = "error" in last or any(c.get("finish_reason") for c in last.get("choices", []))
            assert ended, f"stream ended without a finish_reason or error event: {events[-3:]}"


def test_sigterm_during_long_prefills_exits_cleanly(smollm2_path) -> None:
    """4 prompts of ~2,800 tokens, SIGTERM while they prefill: the step in flight is interrupted at a
    layer boundary after the grace period, every request ends (503, or a stream's final event), no
    500, and the process exits 0 within the grace period plus about one step."""
    grace = 3
    with serve_process(smollm2_path, "-c", "4096", "-np", "4", "--kv-cache-gib", "0.6",
                       "--grace-period", str(grace)) as sp:
        results: list[tuple[int, list[dict]]] = []

        def request(i: int, stream: bool) -> None:
            body = {"prompt": f"Document {i}:" + " word" * 2800, "max_tokens": 64, "ignore_eos": True,
                    "temperature": 0, "stream": stream}
            events: list[dict] = []
            with httpx.Client(timeout=120) as c:
                with c.stream("POST", sp.base_url + "/v1/completions", json=body) as r:
                    raw = r.read().decode()
            if stream and r.status_code == 200:
                events = [json.loads(ln[6:]) for ln in raw.splitlines() if ln.startswith("data: {")]
            else:
                events = [json.loads(raw)]
            results.append((r.status_code, events))

        threads = [threading.Thread(target=request, args=(i, i % 2 == 0)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(s["is_processing"] for s in httpx.get(sp.base_url + "/slots").json()) < 4:
            assert time.monotonic() < deadline, "the 4 requests never reached the engine"
            time.sleep(0.1)
        time.sleep(3)
        t0 = time.monotonic()
        sp.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        rc = sp.proc.wait(60)
        took = time.monotonic() - t0
        out = sp.output()
        assert rc == 0, out
        assert took < grace + 10, took
        assert "terminate called" not in out and "Traceback" not in out, out
        assert len(results) == 4
        for status, events in results:
            assert status in (200, 503), (status, events)
            last = events[-1]
            if status == 503:
                assert last["error"]["code"] in ("aborted", "shutting_down"), last
            else:
                ended = "error" in last or any(c.get("finish_reason") for c in last.get("choices", []))
                assert ended, events[-3:]


def test_busy_port_fails_fast_before_loading(smollm2_path) -> None:
    """A port in use: non-zero exit in under 2 s with a message naming the port, before the model
    is read (it used to load the whole model, then exit 3 or abort)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "api.cli_serve", str(smollm2_path), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 2.0, (r.returncode, elapsed, r.stderr)
    assert f"port {port} is already in use" in r.stderr
    assert "loaded" not in r.stderr + r.stdout  # the loader logs "loaded <file> ... in N s"
