"""`llamatron serve [MODEL]`: flags in llama-server's spelling; defaults live in configs/server.toml.

Every flag defaults to None here so that only flags actually given override the config layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .server import run_server
from .settings import ServerSettings, SettingsError, load_settings


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                   help="registry name, .gguf file or Hugging Face model folder (same as -m); none: serve many models")
    p.add_argument("-m", "--model", default=None, help="registry name, .gguf file or Hugging Face model folder")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default 8080)")
    p.add_argument("-a", "--alias", default=None,
                   help="model id reported to clients; a comma-separated list adds names it also answers to")
    p.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=None,
                   help="max tokens per sequence (0 = the model's, capped at 8192 on CPU)")
    p.add_argument("-np", "--parallel", type=int, default=None, help="sequences decoded together")
    p.add_argument("--max-batched-tokens", dest="max_batched_tokens", type=int, default=None,
                   help="token budget of one engine step")
    p.add_argument("--long-prefill-tokens", dest="long_prefill_tokens", type=int, default=None,
                   help="prompt tokens per step while other sequences decode (0: 256 on CPU, 1024 on GPU)")
    p.add_argument("--kv-cache-gib", dest="kv_cache_gib", type=float, default=None,
                   help="KV-cache pool size in GiB (CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--cpu-weights", dest="cpu_weights", choices=("auto", "exact"), default=None,
                   help="CPU: quantized C kernels (auto) or dense fp32 torch reference (exact)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU kernel threads (0: all cores)")
    p.add_argument("--quantize", choices=("none", "q8_0", "q4_k"), default=None,
                   help="Hugging Face folders: quantize float weights at load (default: bf16 on a GPU, q8_0 on CPU)")
    p.add_argument("--embeddings", "--embedding", dest="embeddings", action="store_const", const=True, default=None,
                   help="serve /v1/embeddings, /embedding and /embeddings (otherwise they answer 501)")
    p.add_argument("--pooling", choices=("mean", "cls", "last", "none"), default=None,
                   help="embeddings' pooling (default: the model's GGUF pooling_type, else mean)")
    p.add_argument("--api-key", dest="api_key", action="append", default=None,
                   help="require this key (repeatable)")
    p.add_argument("--api-key-file", dest="api_key_file", default=None, help="file with one key per line")
    p.add_argument("--chat-template", dest="chat_template", default=None, metavar="FILE",
                   help="jinja chat template file overriding the model's")
    p.add_argument("--cors-origin", dest="cors_origin", action="append", default=None,
                   help="allow this CORS origin (repeatable; '*' for any)")
    p.add_argument("--config", default=None, metavar="FILE", help="TOML file with settings")
    p.add_argument("--log-format", dest="log_format", choices=("text", "json"), default=None)
    p.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"), default=None)
    p.add_argument("--grace-period", dest="grace_period", type=float, default=None,
                   help="seconds in-flight requests get on SIGTERM before they are aborted")
    p.add_argument("--max-body-mb", dest="max_body_mb", type=float, default=None,
                   help="largest accepted request body in MiB (413 above; 0: what --max-input-chars can use)")
    p.add_argument("--keep-alive", dest="keep_alive_s", type=int, default=None,
                   help="idle seconds before a kept-alive connection is closed")
    p.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=None,
                   help="seconds a connection has to send its request headers (then it is closed)")
    p.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=None,
                   help="seconds a request has to send its body (408 after)")
    p.add_argument("--max-input-chars", dest="max_input_chars", type=int, default=None,
                   help="characters of text in one request (0: context x the longest token)")
    p.add_argument("--max-message-chars", dest="max_message_chars", type=int, default=None,
                   help="characters of one message (0: --max-input-chars)")
    p.add_argument("--template-timeout", dest="template_timeout_s", type=float, default=None,
                   help="time budget of one chat-template render in seconds (400 after)")
    p.add_argument("--grammar-timeout", dest="grammar_timeout_s", type=float, default=None,
                   help="time budget to build and compile one grammar in seconds (400 after)")
    p.add_argument("--max-grammar-chars", dest="max_grammar_chars", type=int, default=None,
                   help="largest grammar text or JSON schema accepted")
    p.add_argument("--parse-special-in-content", dest="parse_special_in_content", action="store_const",
                   const=True, default=None,
                   help="let control-token text inside messages become control tokens (llama-server's behaviour)")
    p.add_argument("--no-webui", dest="no_webui", action="store_const", const=True, default=None,
                   help="do not serve the chat page at / (the API only)")
    p.add_argument("--reasoning-format", dest="reasoning_format", choices=("auto", "none", "deepseek"), default=None,
                   help="split <think>...</think> into reasoning_content: deepseek always, none never, "
                        "auto (default) when the chat template or the vocabulary has the tags")
    p.add_argument("--reasoning-budget", dest="reasoning_budget", type=int, default=None, metavar="N",
                   help="thinking tokens before the end tag is forced (-1, the default: unlimited)")
    p.add_argument("--gpu-memory-fraction", dest="gpu_memory_fraction", type=float, default=None,
                   help="CUDA: share of the free memory after the weights for the KV cache (default 0.85)")
    _add_sampling_args(p)
    _add_router_args(p)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling defaults (for requests that leave the field out)")
    g.add_argument("--temp", dest="temperature", type=float, default=None, help="temperature")
    g.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--top-k", dest="top_k", type=int, default=None, help="top-k (0: off)")
    g.add_argument("--min-p", dest="min_p", type=float, default=None, help="min-p")
    g.add_argument("--repeat-penalty", dest="repeat_penalty", type=float, default=None, help="repetition penalty")


def _add_router_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many models (no MODEL, or --models-dir / --models-preset)")
    g.add_argument("--models-dir", dest="models_dir", default=None, metavar="DIR",
                   help="serve every .gguf in DIR (split files as one model, subfolders as one model each)")
    g.add_argument("--models-preset", dest="models_preset", default=None, metavar="FILE",
                   help="TOML file: aliases and per-model settings (context, slots, KV, template, sampling)")
    g.add_argument("--models-max", dest="models_max", type=int, default=None, metavar="N",
                   help="models resident at once (default 4, 0: no limit); the least recently used idle one unloads")
    g.add_argument("--models-autoload", dest="models_autoload", action="store_const", const=True, default=None,
                   help="load a model on its first request (the default)")
    g.add_argument("--no-models-autoload", dest="models_autoload", action="store_const", const=False,
                   help="requests for a model not loaded get 400 until POST /models/load")
    g.add_argument("--sleep-idle-seconds", dest="sleep_idle_seconds", type=float, default=None, metavar="S",
                   help="unload a model after S idle seconds (0, the default: never)")
    g.add_argument("--models-wait", dest="models_wait_s", type=float, default=None, metavar="S",
                   help="seconds a request waits for its model to load or for room to load it (503 after)")
    g.add_argument("--models-load-timeout", dest="models_load_timeout_s", type=float, default=None, metavar="S",
                   help="a model still loading after S seconds is stopped and marked failed")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    cli = {k: v for k, v in vars(args).items() if k in fields}  # the main parser may add its own keys
    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            raise SettingsError("give the model either as MODEL or with -m, not both")
        cli["model"] = args.model_pos
    return load_settings(cli, config_file=args.config)


def serve_main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as e:
        print(f"llamatron serve: {e}", file=sys.stderr)
        return 2
    return run_server(settings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llamatron serve")
    add_serve_args(p)
    return serve_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
