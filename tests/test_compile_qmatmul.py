"""Compile every (kernel x config) the dispatcher can choose for Hopper (sm_90), without a GPU.

A real compile catches what the interpreter cannot (tl.dot shape rules, layout conversions that
do not lower, register/shared-memory blow-ups); the shared memory of each kernel must fit an
H100 (232,448 bytes per block). Pointers are marked 16-byte aligned as the JIT does for torch
allocations, and integer arguments as the JIT does when they are multiples of 16, for shapes
where that always holds (K, N, the split size; weight row strides for the types whose rows are
always whole multiples of 16 bytes). No kernel may spill registers (stack frame read from the cubin
by scripts/sm90_code.py, with the cuobjdump that ships with triton). About 120 compiles of 1-4 s each
run in 2 worker processes; Triton's cache (~/.triton/cache) makes repeated runs fast.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

H100_SMEM = 232448
_W_PTR = {0: "*fp32", 1: "*fp16", 30: "*i16"}  # F32/F16/BF16 weights are read as typed elements
_DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(job: tuple) -> tuple[str, int, int, str]:
    """(kernel, signature, constexprs, options, 16-divisible args) -> (label, shared, stack bytes, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import dequant, qmatmul

    name, sig, consts, opts, divisible = job
    fn = {"dequant": dequant.dequant_kernel, "gemv": qmatmul.gemv_kernel, "mm": qmatmul.mm_kernel,
          "reduce": qmatmul._reduce_kernel}[name]
    label = f"{name} {consts} {opts} {sig.get('x_ptr', sig.get('out_ptr'))}"
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as e:  # reported per job below
        return label, -1, -1, f"{type(e).__name__}: {str(e)[-800:]}"
    from scripts.sm90_code import resources

    return label, k.metadata.shared, resources(k.asm["cubin"]).stack, ""


def _w_stride_aligned(t: int) -> bool:
    """Weight row strides that are multiples of 16 for any K that is a multiple of 256."""
    from kernels import quant_layouts as L

    qk, bs = L.BLOCK[t]
    return t in L.FLOAT_TYPES or (bs * 256 // qk) % 16 == 0


def _jobs() -> dict[str, list[tuple]]:
    """Every type x every config in bf16; for Q4_K also fp16/fp32 activations and outputs, and gemv
    storing fp32 split-K partials (only the output pointer's type differs) for M_PAD 1 and 16."""
    from kernels import quant_layouts as L
    from kernels.dequant import DEQUANT_TILE
    from kernels.qmatmul import REDUCE_BLOCK, all_configs

    ints = {a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_wn")}
    jobs: dict[str, list[tuple]] = {"dequant": [], "gemv": [], "mm": [], "reduce": []}
    br, bc = DEQUANT_TILE
    for t in L.ALL_TYPES:
        sub, w = L.sub_size(t), _W_PTR.get(t, "*u8")
        extra = t == L.Q4_K
        for o in ("bf16", "fp16", "fp32") if extra else ("bf16",):
            sig = {"w_ptr": w, "out_ptr": _DT[o], "rows": "i32", "cols": "i32", "w_row_stride": "i32",
                   **dict.fromkeys(("TYPE", "SUB", "BLOCK_R", "NSUB"), "constexpr")}
            jobs["dequant"].append(("dequant", sig, {"TYPE": t, "SUB": sub, "BLOCK_R": br, "NSUB": bc // sub},
                                    {"num_warps": 4, "num_stages": 1, "enable_fp_fusion": False},
                                    (0, 1, 3) + ((4,) if _w_stride_aligned(t) else ())))
        for cfg in sorted(all_configs(), key=repr):
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if cfg.kernel == "gemv":
                more = extra and cfg.block_m in (1, 16)  # the smallest and largest product tiles
                pairs = [("bf16", "bf16")] + ([("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")] if more else [])
                for x, o in pairs:
                    sig = {"x_ptr": _DT[x], "w_ptr": w, "out_ptr": _DT[o], **ints, "stride_os": "i32",
                           "stride_om": "i32", "k_per_split": "i32", "b_ptr": "*fp32",
                           **dict.fromkeys(("TYPE", "SUB", "M_PAD", "BLOCK_N", "NSUB", "HAS_BIAS"), "constexpr")}
                    consts = {"TYPE": t, "SUB": sub, "M_PAD": cfg.block_m, "BLOCK_N": cfg.block_n,
                              "NSUB": cfg.block_k // sub, "HAS_BIAS": (x, o) != ("bf16", "fp32")}  # partials: no bias
                    div = (0, 1, 2, 4, 5, 6, 8, 9, 10, 11) + ((7,) if _w_stride_aligned(t) else ())
                    jobs["gemv"].append(("gemv", sig, consts, opts, div))
            else:
                for x in ("bf16", "fp16", "fp32") if extra else ("bf16",):
                    sig = {"x_ptr": _DT[x], "w_ptr": w, "out_ptr": _DT[x], **ints, "stride_om": "i32",
                           "b_ptr": "*fp32",
                           **dict.fromkeys(("TYPE", "SUB", "BLOCK_M", "BLOCK_N", "NSUB", "GROUP_M", "HAS_BIAS"),
                                           "constexpr")}
                    consts = {"TYPE": t, "SUB": sub, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                              "NSUB": cfg.block_k // sub, "GROUP_M": cfg.group_m, "HAS_BIAS": True}
                    div = (0, 1, 2, 4, 5, 6, 8, 9) + ((7,) if _w_stride_aligned(t) else ())
                    jobs["mm"].append(("mm", sig, consts, opts, div))
    for o in ("bf16", "fp16", "fp32"):
        sig = {"p_ptr": "*fp32", "out_ptr": _DT[o], "numel": "i32", "split": "i32", "b_ptr": "*fp32", "N": "i32",
               "BLOCK": "constexpr", "HAS_BIAS": "constexpr"}
        jobs["reduce"].append(("reduce", sig, {"BLOCK": REDUCE_BLOCK, "HAS_BIAS": True}, {"num_warps": 4}, (0, 1, 4)))
    return jobs


@pytest.fixture(scope="module")
def pool():
    # spawn: a forked child would inherit TRITON_INTERPRET and the parent's triton state
    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as ex:
            yield ex
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env


@pytest.mark.parametrize("kernel", ["dequant", "gemv", "mm", "reduce"])
def test_compiles_for_h100(pool, kernel):
    jobs = _jobs()[kernel]
    assert jobs
    results = list(pool.map(_compile, jobs))
    errors = [f"{label}: {err}" for label, _, _, err in results if err]
    assert not errors, "\n".join(errors[:5])
    too_big = [(label, shared) for label, shared, _, _ in results if shared >= H100_SMEM]
    assert not too_big, too_big
    # A stack frame means registers spilled to local memory: a large slowdown, so a failure too.
    spills = [(label, stack) for label, _, stack, _ in results if stack > 0]
    assert not spills, spills


def test_every_dispatch_choice_is_compiled():
    """The compiled set covers what `choose` returns for any M and every type."""
    from kernels import quant_layouts as L
    from kernels.qmatmul import all_configs, choose

    chosen = {choose(M, 4096, 4096, t, (9, 0)) for M in (1, 2, 3, 5, 9, 16, 17, 40, 100, 5000) for t in L.ALL_TYPES}
    assert chosen <= all_configs()
    assert {c.kernel for c in chosen} == {"gemv", "mm"}
