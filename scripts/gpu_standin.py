"""Full-size stand-in GGUF files for a lent GPU machine, from carried headers (no weights carried).

    python3 scripts/gpu_standin.py --heads wheels/models --dest /tmp/standin smollm2-135m-instruct ...
    python3 scripts/gpu_standin.py --from-file ~/.cache/llamatron/smollm2-135m-instruct.gguf --dest /tmp/s

scripts/prepare_gpu_wheels.sh writes NAME.head (the real file up to its data section: metadata,
tokenizer, tensor table) and NAME.json (size, data_offset). This script writes NAME.gguf of the
real size with the real header and, for every tensor, random blocks of its own type
(kernels.quant_layouts.random_blocks: random quant bytes, finite f16 scale fields), scaled so that
a matrix with K columns has weights of about 1/sqrt(K) (as trained models do: activations stay of
order one through the layers, so logits carry numbers worth comparing). Norm weights are
1 + 0.1 N(0,1), biases 0.1 N(0,1). Shapes, quant types and bytes read per token are the real
model's, so speed is measured truly; the text is meaningless. --fill zeros writes an all-zero
data section instead (a sparse file: instant, speed only, no numbers).

Models are built in parallel processes (--jobs); deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def scaled_blocks(ggml_type: int, shape: tuple[int, ...], name: str, seed: int):
    """uint8 [rows, row_bytes] of random blocks for one tensor (see the module docstring)."""
    import torch

    from kernels import quant_layouts as L

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    cols = shape[-1]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if len(shape) == 1:  # norms and biases (F32 in every shipped model)
        v = torch.randn(cols, generator=gen) * 0.1 + (0.0 if name.endswith(".bias") else 1.0)
        dt = {L.F32: torch.float32, L.F16: torch.float16, L.BF16: torch.bfloat16}[ggml_type]
        return v.to(dt).view(torch.uint8).reshape(1, -1)
    scale = 2.0 / cols**0.5  # unit-size random weights (|w| <~ 1, std ~0.5) -> std ~1/sqrt(K)
    if ggml_type in L.FLOAT_TYPES:
        dt = {L.F32: torch.float32, L.F16: torch.float16, L.BF16: torch.bfloat16}[ggml_type]
        v = torch.randn(rows, cols, generator=gen) * (scale / 2)
        return v.to(dt).view(torch.uint8).reshape(rows, -1)
    raw = L.random_blocks(ggml_type, rows, cols, gen)  # unit=True: weights of about unit size
    qk, bs = L.BLOCK[ggml_type]
    blocks = raw.view(-1, bs)
    for off in L.F16_FIELDS[ggml_type][0]:  # every weight is linear in these fields: scale them all
        f = blocks[:, off : off + 2].contiguous().view(torch.float16).float() * scale
        blocks[:, off : off + 2] = f.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return raw


def build(head: Path, size: int, dest: Path, fill: str, seed: int) -> str:
    """Header as carried, then the data section; returns a one-line account."""
    from engine.loading.gguf import GGUFFile

    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(head.read_bytes())
        f.truncate(size)  # zeros (sparse) everywhere else: alignment padding, or the whole data section
    n = 0
    if fill == "random":
        g = GGUFFile(tmp)
        with open(tmp, "r+b") as f:
            for info in g.tensors.values():
                data = scaled_blocks(info.ggml_type, tuple(info.shape), info.name, seed).numpy()
                f.seek(g.file_offset(info.name)[1])
                f.write(data.tobytes())
                n += 1
        del g
    if os.path.getsize(tmp) != size:
        raise RuntimeError(f"{dest.name}: wrote {os.path.getsize(tmp)} bytes, expected {size}")
    os.replace(tmp, dest)
    dt = time.perf_counter() - t0
    return f"{dest.name}: {size / 1e6:.0f} MB, {n} tensors of random blocks ({fill}) in {dt:.1f} s"


def _job(args: tuple) -> str:
    name, heads, dest_dir, fill, seed = args
    meta = json.loads((heads / f"{name}.json").read_text())
    return build(heads / f"{name}.head", int(meta["size"]), dest_dir / f"{name}.gguf", fill, seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="model names (NAME.head + NAME.json under --heads)")
    ap.add_argument("--heads", default="wheels/models")
    ap.add_argument("--from-file", default="", help="take header and size from a real GGUF file instead")
    ap.add_argument("--dest", required=True)
    ap.add_argument("--fill", choices=("random", "zeros"), default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=3)
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    if args.from_file:
        import gguf

        src = Path(args.from_file)
        off = gguf.GGUFReader(src).data_offset
        head = dest / (src.stem + ".head")
        dest.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f:
            head.write_bytes(f.read(off))
        print(build(head, src.stat().st_size, dest / src.name, args.fill, args.seed), flush=True)
        return 0
    heads = Path(args.heads)
    names = [n for n in args.names if (heads / f"{n}.head").is_file() and (heads / f"{n}.json").is_file()]
    for n in sorted(set(args.names) - set(names)):
        print(f"{n}: no {heads}/{n}.head + .json (run scripts/prepare_gpu_wheels.sh): skipped", flush=True)
    if not names:
        return 1
    jobs = [(n, heads, dest, args.fill, args.seed) for n in names]
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(jobs)))) as ex:
        for line in ex.map(_job, jobs):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
