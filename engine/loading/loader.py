"""Load everything one engine needs from a GGUF file or a Hugging Face folder: config, weights on
the device, tokenizer, chat template. Registry names and paths are both accepted.

A folder (config.json + safetensors) goes through engine/loading/hf_folder.py and reaches the same
decoder (engine/model.py) with its tensors renamed to GGUF names, or the encoder
(engine/encoder.py) for BERT-family embedding models. Its float weights are used as they are
(bf16 on a GPU, fp32 with `--cpu-weights exact`) or quantized at load into GGUF blocks: with
`--quantize q8_0|q4_k`, and to Q8_0 by default on the CPU kernels (see `quant_type`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import Ops, backend

from ..config import EngineConfig, ModelConfig
from ..encoder import Encoder
from ..model import Model, check_tensors
from ..text.chat import ChatTemplate
from ..text.tokenizer import Tokenizer
from .gguf import GGUFFile
from .hf_folder import is_hf_folder, open_hf_folder
from .quantize import QUANTIZE_TYPES
from .registry import resolve

log = logging.getLogger("llamatron.loader")

CPU_DEFAULT_MAX_LEN = 8192
QUANTIZE_CHOICES = ("", "none", *QUANTIZE_TYPES)


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: Model | Encoder
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    ops: Ops
    load_seconds: float = 0.0

    @property
    def format(self) -> str:
        """"gguf" or "safetensors" (a Hugging Face folder)."""
        return self.config.format


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


def quant_type(quantize: str, ops: Ops, mcfg: ModelConfig) -> int | None:
    """The GGUF type float checkpoint matrices are quantized to at load, None to keep them.
    Default: Q8_0 for decoders on the CPU kernels (they multiply quantized planes; dense fp32 would
    be twice a bf16 file's size and several times slower), else as stored: bf16 on a GPU, fp32 for
    `--cpu-weights exact`, and encoders everywhere (small, and embeddings should match the
    reference model's closely)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of none, {', '.join(QUANTIZE_TYPES)}, not {quantize!r}")
    if quantize == "":
        quantize = "q8_0" if ops.name == "cpu" and not mcfg.encoder else "none"
    return QUANTIZE_TYPES.get(quantize)


def load_model(cfg: EngineConfig) -> LoadedModel:
    """Reads metadata and checks support before touching any weight (clear errors, fast failures)."""
    t0 = time.monotonic()
    path = resolve(cfg.model)
    folder = open_hf_folder(path, cfg.chat_template) if is_hf_folder(path) else None
    if folder is not None:
        mcfg, tokenizer, template = folder.config, folder.tokenizer, folder.chat_template
    else:
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
    model: Model | Encoder
    if folder is not None:
        weights = folder.weights(quant_type(cfg.quantize, ops, mcfg))
        if mcfg.encoder:
            model = Encoder.from_weights(weights, mcfg, ops)
        else:
            model = Model.from_gguf(weights, mcfg, ops, cfg.max_model_len)
        weights.release_pages()
    else:
        model = Model.from_gguf(gguf, mcfg, ops, cfg.max_model_len)
        gguf.release_pages()
    dt = time.monotonic() - t0
    log.info("loaded %s (%s, %s, %d layers) on %s in %.1f s", path.name, mcfg.arch, mcfg.format, mcfg.n_layers,
             device, dt)
    return LoadedModel(path, mcfg, model, tokenizer, template, ops, dt)
