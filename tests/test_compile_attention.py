"""Compile every attention / small-kernel config the dispatch can launch for Hopper, on a CPU-only machine.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the real front end, TTGIR
passes, LLVM and ptxas: it raises what the interpreter never sees (tl.dot shapes, layouts, register
or shared-memory overflow), and `metadata.shared` must stay under the H100's 232,448 bytes.
The test session runs kernels in the interpreter (tests/conftest.py), under which triton's own
@jit helpers (tl.cdiv, tl.max, ...) are interpreter objects that cannot be compiled; so all cases
compile in one child process started with TRITON_INTERPRET=0 (this file run as a script, which also
prints the table: `python tests/test_compile_attention.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100_SHARED = 232448
FP32_ARGS = {"scale_log2", "softcap", "eps"}
ATTN_PTRS = {"*": "bf16", "wo_ptr": "fp32", "wl_ptr": "fp32", "cnt_ptr": "i32", "cu_ptr": "i32", "len_ptr": "i32",
             "bt_ptr": "i32"}


def p2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cases() -> list[tuple[str, str, str, dict, dict, int, int]]:
    """(id, module, kernel, pointer dtypes, constexprs, num_warps, num_stages), from the modules' own tables."""
    from kernels import norm, rope
    from kernels.attention import dispatch_space

    out = []
    for k, dt, c, w, s in dispatch_space():
        ptrs = dict(ATTN_PTRS, **{"*": dt})
        out.append((f"{k}-{dt}-hd{c['HD_P']}-m{c['BLOCK_M']}-s{c['SPLITS_P']}", "attention", k, ptrs, c, w, s))
    for nkv, hd in ((3, 64), (1, 256), (8, 128)):
        c = dict(NKV=nkv, HEAD_DIM=hd, NKV_P=p2(nkv), HD_P=hd, BLOCK_SIZE=16)
        out.append((f"store_kv-{nkv}x{hd}", "attention", "_store_kv_kernel", {"*": "bf16", "slot_ptr": "i64"}, c,
                    4 if nkv * hd >= 1024 else 1, 3))
    for width, res in ((576, True), (896, False), (8192, True), (20000, True)):
        p = norm.launch_params(width)
        w = p.pop("num_warps")
        out.append((f"rms_norm-{width}-{res}", "norm", "_rms_norm_kernel", {"*": "bf16", "w_ptr": "fp32"},
                    dict(p, HAS_RES=res), w, 3))
    for nh, nkv, hd, rot, inplace, neox in ((9, 3, 64, 64, False, False), (4, 1, 256, 256, False, True),
                                            (32, 8, 128, 64, False, True), (14, 2, 64, 48, True, False)):
        p = rope.launch_params(nh, nkv, hd, rot, inplace)
        w = p.pop("num_warps")
        out.append((f"rope-{nh}-{nkv}-{hd}-{rot}-{inplace}-{neox}", "rope", "_rope_kernel",
                    {"*": "bf16", "pos_ptr": "i64", "cs_ptr": "fp32"}, dict(p, NEOX=neox), w, 3))
    for nh, nkv, hd, rot, neox, qkn in ((9, 3, 64, 64, False, False), (14, 2, 64, 64, True, False),
                                        (4, 1, 256, 256, True, True), (32, 8, 128, 64, True, True),
                                        (16, 8, 128, 128, True, True), (7, 1, 80, 32, False, True)):
        p = rope.rope_store_kv_params(nh, nkv, hd, rot)
        w = p.pop("num_warps")
        out.append((f"rope_store_kv-{nh}-{nkv}-{hd}-{rot}-{neox}-{qkn}", "rope", "_rope_store_kv_kernel",
                    {"*": "bf16", "pos_ptr": "i64", "cs_ptr": "fp32", "slot_ptr": "i64", "qw_ptr": "fp32",
                     "kw_ptr": "fp32"}, dict(p, NEOX=neox, Q_NORM=qkn, K_NORM=qkn, BLOCK_SIZE=16), w, 3))
    for block, gelu in ((1024, False), (1024, True), (256, True)):
        out.append((f"gated-{block}-{gelu}", "act", "_gated_kernel", {"*": "bf16"}, dict(BLOCK=block, GELU=gelu),
                    4 if block >= 512 else 1, 3))
    return out


def compile_case(fn, ptr_types: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Signature from argument names: *_ptr are pointers (dtype per name), a few floats, the rest i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr_types.get(name, ptr_types["*"])
            attrs[(i,)] = [["tt.divisibility", 16]]  # as the launcher specializes aligned tensors
        else:
            sig[name] = "fp32" if name in FP32_ARGS else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _worker() -> None:
    """Child process: compile every case, print one JSON object {id: result}."""
    import importlib
    import time

    results = {}
    for cid, mod, kernel, ptrs, consts, warps, stages in cases():
        t0 = time.time()
        try:
            k = compile_case(getattr(importlib.import_module(f"kernels.{mod}"), kernel), ptrs, consts, warps, stages)
            ptx = k.asm["ptx"]
            results[cid] = dict(shared=k.metadata.shared, mma="mma" in ptx, tanh="tanh" in ptx,
                                secs=round(time.time() - t0, 2))
        except Exception as e:  # reported per case by the parent
            results[cid] = dict(error=f"{type(e).__name__}: {e}"[:2000])
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=850)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in cases()])
def test_compiles_for_sm90(compiled, case):
    cid, _, kernel, *_ = case
    r = compiled[cid]
    assert "error" not in r, r.get("error")
    assert r["shared"] < H100_SHARED, r
    if kernel == "_attn_kernel":
        assert r["mma"], "tl.dot fell back to scalar code"
    if kernel == "_gated_kernel":
        assert not r["tanh"], "tanh must be the exp formula (no libdevice)"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--worker" in sys.argv:
        _worker()
    else:
        os.environ.setdefault("TRITON_INTERPRET", "0")
        for c in cases():
            k = compile_case(getattr(__import__(f"kernels.{c[1]}", fromlist=["x"]), c[2]), *c[3:])
            print(f"{c[0]:45s} shared={k.metadata.shared:7d}")
