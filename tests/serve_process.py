"""`python -m api.cli_serve` as a real child process, for tests that need a server of its own:
signals, timing measured from outside (no GIL shared with the test), start-up flags."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    base_url: str
    port: int
    banner: str
    lines: queue.Queue  # everything else the process prints, line by line

    def output(self) -> str:
        out = []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return "".join(out)


def _reader(stream, q: queue.Queue) -> None:  # noqa: ANN001
    for line in iter(stream.readline, ""):
        q.put(line)


def spawn(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, queue.Queue]:
    """The process, and a queue of every line it prints (stdout and stderr)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    return proc, lines


def wait_banner(proc: subprocess.Popen, lines: queue.Queue, timeout: float) -> str:
    """The server's start-up line ("... listening on ..."); fails the test without one in time."""
    banner, deadline = "", time.monotonic() + timeout
    while "listening on" not in banner:
        try:
            banner = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            pytest.fail(f"server printed no start-up line (exit code {proc.poll()})")
    return banner


@contextmanager
def serve_process(model: Path, *flags: str, timeout: float = 180) -> Iterator[ServeProcess]:
    """Starts the server on a free port with `flags` (-a smollm2 --device cpu by default), waits
    for its start-up line, and kills it on exit if the test did not stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "api.cli_serve", "-m", str(model), "--port", str(port), "-a", "smollm2",
           "--device", "cpu", *flags]
    proc, lines = spawn(cmd, {**os.environ, "LLAMATRON_LOG_LEVEL": "warning"})
    try:
        banner = wait_banner(proc, lines, timeout)
        yield ServeProcess(proc, f"http://127.0.0.1:{port}", port, banner, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
