"""The GPU decode path's yardstick without a GPU: sm_90 code of every kernel a decode step launches.

    .venv/bin/python scripts/kernel_report.py                          # the shipped models, M 1 8 16 64
    .venv/bin/python scripts/kernel_report.py --models smollm2-135m-instruct --m 1 --json out.json

Machine: any (CPU only is fine); triton's bundled ptxas/cuobjdump. Models: the registry's files (a
missing one is pulled). For each model and each decode batch M, one decode step (M sequences, one
token each, 256 tokens of context, attention sized for a 4,096-token graph as CudaGraphRunner
captures it) runs on the Triton backend in bf16 with every Triton launch compiled for sm_90 through
the real dispatch and not run (scripts/launch_capture.py). From each matmul kernel's SASS:

- instructions per weight = SASS instructions in one trip of the K loop x 32 threads x warps /
  weights the CTA consumes per trip (all M rows together);
- issue/bandwidth ratio = (instructions per weight / 33.4e12) / (bytes per weight / 4.8e12): an
  H100/H200 issues ~33.4 T thread-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz)
  against ~4.8 TB/s of HBM; <= 1 means the kernel can be bandwidth-bound, 4 means it reaches at
  most a quarter of the bandwidth limit;
- SHFL and BAR inside the K loop, widest load from the weight pointer (PTX), registers, spills,
  CTAs against 132 SMs.
Kernels per decoded token (M = 1) = Triton launches + torch ops that launch a CUDA kernel, in the
forward (what a CUDA graph captures), the lm_head and the sampler.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_capture as LC  # noqa: E402  (first: it unsets TRITON_INTERPRET before triton loads)
import sm90_code  # noqa: E402

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m")
ISSUE_PER_S, BYTES_PER_S = 33.4e12, 4.8e12
CONTEXT, GRAPH_LEN, BLOCK = 256, 4096, 16
MATMULS = ("qmatmul.gemv_kernel", "qmatmul.mm_kernel", "qmatmul_packed.gemv_kernel", "qmatmul_packed.mm_kernel")


def weights_per_trip(kernel: str, a: dict) -> int:
    """Weights one trip of the K loop consumes, all rows of the CTA together (a: launch arguments)."""
    if kernel == "qmatmul_packed.gemv_kernel":  # BG groups of 8 rows x C groups of 32 weights
        n = a["BG"] * 8 * a["C"] * 32
    elif kernel == "qmatmul_packed.mm_kernel":
        n = a["BLOCK_N"] * 32  # the packed decoder's tile is 32 weights deep
    else:
        n = a["BLOCK_N"] * a["NSUB"] * a["SUB"]
    # a [gate; up] pair: the tiled kernel decodes both matrices in one loop, the GEMV in two loops
    return n * (2 if a.get("ACT") and kernel.endswith("mm_kernel") else 1)


@dataclass
class KernelRecord:
    model: str
    kernel: str
    ggml_type: str
    N: int
    K: int
    M: int
    weights: str  # which of the model's matrices have this shape
    launches_per_token: int
    instr_per_weight: float
    shfl_in_loop: int
    bar_in_loop: int
    widest_load_bytes: int
    regs: int
    spills: int
    shared: int
    ctas: int
    issue_bw_ratio: float


def load(name: str):
    import torch

    from engine.config import ModelConfig
    from engine.loading.gguf import GGUFFile
    from engine.loading.registry import resolve
    from engine.model import Model
    from kernels.triton_backend import TritonOps

    gguf = GGUFFile(resolve(name))
    cfg = ModelConfig.from_gguf(gguf.metadata, set(gguf.tensors))
    ops = TritonOps(torch.device("cpu"), dtype=torch.bfloat16)  # the GPU's activation dtype: casts count
    return Model.from_gguf(gguf, cfg, ops, GRAPH_LEN)


def weight_names(model) -> dict[tuple[int, int, int], str]:
    """(ggml type, N, K) -> the matrices of that shape (wqkv, wo, w_gate_up, w_down, lm_head...)."""
    found: dict[tuple[int, int, int], set[str]] = {}
    named = [(f, w) for layer in model.layers for f, w in vars(layer).items()] + [("lm_head", model.lm_head)]
    for field, w in named:
        if hasattr(w, "ggml_type") and len(w.shape) == 2:
            found.setdefault((w.ggml_type, *w.shape), set()).add(field)
    return {k: "+".join(sorted(v)) for k, v in found.items()}


def decode_step(model, batch: int, cap: LC.Capture) -> None:
    """One decode step of `batch` sequences as the runner runs it: forward, lm_head rows, sampler."""
    import torch

    from engine.core.sampling import Sampler, SamplingParams
    from engine.core.sequence import Sequence
    from kernels import AttentionMetadata

    kv = model.allocate_kv_cache(batch + 1, BLOCK)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(batch, dtype=torch.int64),
        block_tables=torch.zeros(batch, GRAPH_LEN // BLOCK, dtype=torch.int32),
        seq_lens=torch.full((batch,), CONTEXT, dtype=torch.int32),
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32),
        max_seqlen_q=1, max_seqlen_k=GRAPH_LEN, block_size=BLOCK)
    ids, pos = torch.ones(batch, dtype=torch.long), torch.full((batch,), CONTEXT - 1, dtype=torch.long)
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(temperature=0), 16) for i in range(batch)]
    # no_grad, not inference_mode: under inference_mode the dispatch mode sees composite ops (to,
    # contiguous) before they decompose, flagged as views, and would miss the copies they launch
    with torch.no_grad():
        hidden = LC.with_phase(cap, "forward", model.forward, ids, pos, meta, kv)
        logits = LC.with_phase(cap, "lm_head", model.compute_logits, hidden.index_select(0, torch.arange(batch)))
        LC.with_phase(cap, "sampler", Sampler(model.cfg.vocab_size), logits, seqs)


def matmul_records(name: str, model, batch: int, cap: LC.Capture) -> list[KernelRecord]:
    from kernels import quant_layouts as L

    names, seen, out = weight_names(model), {}, []
    for launch in cap.launches:
        if launch.kernel not in MATMULS:
            continue
        a = launch.args
        key = (launch.kernel, a["TYPE"], a["N"], a["K"], a.get("ACT", 0))
        if key in seen:
            seen[key].launches_per_token += 1
            continue
        k = launch.compiled
        loop, res = sm90_code.hot_loop(k.asm["cubin"]), sm90_code.resources(k.asm["cubin"])
        params = [p for p, v in k.src.signature.items() if v != "constexpr"]
        ipw = loop.instructions * 32 * k.metadata.num_warps / weights_per_trip(launch.kernel, a)
        w_param = "q_ptr" if "q_ptr" in params else "w_ptr"
        n_rows = a["N"] * (2 if a.get("ACT") else 1)
        qk, bs = L.BLOCK[a["TYPE"]]
        rec = KernelRecord(
            name, launch.kernel.split(".")[1].removesuffix("_kernel"), L.NAMES[a["TYPE"]], n_rows, a["K"], batch,
            names.get((a["TYPE"], n_rows, a["K"]), "?"), 1, round(ipw, 2), loop.shfl, loop.bar,
            sm90_code.widest_load(k.asm["ptx"], k.metadata.name, params.index(w_param)), res.regs, res.stack,
            k.metadata.shared, launch.ctas, round((ipw / ISSUE_PER_S) / (bs / qk / BYTES_PER_S), 2))
        seen[key] = rec
        out.append(rec)
    return out


def other_records(name: str, cap: LC.Capture) -> list[dict]:
    """Every non-matmul kernel of the step: name, phase, launches, CTAs, registers, spills, shared."""
    rows: dict[tuple[str, str], dict] = {}
    for launch in cap.launches:
        if launch.kernel in MATMULS or launch.compiled is None:
            continue
        row = rows.get((launch.phase, launch.kernel))
        if row:
            row["launches"] += 1
            continue
        res = sm90_code.resources(launch.compiled.asm["cubin"])
        rows[(launch.phase, launch.kernel)] = {"model": name, "phase": launch.phase, "kernel": launch.kernel,
                                               "launches": 1, "ctas": launch.ctas, "regs": res.regs,
                                               "spills": res.stack, "shared": launch.compiled.metadata.shared}
    return list(rows.values())


def per_token(cap: LC.Capture) -> dict[str, int]:
    counts = {}
    for phase in ("forward", "lm_head", "sampler"):
        tri, tor = cap.count(phase)
        counts[f"{phase}_triton"], counts[f"{phase}_torch"] = tri, tor
    counts["total"] = sum(counts.values())
    return counts


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                             for r in rows]


def markdown(records: list[KernelRecord], others: list[dict], tokens: dict[str, dict[str, int]]) -> str:
    lines = _table(["model", "weights", "type", "N", "K", "M", "kernel", "launches/token", "instr/weight",
                    "SHFL in loop", "widest weight load (B)", "regs", "spills", "CTAs (132 SMs)", "issue/bandwidth"],
                   [[r.model, r.weights, r.ggml_type, r.N, r.K, r.M, r.kernel, r.launches_per_token,
                     f"{r.instr_per_weight:.1f}", r.shfl_in_loop, r.widest_load_bytes, r.regs, r.spills, r.ctas,
                     f"{r.issue_bw_ratio:.1f}"] for r in records])
    lines += [""] + _table(["model", "phase", "kernel", "launches/token", "CTAs", "regs", "spills", "shared B"],
                           [[o["model"], o["phase"], o["kernel"], o["launches"], o["ctas"], o["regs"], o["spills"],
                             o["shared"]] for o in others])
    lines += [""] + _table(["model", "kernels per decoded token (M=1)", "forward: Triton + torch", "lm_head",
                            "sampler"],
                           [[m, c["total"], f"{c['forward_triton']} + {c['forward_torch']}",
                             c["lm_head_triton"] + c["lm_head_torch"], c["sampler_triton"] + c["sampler_torch"]]
                            for m, c in tokens.items()])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16, 64],
                    help="decode batch sizes, comma-separated (default 1,8,16,64)")
    ap.add_argument("--json", type=Path, help="write the figures for machines here")
    args = ap.parse_args()
    import triton

    t0 = time.monotonic()
    print(f"# kernel_report: sm_90 (H100/H200) from compiled code; host {platform.node()}, triton {triton.__version__}")
    records, others, tokens = [], [], {}
    for name in args.models:
        model = load(name)
        for batch in args.m:
            with LC.capture_launches() as cap:
                decode_step(model, batch, cap)
            records += matmul_records(name, model, batch, cap)
            if batch == args.m[0]:
                others += other_records(name, cap)
            if batch == 1:
                tokens[name] = per_token(cap)
        print(f"# {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(markdown(records, others, tokens))
    if args.json:
        args.json.write_text(json.dumps({"kernels": [asdict(r) for r in records], "other_kernels": others,
                                         "kernels_per_token": {m: c["total"] for m, c in tokens.items()},
                                         "kernels_per_token_detail": tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
