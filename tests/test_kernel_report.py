"""scripts/kernel_report.py, the GPU yardstick that runs without a GPU (issue 11).

- sm90_code reads what it claims from real sm_90 compiles of two small kernels: the widest load from
  one pointer argument (16-byte vectors vs single bytes, told apart per argument) and the SHFL that a
  reduction inside a loop puts in the loop body (none when the reduction is after the loop);
- the report on smollm2 at M = 1 intercepts every launch of a real decode step: one GEMV per matrix
  per layer plus the lm_head, each with its SASS figures, and a kernels-per-token count.
Each compile takes about a second (triton's cache makes reruns fast); the report on smollm2 ~20 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


PROBE = """
import sys, json
sys.path[:0] = ["scripts", "tests"]
import launch_capture as LC, sm90_code as S, torch
import sm90_probe_kernels as P
x, w, out = torch.zeros(4096), torch.zeros(4096, dtype=torch.uint8), torch.zeros(64)
res = {}
with LC.capture_launches() as cap:
    P.loads[(1,)](x, w, out, BLOCK=512)
    P.sum_in_loop[(1,)](x, out, 4096, BLOCK=512)
    P.sum_after_loop[(1,)](x, out, 4096, BLOCK=512)
for l in cap.launches:
    k = l.compiled
    params = [p for p, v in k.src.signature.items() if v != "constexpr"]
    loop = S.hot_loop(k.asm["cubin"])
    res[l.kernel] = {"loop": loop.instructions, "shfl": loop.shfl,
                     "widest": {p: S.widest_load(k.asm["ptx"], k.metadata.name, i) for i, p in enumerate(params) if p.endswith("_ptr")}}
print(json.dumps(res))
"""


def test_sm90_code_reads_loads_and_loops() -> None:
    r = _run(PROBE)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    loads = res["sm90_probe_kernels.loads"]
    assert loads["widest"]["x_ptr"] == 16  # fp32 x 4 per thread, aligned: ld.global.v4.b32
    assert loads["widest"]["w_ptr"] == 1  # every other byte: no vector load is possible
    assert loads["widest"]["out_ptr"] == 0  # stored, never loaded
    assert res["sm90_probe_kernels.sum_in_loop"]["loop"] > 0 and res["sm90_probe_kernels.sum_in_loop"]["shfl"] > 0
    assert res["sm90_probe_kernels.sum_after_loop"]["loop"] > 0 and res["sm90_probe_kernels.sum_after_loop"]["shfl"] == 0


def test_report_on_smollm2_decode(smollm2_path, tmp_path) -> None:
    out = tmp_path / "report.json"
    r = _run(f"import runpy, sys; sys.argv = ['kernel_report.py', '--models', 'smollm2-135m-instruct', '--m', '1', "
             f"'--json', {str(out)!r}]; runpy.run_path('scripts/kernel_report.py', run_name='__main__')", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    recs = data["kernels"]
    # 30 layers x (fused QKV, O, fused gate|up, down) + the lm_head: one GEMV launch each
    assert sorted(x["weights"] for x in recs) == ["lm_head", "w_down", "w_gate_up", "wo", "wqkv"]
    assert sum(x["launches_per_token"] for x in recs) == 4 * 30 + 1
    for x in recs:
        assert x["model"] == "smollm2-135m-instruct" and x["M"] == 1 and x["kernel"] == "gemv"
        assert x["ggml_type"] == ("Q8_0" if x["weights"] == "lm_head" else "Q4_1")
        assert x["instr_per_weight"] > 0 and x["regs"] > 0 and x["ctas"] > 0 and x["spills"] == 0
        # the packed GEMV (issue 11): 16-byte quant loads, no shuffles in the K loop, <= 1.5x the issue budget
        assert x["widest_load_bytes"] == 16 and x["shfl_in_loop"] == 0 and x["issue_bw_ratio"] <= 1.5
        bpw = 34 / 32 if x["ggml_type"] == "Q8_0" else 20 / 32
        assert x["issue_bw_ratio"] == pytest.approx(x["instr_per_weight"] / 33.4 / (bpw / 4.8), abs=0.01)
    detail = data["kernels_per_token_detail"]["smollm2-135m-instruct"]
    # per layer: the 4 GEMVs, rope + KV store, attention; norms ride on the GEMVs (issue 11: <= 200)
    assert data["kernels_per_token"]["smollm2-135m-instruct"] == detail["total"]
    assert 4 * 30 + 1 + 30 * 2 <= detail["total"] <= 200
    attn = [o for o in data["other_kernels"] if o["kernel"] == "attention._attn_kernel"]
    assert attn and attn[0]["launches"] == 30 and attn[0]["phase"] == "forward"
    assert "| kernels per decoded token" in r.stdout
