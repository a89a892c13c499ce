"""Which models a folder holds, and which registry models are already pulled: the model router's
catalogue and `llamatron models` read these.

A folder's models are its `.gguf` files (the parts of a gguf-split model, `name-00001-of-00003.gguf`
..., are one model named `name`) and its subfolders that hold one model each (named after the
subfolder: a split or multi-file model, or a Hugging Face checkpoint with its config.json).
Multimodal projector files (`mmproj*.gguf`) and hidden entries are not models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .gguf import SPLIT_NAME
from .registry import is_present, load_registry, model_path


@dataclass(frozen=True)
class FoundModel:
    id: str
    path: Path  # a .gguf file (a split model's first part) or a checkpoint folder
    source: str  # "dir" (--models-dir) or "registry" (pulled)


def _is_model_file(p: Path) -> bool:
    return p.suffix == ".gguf" and p.is_file() and not p.name.startswith((".", "mmproj"))


def _gguf_models(files: list[Path]) -> dict[str, Path]:
    """stem -> first file; the parts of a split model collapse into one entry."""
    out: dict[str, Path] = {}
    for f in sorted(files):
        m = SPLIT_NAME.match(f.name)
        if m is None:
            out[f.stem] = f
        else:  # named after the prefix; the path is its first part, whichever parts are present
            out.setdefault(m["prefix"], f.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf"))
    return out


def scan_models_dir(folder: str | Path) -> list[FoundModel]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"models folder not found: {root}")
    found = [FoundModel(k, p, "dir") for k, p in _gguf_models([f for f in root.iterdir() if _is_model_file(f)]).items()]
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if (sub / "config.json").is_file():
            found.append(FoundModel(sub.name, sub, "dir"))
            continue
        inner = _gguf_models([f for f in sub.iterdir() if _is_model_file(f)])
        if len(inner) == 1:
            found.append(FoundModel(sub.name, next(iter(inner.values())), "dir"))
        else:
            found += [FoundModel(f"{sub.name}/{k}", p, "dir") for k, p in inner.items()]
    return found


def pulled_models() -> list[FoundModel]:
    """Registry models whose file is in the cache (nothing is downloaded)."""
    _, entries = load_registry()
    return [FoundModel(name, model_path(e), "registry") for name, e in entries.items() if is_present(e)]
