"""Server settings: one dataclass, filled from the defaults file < a --config file < LLAMATRON_*
environment variables < command-line flags, each value checked (SettingsError names the source).

The many-model router builds each model's worker settings from the same dataclass
(api/router/catalog.py), so every check here applies to a preset's values too.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ServerSettings:
    model: str = ""  # empty (and no --models-dir/--models-preset): the many-model router over pulled models
    host: str = "127.0.0.1"
    port: int = 8080
    alias: str = ""
    ctx_size: int = 0
    parallel: int = 8
    max_batched_tokens: int = 2048
    long_prefill_tokens: int = 0
    kv_cache_gib: float = 1.0
    device: str = "auto"
    cpu_weights: str = "auto"
    threads: int = 0
    quantize: str = ""  # Hugging Face folders: none | q8_0 | q4_k; "": bf16 on a GPU, q8_0 on CPU
    embeddings: bool = False  # serve /v1/embeddings, /embedding(s) (501 without)
    pooling: str = ""  # embeddings: mean | cls | last | none; "": the model's GGUF pooling_type, else mean
    api_key: list[str] = field(default_factory=list)
    api_key_file: str = ""
    chat_template: str = ""
    cors_origin: list[str] = field(default_factory=list)
    log_format: str = "text"
    log_level: str = "info"
    grace_period: float = 10.0
    max_body_mb: float = 0.0
    keep_alive_s: int = 30
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_input_chars: int = 0
    max_message_chars: int = 0
    template_timeout_s: float = 2.0
    grammar_timeout_s: float = 5.0
    max_grammar_chars: int = 65536
    parse_special_in_content: bool = False
    no_webui: bool = False
    reasoning_format: str = "auto"  # auto | none | deepseek: split <think>...</think> into reasoning_content
    reasoning_budget: int = -1  # thinking tokens before the end tag is forced; -1: unlimited
    gpu_memory_fraction: float = 0.85  # CUDA: share of the free memory after the weights for the KV pool
    # sampling defaults for requests that leave a field out (-1: the API's own default)
    temperature: float = -1.0
    top_p: float = -1.0
    top_k: int = -1
    min_p: float = -1.0
    repeat_penalty: float = -1.0
    # many models (api/router/): serve every model of a folder, the pulled registry models and a presets file
    models_dir: str = ""
    models_preset: str = ""
    models_max: int = 4  # models resident at once (0: no limit); the least recently used idle one is unloaded
    models_autoload: bool = True  # load a model on its first request (off: 400 until POST /models/load)
    sleep_idle_seconds: float = 0.0  # unload a model idle this long (0: never)
    models_wait_s: float = 300.0  # how long a request waits for its model to load or for room to load it
    models_load_timeout_s: float = 900.0  # a model not serving after this long is stopped and marked failed

    def model_id(self) -> str:
        """The id clients see: the (first) alias, else the registry name or the file's stem."""
        if self.aliases:
            return self.aliases[0]
        p = Path(self.model)
        if p.suffix == ".gguf":
            return p.stem
        return p.name if p.is_dir() else self.model  # a Hugging Face folder: its name

    @property
    def aliases(self) -> list[str]:
        """`--alias a,b`: every name the model answers to; the first is its id (llama-server's spelling)."""
        return [a.strip() for a in self.alias.split(",") if a.strip()]

    @property
    def router_mode(self) -> bool:
        """No single model to serve, or a folder/presets of them: the many-model router."""
        return not self.model or bool(self.models_dir or self.models_preset)

    def sampling_defaults(self) -> dict[str, float | int]:
        """The sampling fields this server fills in for requests that omit them."""
        values = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "repeat_penalty": self.repeat_penalty}
        return {k: v for k, v in values.items() if v >= 0}

    def engine_config(self) -> Any:
        from engine.config import EngineConfig

        return EngineConfig(model=self.model, device=self.device, max_model_len=self.ctx_size,
                            max_num_seqs=self.parallel, max_num_batched_tokens=self.max_batched_tokens,
                            long_prefill_tokens=self.long_prefill_tokens,
                            kv_cache_gib=self.kv_cache_gib, chat_template=self.chat_template or None,
                            cpu_weights=self.cpu_weights, threads=self.threads, pooling=self.pooling,
                            gpu_memory_fraction=self.gpu_memory_fraction, quantize=self.quantize)


class SettingsError(ValueError):
    pass


_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}


def _coerce(name: str, value: Any, from_text: bool) -> Any:
    """Checks/converts one value to the field's type; env values arrive as text."""
    kind = _FIELDS[name].type
    try:
        if kind == "list[str]":
            if from_text:
                return [v.strip() for v in str(value).split(",") if v.strip()]
            if isinstance(value, str):
                return [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower() if from_text or isinstance(value, str) else None
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise TypeError
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise SettingsError(f"setting {name!r}: expected {kind}, got {value!r}") from None


def coerce_setting(name: str, value: Any, from_text: bool, source: str) -> Any:
    """One setting's value checked and converted to its field's type (SettingsError naming `source`)."""
    try:
        return _coerce(name, value, from_text)
    except SettingsError as e:
        raise SettingsError(f"{source}: {e}") from None


def _apply(values: dict[str, Any], layer: dict[str, Any], source: str, from_text: bool = False) -> None:
    for key, value in layer.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise SettingsError(f"{source}: unknown setting {key!r}")
        values[name] = _coerce(name, value, from_text)


def default_config_path() -> Path:
    from engine.loading.registry import config_dir

    return config_dir() / "server.toml"


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config file {path}: {e}") from None


def load_settings(cli: dict[str, Any] | None = None, config_file: str | None = None,
                  env: dict[str, str] | None = None) -> ServerSettings:
    """`cli` holds only the flags the user gave (None values are skipped)."""
    values: dict[str, Any] = {}
    defaults = default_config_path()
    if defaults.is_file():
        _apply(values, _read_toml(defaults), str(defaults))
    if config_file:
        _apply(values, _read_toml(config_file), config_file)
    env = os.environ if env is None else env
    env_layer = {k[len("LLAMATRON_"):].lower(): v for k, v in env.items()
                 if k.startswith("LLAMATRON_") and k[len("LLAMATRON_"):].lower() in _FIELDS}
    _apply(values, env_layer, "environment", from_text=True)
    _apply(values, {k: v for k, v in (cli or {}).items() if v is not None}, "command line")
    s = ServerSettings(**values)
    validate_settings(s)
    return s


def validate_settings(s: ServerSettings) -> None:
    """The checks every settings object passes, the router's per-model ones included."""
    if s.device not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"device must be auto, cpu or cuda, not {s.device!r}")
    if s.cpu_weights not in ("auto", "exact"):
        raise SettingsError(f"cpu_weights must be auto or exact, not {s.cpu_weights!r}")
    if s.quantize not in ("", "none", "q8_0", "q4_k"):
        raise SettingsError(f"quantize must be none, q8_0 or q4_k, not {s.quantize!r}")
    if s.pooling not in ("", "mean", "cls", "last", "none"):
        raise SettingsError(f"pooling must be mean, cls, last or none, not {s.pooling!r}")
    if s.reasoning_format not in ("auto", "none", "deepseek"):
        raise SettingsError(f"reasoning_format must be auto, none or deepseek, not {s.reasoning_format!r}")
    if s.reasoning_budget < -1:
        raise SettingsError(f"reasoning_budget must be -1 (unlimited) or >= 0, not {s.reasoning_budget}")
    if s.log_format not in ("text", "json"):
        raise SettingsError(f"log_format must be text or json, not {s.log_format!r}")
    if not 0 < s.port < 65536:
        raise SettingsError(f"port {s.port} is out of range")
    _check_numbers(s)


def _check_numbers(s: ServerSettings) -> None:
    if not 0.0 < s.gpu_memory_fraction <= 1.0:
        raise SettingsError(f"gpu_memory_fraction must be in (0, 1], not {s.gpu_memory_fraction}")
    for name, hi in (("temperature", 2.0), ("top_p", 1.0), ("min_p", 1.0), ("repeat_penalty", 10.0)):
        v = getattr(s, name)
        if v != -1.0 and not 0.0 <= v <= hi:
            raise SettingsError(f"{name} must be in [0, {hi:g}] (or -1: the API's default), not {v}")
    if s.top_k < -1:
        raise SettingsError(f"top_k must be >= 0 (or -1: the API's default), not {s.top_k}")
    if s.models_max < 0:
        raise SettingsError(f"models_max must be >= 0 (0: no limit), not {s.models_max}")
    for name in ("sleep_idle_seconds", "models_wait_s", "models_load_timeout_s"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name} must be >= 0, not {getattr(s, name)}")
