"""sm_90 compiles of the packed kernels (kernels/qmatmul_packed.py) without a GPU: every packed type,
the GEMV configs the dispatcher picks for the shipped shapes (K = 576 / 640 / 896 / 1536 / 4864) and
every config `--tune` may write into TABLE,
every M bucket of the tensor-core matmul, the bias and gated-activation epilogues and the embedding
dequantizer. From the SASS: no spills, no warp shuffles in the GEMV's K loop, 16-byte quant loads."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

_PTRS = ["x_ptr", "q_ptr", "h_ptr", "d_ptr", "m_ptr", "sc_ptr", "mn_ptr"]


def _compile(job: tuple) -> tuple[str, int, int, int, str]:
    """(kernel, type, constexprs, num_warps, act dtype) -> (label, stack, SHFL in loop, widest q load, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import qmatmul_packed as QP
    from scripts import sm90_code

    name, t, consts, warps, xdt = job
    consts = QP._type_args(t) | consts
    fn = {"gemv": QP.gemv_kernel, "mm": QP.mm_kernel, "dequant": QP.dequant_rows_kernel}[name]
    plane = {"q_ptr": "*i32", "h_ptr": "*i32", "d_ptr": "*fp16", "m_ptr": "*fp16", "sc_ptr": "*u8", "mn_ptr": "*u8"}
    sig = {p: plane.get(p, f"*{xdt}") for p in _PTRS}
    if name == "dequant":
        sig = {p: plane[p] for p in _PTRS[1:]} | {"ids_ptr": "*i64", "out_ptr": f"*{xdt}", "n_ids": "i32", "K": "i32"}
    else:
        sig |= {"out_ptr": f"*{xdt}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "b_ptr": "*fp32", "res_ptr": f"*{xdt}",
                "g_ptr": "*fp32", "g1_ptr": "*fp32", "hout_ptr": f"*{xdt}"}
        ints = ["N", "K", "groups_per_split", "split", "PAIR"] if name == "gemv" else \
            ["M", "N", "K", "stride_xm", "stride_om", "k_per_split", "split", "PAIR"]
        sig |= {i: "i32" for i in ints} | {"eps": "fp32"}
        consts = {"NB": 1, "TAIL": 0} | consts
    sig |= {c: "constexpr" for c in consts}
    label = f"{name} type {t} {consts} warps {warps} {xdt}"
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8 if name == "dequant" else len(_PTRS) + 4)}
    try:
        opts = {"num_warps": warps, "num_stages": 1} | ({"enable_fp_fusion": False} if name == "dequant" else {})
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as e:  # reported per job below
        return label, -1, -1, -1, f"{type(e).__name__}: {str(e)[-600:]}"
    loop = sm90_code.hot_loop(k.asm["cubin"])
    params = [p for p, v in sig.items() if v != "constexpr"]
    widest = sm90_code.widest_load(k.asm["ptx"], k.metadata.name, params.index("q_ptr"))
    return label, sm90_code.resources(k.asm["cubin"]).stack, loop.shfl, widest, ""


def _jobs() -> list[tuple]:
    from kernels import packed as P
    from kernels import quant_layouts as L
    from kernels.qmatmul_packed import choose

    jobs = []
    from kernels.qmatmul_packed import TABLE, candidates

    gemv_cfgs = {choose(1, n, k, (9, 0)) for n, k in [(960, 576), (576, 1536), (1152, 896), (640, 640),
                                                      (896, 4864), (262144, 640)]}
    gemv_cfgs |= set(candidates(1)) | {c for c in TABLE.values() if c.kernel == "gemv"}
    mm_cfgs = {choose(bm, 4096, 4096, (9, 0)) for bm in (16, 32, 64, 128)}
    mm_cfgs |= set(candidates(16)) | set(candidates(64)) | {c for c in TABLE.values() if c.kernel == "mm"}
    for t in P.PACKED_TYPES:
        for c in gemv_cfgs:
            jobs.append(("gemv", t, {"BG": c.block_n, "C": c.block_k, "HAS_BIAS": False, "ACT": 0}, c.num_warps,
                         "bf16"))
        for c in mm_cfgs:
            jobs.append(("mm", t, {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "HAS_BIAS": False, "ACT": 0},
                         c.num_warps, "bf16"))
        jobs.append(("dequant", t, {"BLOCK_R": 16}, 4, "bf16"))
    jobs += [("gemv", L.Q4_K, {"BG": 8, "C": 4, "HAS_BIAS": True, "ACT": 1}, 1, "bf16"),
             ("gemv", L.Q5_0, {"BG": 16, "C": 2, "HAS_BIAS": False, "ACT": 2}, 1, "fp16"),
             ("mm", L.Q4_K, {"BLOCK_M": 16, "BLOCK_N": 64, "HAS_BIAS": True, "ACT": 1}, 4, "bf16"),
             ("mm", L.Q6_K, {"BLOCK_M": 64, "BLOCK_N": 64, "HAS_BIAS": False, "ACT": 2}, 4, "fp32"),
             ("gemv", L.Q4_1, {"BG": 16, "C": 2, "HAS_BIAS": False, "ACT": 0, "NB": 1024, "TAIL": 1}, 1, "bf16"),
             ("gemv", L.Q6_K, {"BG": 4, "C": 8, "HAS_BIAS": False, "ACT": 0, "NB": 1024, "TAIL": 2}, 1, "bf16"),
             ("mm", L.Q5_0, {"BLOCK_M": 16, "BLOCK_N": 64, "HAS_BIAS": False, "ACT": 0, "NB": 1024, "TAIL": 2}, 4,
              "bf16")]
    return jobs


@pytest.fixture(scope="module")
def results():
    env = os.environ.pop("TRITON_INTERPRET", None)  # spawned children compile for real
    try:
        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(_compile, _jobs()))
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env


def test_every_packed_variant_compiles_without_spills(results) -> None:
    errors = [f"{label}: {err}" for label, _, _, _, err in results if err]
    assert not errors, "\n".join(errors[:3])
    spills = [(label, stack) for label, stack, _, _, _ in results if stack > 0]
    assert not spills, spills


def test_gemv_has_no_shuffles_in_its_k_loop_and_loads_16_bytes(results) -> None:
    gemv = [r for r in results if r[0].startswith("gemv")]
    assert gemv and all(shfl == 0 for _, _, shfl, _, _ in gemv), [(r[0], r[2]) for r in gemv if r[2]]
    assert all(widest == 16 for _, _, _, widest, _ in gemv), [(r[0], r[3]) for r in gemv if r[3] != 16]
