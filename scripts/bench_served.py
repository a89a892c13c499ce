"""llamatron serve vs llama-server, side by side on the same model file, prompts and cores.

    .venv/bin/python scripts/bench_served.py --llama-server ~/llama.cpp/build/bin/llama-server \\
        --model smollm2-135m-instruct --threads 1 --server-cpus 0 --client-cpus 1

Each server in turn is started pinned to --server-cpus with --threads threads and -np 8 slots,
loaded with scripts/loadtest.py pinned to --client-cpus (same seeded 200-word prompts, 64 output
tokens, ignore_eos) at each --concurrency, then stopped; its peak RSS (VmHWM) is read before it
exits. Printed: aggregate output tok/s, per-stream decode tok/s (1 / TPOT p50), TTFT p50 and the
ratios llamatron / llama-server. On a 2-core machine the client needs the other core: a busy
core slows llama.cpp ~100x, so compare only on a quiet machine, everything in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_engine import machine  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def run_one(name: str, cmd: list[str], port: int, args: argparse.Namespace, out_dir: Path) -> dict:
    base = f"http://127.0.0.1:{port}"
    log = open(out_dir / f"{name}.log", "w")
    proc = subprocess.Popen(["taskset", "-c", args.server_cpus, *cmd], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)
    try:
        wait_ready(base, proc)
        out = out_dir / f"{name}.json"
        lt = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--base-url", base, "--endpoint", "completions",
              "--input-len", str(args.input_len), "--max-tokens", str(args.max_tokens), "--ignore-eos",
              "--concurrency", args.concurrency, "--num-requests", str(args.num_requests), "--warmup", "2",
              "--seed", str(args.seed), "--name", name, "--json", str(out), "--no-progress"]
        subprocess.run(["taskset", "-c", args.client_cpus, *lt], check=False, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def per_stream(point: dict) -> float:
    tpot = point["tpot_ms"]["p50"]
    return 1000.0 / tpot if tpot == tpot and tpot > 0 else float("nan")


def report(a: dict, b: dict) -> str:
    rows = ["| concurrency | output tok/s llama-server | output tok/s llamatron | ratio | per-stream tok/s "
            "l-s / llamatron | ratio | TTFT p50 ms l-s / llamatron |", "|---|---|---|---|---|---|---|"]
    pb = {p["label"]: p for p in b["points"]}
    for p in a["points"]:
        q = pb[p["label"]]
        x, y = p["throughput"]["output_tokens_per_s"], q["throughput"]["output_tokens_per_s"]
        s, t = per_stream(p), per_stream(q)
        rows.append(f"| {p['concurrency']} | {x:.1f} | {y:.1f} | {y / x:.2f}x | {s:.1f} / {t:.1f} | {t / s:.2f}x | "
                    f"{p['ttft_ms']['p50']:.0f} / {q['ttft_ms']['p50']:.0f} |")
    rows.append(f"\npeak RSS: llama-server {a['peak_rss_mb']:.0f} MB, llamatron {b['peak_rss_mb']:.0f} MB")
    return "\n".join(rows)


def add_load_args(ap: argparse.ArgumentParser, concurrency: str) -> None:
    """The pinning and load flags `run_one` reads (shared with scripts/bench_router.py)."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument("--concurrency", default=concurrency)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", required=True, help="path to a llama-server binary built from source")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf path")
    add_load_args(ap, concurrency="1,4,8,16")
    ap.add_argument("--json", default=None, help="write both runs and the table here")
    args = ap.parse_args()

    from engine.loading.registry import resolve

    path = resolve(args.model)
    ctx = args.input_len * 2 + args.max_tokens + 64  # per sequence (words are ~1-2 tokens)
    print(f"machine: {machine()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"servers on cpus {args.server_cpus} with {args.threads} thread(s), client on {args.client_cpus}; "
          f"{args.parallel} slots; {args.num_requests} requests of ~{args.input_len} words, {args.max_tokens} "
          f"tokens, ignore_eos, per concurrency {args.concurrency}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ls = run_one("llama-server", [args.llama_server, "-m", str(path), "-t", str(args.threads), "-tb",
                                      str(args.threads), "-np", str(args.parallel), "-c", str(ctx * args.parallel),
                                      "--host", "127.0.0.1", "--port", "18081"], 18081, args, out)
        lt = run_one("llamatron", [sys.executable, "-m", "api.cli_serve", "-m", str(path), "--threads",
                                   str(args.threads), "-np", str(args.parallel), "-c", str(ctx), "--device", "cpu",
                                   "--port", "18082", "--log-level", "warning"], 18082, args, out)
    table = report(ls, lt)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"llama-server": ls, "llamatron": lt, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
