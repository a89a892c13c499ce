"""Load everything one engine needs from a GGUF file: config, weights on the device, tokenizer,
chat template. Registry names and paths are both accepted."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import Ops, backend

from ..text.chat import ChatTemplate
from ..config import EngineConfig, ModelConfig
from .gguf import GGUFFile
from ..model import Model, check_tensors
from .registry import resolve
from ..text.tokenizer import Tokenizer

log = logging.getLogger("llamatron.loader")

CPU_DEFAULT_MAX_LEN = 8192


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Model
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    ops: Ops
    load_seconds: float = 0.0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return device


def resolve_max_len(cfg: EngineConfig, mcfg: ModelConfig, device: str) -> int:
    if cfg.max_model_len > 0:
        return min(cfg.max_model_len, mcfg.context_length)
    return mcfg.context_length if device != "cpu" else min(mcfg.context_length, CPU_DEFAULT_MAX_LEN)


def load_model(cfg: EngineConfig) -> LoadedModel:
    """Reads metadata and checks support before touching any weight (clear errors, fast failures)."""
    t0 = time.monotonic()
    path = resolve(cfg.model)
    gguf = GGUFFile(path)
    mcfg = ModelConfig.from_gguf(gguf.metadata, set(gguf.tensors))
    gguf.check_types()
    check_tensors(gguf, mcfg)
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    template = ChatTemplate.from_gguf_metadata(gguf.metadata, cfg.chat_template)
    device = resolve_device(cfg.device)
    cfg.device = device
    cfg.max_model_len = resolve_max_len(cfg, mcfg, device)
    ops = backend(device, cfg.cpu_weights, cfg.threads)
    model = Model.from_gguf(gguf, mcfg, ops, cfg.max_model_len)
    gguf.release_pages()
    dt = time.monotonic() - t0
    log.info("loaded %s (%s, %d layers) on %s in %.1f s", path.name, mcfg.arch, mcfg.n_layers, device, dt)
    return LoadedModel(path, mcfg, model, tokenizer, template, ops, dt)
