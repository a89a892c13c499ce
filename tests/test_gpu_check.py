"""scripts/gpu_check.sh in simulation (--dry-run) on CPU, shellcheck, and the sanitizer cases.

The dry run must complete here: every step prints its commands and runs the cheap ones, so a
broken path, a missing file or a renamed kernel shows up before a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kernel_device

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/gpu_check.sh", "scripts/gpu_check_e2e.sh", "scripts/prepare_gpu_wheels.sh"]
sys.path.insert(0, str(ROOT))


def _gpu_check(*args: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_dry_run_runs_every_step(tmp_path):
    res = _gpu_check("--out", str(tmp_path), env={"GPU_CHECK_WHEELS": str(tmp_path / "no-wheels")})
    report = (tmp_path / "gpu_check_dryrun.md").read_text()
    assert res.returncode == 0, res.stderr + report
    for heading in ("Device facts", "Carried wheels", "Copy bandwidth", "CUDA test suite", "compute-sanitizer",
                    "Kernel benchmarks", "End to end", "Summary"):
        assert f"## {heading}" in report, heading
    assert "torch " in report and "triton " in report  # the version probe ran
    assert "GB/s counting bytes read + written" in report  # the bandwidth snippet ran (on CPU)
    assert "-m pytest" in report and "(dry run: not run)" in report
    assert "compute-sanitizer --tool memcheck --error-exitcode 99 " in report
    assert "scripts/sanitizer_cases.py --all" in report  # every kernel case, in one sanitizer process
    assert "--tool racecheck" in report
    assert "ok   store_kv" in report  # one case really ran under the interpreter
    assert "FAILED" not in report.split("## Summary")[1]


def test_budget_and_only(tmp_path):
    res = _gpu_check("--out", str(tmp_path), "--only", "facts,bandwidth", "--budget", "3")
    report = (tmp_path / "gpu_check_dryrun.md").read_text()
    assert res.returncode == 0
    assert "## Carried wheels" not in report and "## End to end" not in report
    assert "(not run: the time budget is spent)" in report
    assert "time budget spent" in report.split("## Summary")[1]


def test_stand_in_models_from_carried_headers(tmp_path, smollm2_path):
    """prepare_gpu_wheels.sh's header + size -> a zero-weight stand-in that parses as the model."""
    import gguf

    wheels = tmp_path / "wheels"
    (wheels / "models").mkdir(parents=True)
    offset = gguf.GGUFReader(smollm2_path).data_offset
    with open(smollm2_path, "rb") as f:
        (wheels / "models" / "smollm2-135m-instruct.head").write_bytes(f.read(offset))
    meta = {"size": smollm2_path.stat().st_size, "data_offset": offset, "sha256": "0" * 64}
    (wheels / "models" / "smollm2-135m-instruct.json").write_text(json.dumps(meta))
    res = _gpu_check("--out", str(tmp_path), "--only", "e2e",
                     env={"GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_STANDIN": "1",
                          "GPU_CHECK_MODELS": "smollm2-135m-instruct gemma-3-270m"})
    report = (tmp_path / "gpu_check_dryrun.md").read_text()
    assert res.returncode == 0, report
    assert "### smollm2-135m-instruct (stand-in:" in report
    assert "272 tensors; llama" in report  # the stand-in parses with the real tensor table
    assert "--temperature 1.0" in report and "kill -TERM" in report
    assert "gemma-3-270m: no file" in report  # stand-ins only: no header carried for it


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _case_ids() -> list[str]:
    from scripts.sanitizer_cases import CASES

    return list(CASES)


MODULE_OF = {"rms_norm": "kernels.norm", "rope": "kernels.rope", "act": "kernels.act"}


@pytest.mark.parametrize("name", _case_ids())
def test_sanitizer_case_runs_here(name):
    """Each case under the interpreter: its shapes, calls and reference check match the kernels."""
    from scripts.sanitizer_cases import CASES

    mod = MODULE_OF.get(name)
    if mod and importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} not written yet")
    assert CASES[name](torch.device(kernel_device()))
