"""`--models-preset FILE`: aliases and per-model settings for the router, in TOML.

    # top-level keys: defaults for every model (any per-model key below)
    ctx_size = 4096
    parallel = 4

    [models.smollm2-135m-instruct]          # a model of --models-dir or the registry, by its id ...
    alias = ["smol", "tiny"]                # extra names it answers to
    ctx_size = 2048
    kv_cache_gib = 0.5
    chat_template = "templates/chatml.jinja" # relative paths are relative to this file
    temperature = 0.7                        # sampling defaults for requests that leave them out
    load_on_startup = true

    [models.coder]                           # ... or a new one, with its file, folder or registry name
    model = "/data/qwen2.5-coder-0.5b-instruct.gguf"

Precedence, lowest first: the server's own settings (flags, env, --config), the file's top-level
defaults, the model's section. Router-wide settings (host, port, keys, models_*) are not accepted
here: a preset that names one is an error at start-up, as is any unknown key or a bad value.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..settings import SettingsError, coerce_setting

# the ServerSettings fields a model's worker may have its own value of
PER_MODEL = frozenset({
    "ctx_size", "parallel", "max_batched_tokens", "long_prefill_tokens", "kv_cache_gib", "device", "cpu_weights",
    "threads", "embeddings", "pooling", "chat_template", "reasoning_format", "reasoning_budget",
    "gpu_memory_fraction", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_input_chars",
    "max_message_chars", "template_timeout_s", "grammar_timeout_s", "max_grammar_chars",
    "parse_special_in_content", "grace_period", "quantize",
})
PRESET_ONLY = frozenset({"model", "alias", "load_on_startup"})
PATH_KEYS = ("chat_template", "model")


@dataclass
class ModelPreset:
    settings: dict[str, Any] = field(default_factory=dict)  # PER_MODEL fields
    model: str = ""  # file, folder or registry name (only for models not found otherwise)
    aliases: list[str] = field(default_factory=list)
    load_on_startup: bool = False


@dataclass
class Presets:
    defaults: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelPreset] = field(default_factory=dict)
    path: Path | None = None


def _aliases(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return [a.strip() for a in value if a.strip()]
    raise SettingsError(f"{where}: alias must be a string or a list of strings")


def _settings(table: dict[str, Any], where: str, base: Path, allowed: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in allowed:
            hint = "a router-wide setting: give it on the command line" if name.startswith("models") or name in (
                "host", "port", "api_key", "api_key_file", "cors_origin", "no_webui", "alias", "model") else "unknown"
            raise SettingsError(f"{where}: {key!r} is not a per-model setting ({hint})")
        if name in PATH_KEYS and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            candidate = base / value
            value = str(candidate) if candidate.exists() or name == "chat_template" else value
        out[name] = value if name in PRESET_ONLY else coerce_setting(name, value, False, where)
    return out


def _model(name: str, table: Any, where: str, base: Path) -> ModelPreset:
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: [models.{name}] must be a table")
    values = _settings(table, f"{where} [models.{name}]", base, PER_MODEL | PRESET_ONLY)
    preset = ModelPreset()
    if "model" in values:
        if not isinstance(values["model"], str) or not values["model"]:
            raise SettingsError(f"{where} [models.{name}]: model must be a file, folder or registry name")
        preset.model = values.pop("model")
    if "alias" in values:
        preset.aliases = _aliases(values.pop("alias"), f"{where} [models.{name}]")
    if "load_on_startup" in values:
        if not isinstance(values["load_on_startup"], bool):
            raise SettingsError(f"{where} [models.{name}]: load_on_startup must be true or false")
        preset.load_on_startup = values.pop("load_on_startup")
    preset.settings = values
    return preset


def load_presets(path: str | Path) -> Presets:
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read models preset {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"models preset {p}: {e}") from None
    models = data.pop("models", {})
    if not isinstance(models, dict):
        raise SettingsError(f"models preset {p}: 'models' must be a table of [models.NAME] sections")
    base = p.resolve().parent
    return Presets(defaults=_settings(data, f"models preset {p}", base, PER_MODEL),
                   models={name: _model(name, t, f"models preset {p}", base) for name, t in models.items()}, path=p)
