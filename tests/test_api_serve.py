"""`python -m api.cli_serve` as a real process: start-up line, SIGTERM drains in-flight requests
within the grace period, refuses new ones, and the process exits 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent


def _reader(stream, q: queue.Queue) -> None:  # noqa: ANN001
    for line in iter(stream.readline, ""):
        q.put(line)


def test_serve_process_graceful_sigterm(smollm2_path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "api.cli_serve", "-m", str(smollm2_path), "--port", str(port), "-a", "smollm2",
           "--device", "cpu", "-c", "512", "-np", "2", "--kv-cache-gib", "0.05", "--grace-period", "60"]
    env = {**os.environ, "LLAMATRON_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        banner, deadline = "", time.monotonic() + 180
        while "listening on" not in banner:
            try:
                banner = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                pytest.fail("server printed no start-up line")
        assert "smollm2" in banner and "cpu" in banner and "KV cache" in banner
        assert f"http://127.0.0.1:{port}" in banner
        base = f"http://127.0.0.1:{port}"
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_past_grace_aborts_streams_cleanly(smollm2_path) -> None:
    """Streams that cannot finish within the grace period end with a final error event (never a cut
    connection), and the process exits 0 soon after the grace period."""
    port, grace = free_port(), 2
    cmd = [sys.executable, "-m", "api.cli_serve", "-m", str(smollm2_path), "--port", str(port), "-a", "smollm2",
           "--device", "cpu", "-c", "2048", "-np", "4", "--kv-cache-gib", "0.1", "--grace-period", str(grace)]
    env = {**os.environ, "LLAMATRON_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while "listening on" not in lines.get(timeout=max(deadline - time.monotonic(), 0.1)):
            pass
        base = f"http://127.0.0.1:{port}"
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
