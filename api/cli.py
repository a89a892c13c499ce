"""`llamatron serve|generate|pull|models|convert|loadtest`."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _cmd_pull(args: argparse.Namespace) -> int:
    from engine.loading.registry import RegistryError, pull

    try:
        path = pull(args.name, quiet=args.quiet)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine, check_generates
    from engine.core.sampling import SamplingParams

    cfg = EngineConfig(model=args.model, device=args.device, max_num_seqs=1, chat_template=args.chat_template,
                       cpu_weights=args.cpu_weights, threads=args.threads, quantize=args.quantize)
    if args.ctx_size:
        cfg.max_model_len = args.ctx_size
    try:
        engine = LLMEngine(cfg)
        check_generates(engine.model_config)
    except ValueError as e:  # a model we cannot read or run: its message, not a traceback
        print(f"llamatron generate: {e}", file=sys.stderr)
        return 1
    prompt = args.prompt
    if args.chat:
        prompt = engine.loaded.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = engine.loaded.tokenizer.encode(prompt, add_special=True, parse_special=args.chat)
    params = SamplingParams(max_tokens=args.n_predict, temperature=args.temp, seed=args.seed,
                            top_k=args.top_k, top_p=args.top_p)
    t0 = time.monotonic()
    result = engine.generate([ids], params)[0]
    dt = time.monotonic() - t0
    print(result.text)
    n = len(result.token_ids)
    print(f"\n[{len(ids)} prompt tokens, {n} generated in {dt:.2f} s: {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from engine.loading.convert import convert
    from engine.loading.registry import RegistryError, resolve

    try:
        path = resolve(args.model)
        if path.is_dir():
            raise ValueError(f"{path} is already a Hugging Face folder; convert reads a GGUF file")
        out = convert(path, args.out or f"{path.stem}-hf", dtype=args.dtype, shard_mb=args.shard_mb,
                      overwrite=args.overwrite)
    except (RegistryError, ValueError, OSError) as e:
        print(f"llamatron convert: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from llamatron_tools.loadtest import main as loadtest_main

    return loadtest_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamatron", description="GGUF inference server (OpenAI API)")
    sub = p.add_subparsers(dest="cmd", required=True)

    try:
        from api.cli_serve import add_serve_args, serve_main
    except ImportError:  # the server module is optional for the offline commands
        add_serve_args = serve_main = None
    if add_serve_args is not None:
        s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI + llama-server API)")
        add_serve_args(s)
        s.set_defaults(func=serve_main)

    g = sub.add_parser("generate", help="print a continuation of a prompt")
    g.add_argument("model_pos", nargs="?", metavar="MODEL")
    g.add_argument("-m", "--model", default=None, help="registry name, .gguf file or Hugging Face model folder")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--n-predict", type=int, default=64)
    g.add_argument("--temp", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    g.add_argument("--chat-template", default=None, help="file overriding the model's template")
    g.add_argument("-c", "--ctx-size", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--cpu-weights", default="auto", choices=["auto", "exact"])
    g.add_argument("-t", "--threads", type=int, default=0, help="CPU kernel threads (0: all cores)")
    g.add_argument("--quantize", default="", choices=["none", "q8_0", "q4_k"],
                   help="Hugging Face folders: quantize float weights at load (default: bf16 on a GPU, q8_0 on CPU)")
    g.set_defaults(func=_cmd_generate)

    cv = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder (safetensors, dequantized)")
    cv.add_argument("model", help="registry name or path to a .gguf file")
    cv.add_argument("-o", "--out", default=None, help="output folder (default: <model file stem>-hf)")
    cv.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="stored weight type")
    cv.add_argument("--shard-mb", dest="shard_mb", type=float, default=5000,
                    help="largest safetensors shard in MiB (more: model-0000N-of-0000M + index)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cv.set_defaults(func=_cmd_convert)

    pl = sub.add_parser("pull", help="download and verify a registry model")
    pl.add_argument("name")
    pl.add_argument("-q", "--quiet", action="store_true")
    pl.set_defaults(func=_cmd_pull)

    from api.cli_models import add_models_args, models_main

    m = sub.add_parser("models", help="the models a server would serve (or, with --base-url, serves and holds)")
    add_models_args(m)
    m.set_defaults(func=models_main)

    lt = sub.add_parser("loadtest", help="load-test any OpenAI-compatible server (llamatron_tools/loadtest.py)",
                        add_help=False)
    lt.add_argument("rest", nargs=argparse.REMAINDER)
    lt.set_defaults(func=_cmd_loadtest)

    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:  # its own parser owns every flag, --help included
        from llamatron_tools.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = (getattr(args, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "cmd", None) == "generate":
        from engine.loading.registry import load_registry

        args.model = args.model or args.model_pos or load_registry()[0]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
