"""What the many-model router costs a request: `llamatron serve -m MODEL` against `llamatron serve
--models-dir DIR` holding the same model, side by side on the same prompts and cores.

    .venv/bin/python scripts/bench_router.py --model smollm2-135m-instruct --threads 1 \\
        --server-cpus 0 --client-cpus 1

Each server in turn runs pinned to --server-cpus (the router's worker inherits the pinning) with
--threads threads, loaded by scripts/loadtest.py pinned to --client-cpus (seeded prompts, ignore_eos,
two warm-up requests: the router's first one loads the model); then stopped. Printed per
concurrency: aggregate output tok/s, per-stream decode tok/s and TTFT p50 of both, and the ratio
router / direct (1.00x: the extra hop costs nothing measurable). Compare only on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_engine import machine  # noqa: E402
from scripts.bench_served import add_load_args, per_stream, run_one  # noqa: E402


def table(direct: dict, router: dict) -> str:
    rows = ["| concurrency | output tok/s direct | via router | ratio | per-stream tok/s direct / router | "
            "TTFT p50 ms direct / router |", "|---|---|---|---|---|---|"]
    by_label = {p["label"]: p for p in router["points"]}
    for p in direct["points"]:
        q = by_label[p["label"]]
        x, y = p["throughput"]["output_tokens_per_s"], q["throughput"]["output_tokens_per_s"]
        rows.append(f"| {p['concurrency']} | {x:.1f} | {y:.1f} | {y / x:.2f}x | {per_stream(p):.1f} / "
                    f"{per_stream(q):.1f} | {p['ttft_ms']['p50']:.0f} / {q['ttft_ms']['p50']:.0f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf path")
    add_load_args(ap, concurrency="1,8")
    args = ap.parse_args()

    from engine.loading.registry import resolve

    path = resolve(args.model)
    ctx = args.input_len * 2 + args.max_tokens + 64
    common = ["--threads", str(args.threads), "-np", str(args.parallel), "-c", str(ctx), "--device", "cpu",
              "--log-level", "warning"]
    print(f"machine: {machine()}")
    print(f"model:   {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"servers on cpus {args.server_cpus} with {args.threads} thread(s), client on {args.client_cpus}; "
          f"{args.num_requests} requests of ~{args.input_len} words, {args.max_tokens} tokens, per concurrency "
          f"{args.concurrency}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out, folder, cfg = Path(tmp), Path(tmp) / "models", Path(tmp) / "config"
        folder.mkdir()
        cfg.mkdir()
        (folder / path.name).symlink_to(path)
        shutil.copy(ROOT / "configs" / "server.toml", cfg / "server.toml")
        (cfg / "models.toml").write_text('default = ""\n')  # the router sees the folder's one model only
        direct = run_one("direct", [sys.executable, "-m", "api.cli_serve", "-m", str(path), "--port", "18083",
                                    *common], 18083, args, out)
        os.environ["LLAMATRON_CONFIG_DIR"] = str(cfg)
        router = run_one("router", [sys.executable, "-m", "api.cli_serve", "--models-dir", str(folder), "--port",
                                    "18084", *common], 18084, args, out)
    print(table(direct, router))
    return 0


if __name__ == "__main__":
    sys.exit(main())
