"""Load times of Hugging Face folders against their GGUF files, and of `--quantize` at load.

    python scripts/bench_hf_load.py [--model smollm2-135m-instruct] [--threads 2]

Converts the registry model to a bf16 folder in a temporary directory (timed), then loads the GGUF
file and the folder on the CPU as `llamatron serve` would (default weights: quantized C kernels;
the folder's default is Q8_0), the folder with --quantize q4_k and with --cpu-weights exact, each
in a fresh process (cold Python, warm page cache), and prints seconds and peak RSS per load with
the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CHILD = """
import json, sys, time
from engine.config import EngineConfig
from engine.loading.loader import load_model
t = time.monotonic()
m = load_model(EngineConfig(model=sys.argv[1], device="cpu", max_model_len=2048, threads=int(sys.argv[4]),
                            quantize=sys.argv[2], cpu_weights=sys.argv[3]))
dt = time.monotonic() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": dt, "peak_rss_mb": hwm / 1024, "format": m.format}))
"""


def _load(model: str, quantize: str, weights: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model, quantize, weights, str(threads)], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine.loading.convert import convert
    from engine.loading.registry import resolve

    gguf = resolve(args.model)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"command: python scripts/bench_hf_load.py --model {args.model} --threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        folder = convert(gguf, Path(tmp) / "hf", dtype="bf16")
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"convert {gguf.name} -> bf16 folder ({size / 1e6:.0f} MB): {time.monotonic() - t:.1f} s")
        _load(str(folder), "", "auto", args.threads)  # warm the page cache and the kernel build
        for label, model, q, w in (("gguf (default)", str(gguf), "", "auto"),
                                   ("folder, default (q8_0)", str(folder), "", "auto"),
                                   ("folder, --quantize q4_k", str(folder), "q4_k", "auto"),
                                   ("folder, --cpu-weights exact (fp32)", str(folder), "", "exact")):
            r = _load(model, q, w, args.threads)
            print(f"{label:40} {r['seconds']:6.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
