"""The many-model router as a real process (`python -m api.cli_serve --models-dir ...`), with its
worker processes, for the router's API tests.

The router sees only the folder it is given: its registry is an empty one in a private config
folder (the pulled models in ~/.cache/llamatron would otherwise join the catalogue).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serve_process import spawn, wait_banner
from server_fixture import free_port

ROOT = Path(__file__).resolve().parent.parent
# the settings of tests/server_fixture.py's single-model servers, so answers compare token for token
SAME_AS_SINGLE = ("--device", "cpu", "-t", "1", "-c", "2048", "-np", "8", "--max-batched-tokens", "512",
                  "--kv-cache-gib", "0.25", "--grace-period", "2")


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    base_url: str
    lines: queue.Queue

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 120), **kw)

    def models(self, **headers: str) -> dict[str, dict]:
        r = httpx.get(self.base_url + "/v1/models", headers=headers, timeout=30)
        r.raise_for_status()
        return {m["id"]: m for m in r.json()["data"]}

    def status(self, model: str, **headers: str) -> str:
        return self.models(**headers)[model]["status"]["value"]

    def wait_status(self, model: str, want: str, timeout: float = 120, **headers: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            card = self.models(**headers)[model]
            if card["status"]["value"] == want:
                return card
            time.sleep(0.1)
        raise AssertionError(f"{model} did not become {want} in {timeout} s: {self.models(**headers)[model]}")

    def tree_rss(self) -> int:
        """Resident bytes of the router and every process under it."""
        return sum(_rss(pid) for pid in [self.proc.pid, *descendants(self.proc.pid)])

    def output(self) -> str:
        out = []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return "".join(out)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def empty_registry_config() -> Path:
    """A config folder with the real server defaults and a registry without models."""
    d = Path(tempfile.mkdtemp(prefix="llamatron-cfg-"))
    shutil.copy(ROOT / "configs" / "server.toml", d / "server.toml")
    (d / "models.toml").write_text('default = ""\n')
    return d


@contextmanager
def router_process(models_dir: Path | None, *flags: str, timeout: float = 120) -> Iterator[RouterProcess]:
    port = free_port()
    cmd = [sys.executable, "-m", "api.cli_serve", "--port", str(port), *SAME_AS_SINGLE, *flags]
    if models_dir is not None:
        cmd += ["--models-dir", str(models_dir)]
    cfg = empty_registry_config()
    env = {**os.environ, "LLAMATRON_CONFIG_DIR": str(cfg), "LLAMATRON_LOG_LEVEL": "warning"}
    proc, lines = spawn(cmd, env)
    try:
        wait_banner(proc, lines, timeout)
        yield RouterProcess(proc, f"http://127.0.0.1:{port}", lines)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the router stops its workers
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(cfg, ignore_errors=True)


def model_folder(path: Path, models: dict[str, Path], broken: bool = False) -> Path:
    """A --models-dir of symlinks to the real files (`name.gguf`, or `name/` for a folder), and a truncated copy of the
    first model named `broken.gguf` when asked (its header reads, its weights are cut short)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, src in models.items():  # a Hugging Face folder joins as a subfolder of its own
        (path / (name if src.is_dir() else f"{name}.gguf")).symlink_to(src)
    if broken:
        with open(next(p for p in models.values() if p.is_file()), "rb") as f:
            (path / "broken.gguf").write_bytes(f.read(4 << 20))
    return path
