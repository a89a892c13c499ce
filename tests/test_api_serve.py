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
