"""The router's catalogue: every model it can serve, with the settings its worker runs with.

Sources, later ones winning for the same id: the registry models already pulled, the models of
--models-dir, the sections of --models-preset (which may add models by file, folder or registry
name), and --model, which is also loaded at start-up. Each model's header is read once here
(engine/loading/model_info.py), so a listing shows size, context and parameters before any load,
and a file that cannot even be read is listed as failed with its error.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.loading.discovery import FoundModel, pulled_models, scan_models_dir
from engine.loading.model_info import ModelInfo, describe
from engine.loading.registry import RegistryError, resolve

from ..settings import ServerSettings, SettingsError, validate_settings
from .presets import Presets, load_presets

ROUTER_ONLY = dict(host="127.0.0.1", port=8080, api_key=[], api_key_file="", cors_origin=[], no_webui=True,
                   models_dir="", models_preset="")


@dataclass
class ModelSpec:
    id: str
    path: Path
    source: str  # registry | dir | preset | cli
    aliases: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # per-model ServerSettings fields
    load_on_startup: bool = False
    info: ModelInfo | None = None
    error: str = ""  # the header could not be read

    @property
    def names(self) -> list[str]:
        """Every name a request may use: the id, the aliases, the file name and its stem."""
        return [self.id, *self.aliases, self.path.name, self.path.stem]


def _resolve_model(name: str, where: str) -> Path:
    try:
        return resolve(name, pull_missing=False)
    except RegistryError as e:
        raise SettingsError(f"{where}: {e}") from None


def _merge(specs: dict[str, ModelSpec], presets: Presets) -> None:
    for name, p in presets.models.items():
        where = f"models preset {presets.path} [models.{name}]"
        if name in specs and not p.model:
            spec = specs[name]
        else:
            spec = specs[name] = ModelSpec(name, _resolve_model(p.model or name, where), "preset")
        spec.aliases += p.aliases
        spec.overrides.update(p.settings)
        spec.load_on_startup |= p.load_on_startup


def _check_names(specs: list[ModelSpec]) -> None:
    owner: dict[str, str] = {}
    for s in specs:
        for n in [s.id, *s.aliases]:
            if owner.setdefault(n, s.id) != s.id:
                raise SettingsError(f"the name {n!r} is given to both {owner[n]!r} and {s.id!r}")


def build_catalog(settings: ServerSettings) -> list[ModelSpec]:
    """Every model the router serves, in a stable order; SettingsError for a bad preset or folder."""
    specs: dict[str, ModelSpec] = {}
    found: list[FoundModel] = pulled_models()
    if settings.models_dir:
        try:
            found += scan_models_dir(settings.models_dir)
        except FileNotFoundError as e:
            raise SettingsError(str(e)) from None
    for f in found:
        specs[f.id] = ModelSpec(f.id, f.path, f.source)
    presets = load_presets(settings.models_preset) if settings.models_preset else Presets()
    _merge(specs, presets)
    if settings.model:  # --model in router mode: one more model (or one found already), loaded at start
        path, sid = _resolve_model(settings.model, "--model"), settings.model_id()
        spec = specs.setdefault(sid, ModelSpec(sid, path, "cli"))
        spec.path, spec.load_on_startup = path, True
        spec.aliases += [a for a in settings.aliases[1:] if a not in spec.aliases]
    out = list(specs.values())
    _check_names(out)
    for s in out:
        s.overrides = {**presets.defaults, **s.overrides}
        worker_settings(settings, s, slots=1)  # every combination is validated before anything starts
    with ThreadPoolExecutor(max_workers=min(8, len(out) or 1)) as pool:
        for s, (info, err) in zip(out, pool.map(_describe, [s.path for s in out])):
            s.info, s.error = info, err
    return out


def _describe(path: Path) -> tuple[ModelInfo | None, str]:
    try:
        return describe(path), ""
    except (OSError, ValueError) as e:  # GGUFError is a ValueError naming the file
        return None, str(e)


def worker_settings(base: ServerSettings, spec: ModelSpec, slots: int) -> ServerSettings:
    """The settings one model's worker runs with: the router's, the preset's, then what only the
    router owns. `slots` models share the machine: unless a preset says otherwise, each gets that
    share of the CUDA memory and, on CPU, of the cores (two busy workers spinning on the same
    cores would slow each other many times over)."""
    values = dataclasses.asdict(base) | spec.overrides
    values |= ROUTER_ONLY | {"model": str(spec.path), "alias": ",".join([spec.id, *spec.aliases])}
    if "gpu_memory_fraction" not in spec.overrides:
        values["gpu_memory_fraction"] = base.gpu_memory_fraction / max(slots, 1)
    if not values["threads"] and values["device"] != "cuda":
        values["threads"] = max(1, _cores() // max(slots, 1))
    try:
        s = ServerSettings(**values)
        validate_settings(s)
    except (SettingsError, TypeError) as e:
        raise SettingsError(f"model {spec.id!r}: {e}") from None
    return s


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
