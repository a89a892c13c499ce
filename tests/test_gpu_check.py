"""scripts/gpu_check.sh rehearsed on CPU (--dry-run), its caps and output limits, shellcheck, and the
pieces the dry run leaves out when lite (the random stand-in builder, the real-K sanitizer case).

The dry run must complete here: every step prints its command and runs the cheap ones, so a broken
path, a missing file or a renamed test shows up before a GPU is lent (15 minutes, all tries).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/gpu_check.sh"
STEPS = ["setup", "device", "graph", "precompile", "tests", "sanitizer", "kernels", "logits", "decode"]
sys.path.insert(0, str(ROOT))


def _tiny_model(path: Path) -> Path:
    from synth import write_tiny_model

    return write_tiny_model(path, weight_type="Q5_0", n_layers=1, vocab_size=256)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One lite dry run for the whole module, on a tiny model as the only 'registry' model."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    home = tmp / "home"
    home.mkdir()
    _tiny_model(home / "tiny.gguf")
    out = tmp / "out"
    env = {**os.environ, "GPU_CHECK_DRY_LITE": "1", "GPU_CHECK_MODELS": "tiny", "LLAMATRON_HOME": str(home),
           "GPU_CHECK_STANDIN": str(tmp / "standin"), "GPU_CHECK_WHEELS": str(tmp / "no-wheels"),
           "TRITON_CACHE_DIR": str(tmp / "triton-cache")}
    res = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    return res, out, tmp


def test_dry_run_completes(dry_run):
    res, out, tmp = dry_run
    summary = (out / "summary.md").read_text()
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.endswith(summary)  # the summary prints last
    for name in STEPS:
        assert f"| {name} |" in summary, name
    assert "FAILED" not in summary
    device = (out / "device.log").read_text()
    assert "torch " in device and "GB/s counting bytes read + written" in device  # facts + bandwidth ran
    assert "tiny.gguf: " in device and (tmp / "standin" / "tiny.gguf").is_file()  # the stand-in was built
    tests = (out / "tests.log").read_text()
    assert "-m pytest -v" in tests and "--timeout 90" in tests and "missing test" not in tests
    assert "test_compile_" not in tests and "test_gpu_check" not in tests  # no compile-only / dry-run tests
    assert "precompile:" in (out / "precompile.log").read_text()
    assert "gpu_decode: no CUDA device" in (out / "decode.log").read_text()


def test_caps_sum_to_at_most_420():
    res = subprocess.run(["bash", SCRIPT, "--list-steps"], cwd=ROOT, capture_output=True, text=True, check=True)
    caps = dict(line.split(":") for line in res.stdout.split())
    assert list(caps) == STEPS
    assert sum(int(c) for c in caps.values()) <= 420, caps


def test_at_most_8_files_under_out(dry_run):
    _, out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    assert all(p.parent == out for p in files)  # flat: the device tool returns at most 2 folders down


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", "-x", SCRIPT, "scripts/prepare_gpu_wheels.sh"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_stand_in_has_random_weights_of_sensible_size(dry_run):
    """Random blocks (not zeros), finite, weights of about 1/sqrt(K), norms near 1."""
    from engine.loading.gguf import GGUFFile
    from kernels import ref_quant

    _, _, tmp = dry_run
    real, fake = GGUFFile(tmp / "home" / "tiny.gguf"), GGUFFile(tmp / "standin" / "tiny.gguf")
    assert fake.metadata == real.metadata and fake.tensors.keys() == real.tensors.keys()
    for name in ("blk.0.ffn_up.weight", "blk.0.attn_norm.weight"):
        t = fake.tensor(name)
        assert t.data.shape == real.tensor(name).data.shape
        w = ref_quant.dequantize(t.data, t.ggml_type, t.shape, torch.float32)
        assert torch.isfinite(w).all() and w.abs().max() > 0
        if len(t.shape) == 2:
            assert 0.2 < w.std().item() * t.shape[1] ** 0.5 < 3, w.std()
        else:
            assert abs(w.mean().item() - 1) < 0.1


def test_sanitizer_real_k_case_runs_here():
    """The real-shape case under the interpreter: unaligned rows through prepare_weight + linear."""
    from conftest import kernel_device

    from scripts.sanitizer_cases import CASES

    assert "unaligned rows" in CASES["qmatmul_real_k"](torch.device(kernel_device()))
