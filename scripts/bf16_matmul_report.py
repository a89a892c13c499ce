"""Why unquantized bf16 checkpoints use torch.matmul on the GPU: the sm_90 code of our GGUF-block
matmul kernels (kernels/qmatmul.py) for BF16 weights at the decode shapes of a converted smollm2.

    .venv/bin/python scripts/bf16_matmul_report.py

Machine: any (CPU only; triton's bundled ptxas/cuobjdump, as scripts/kernel_report.py). Every launch
of `qmatmul(x, w)` with a BF16 QuantTensor w is compiled for sm_90 through the real dispatch and
not run; the table gives instructions per weight in the K loop and the issue/bandwidth ratio of
scripts/kernel_report.py (<= 1: the kernel can keep up with HBM). cuBLAS's bf16 GEMV/GEMM (what
`torch.matmul` runs) is not Triton code and has no row here: a ratio above 1 for ours is the case
for leaving dense 16-bit matrices to it, until a GPU run measures both.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_capture as LC  # noqa: E402  (first: it unsets TRITON_INTERPRET before triton loads)
import kernel_report as KR  # noqa: E402

SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w_gate_up": (3072, 576), "w_down": (576, 1536)}  # smollm2


def main() -> None:
    import torch

    from engine.loading.gguf import QuantTensor
    from kernels.qmatmul import qmatmul

    rows = []
    for m in (1, 8, 64):
        for name, (n, k) in SHAPES.items():
            w = QuantTensor(name, 30, (n, k), torch.zeros(n, 2 * k, dtype=torch.uint8))
            with LC.capture_launches() as cap:
                qmatmul(torch.zeros(m, k, dtype=torch.bfloat16), w)
            for r in KR.matmul_records("smollm2 (bf16 folder)", SimpleNamespace(layers=[], lm_head=None), m, cap):
                rows.append([name, n, k, m, r.kernel, f"{r.instr_per_weight:.1f}", r.widest_load_bytes,
                             f"{r.issue_bw_ratio:.2f}"])
    print("\n".join(KR._table(["weights", "N", "K", "M", "kernel", "instr/weight", "widest weight load (B)",
                                "issue/bandwidth"], rows)))


if __name__ == "__main__":
    main()
