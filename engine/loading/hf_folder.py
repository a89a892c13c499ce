"""A Hugging Face model folder opened for loading: config, weights (still on disk), tokenizer, template.

The folder holds config.json, model.safetensors (or shards and model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (chat template, special tokens) and optionally
generation_config.json (EOS/stop ids), chat_template.jinja and 1_Pooling/config.json
(sentence-transformers pooling). Everything is read and checked here, before any weight is:
the architecture, every header, the names and dtypes of the tensors the model needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..text.chat import ChatTemplate
from ..text.hf_tokenizer import from_hf_files
from ..text.tokenizer import Tokenizer
from .hf_config import config_from_hf, read_json
from .hf_weights import HFWeights
from .safetensors_file import CheckpointError, SafetensorsCheckpoint


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclass
class HFFolder:
    path: Path
    config: ModelConfig
    checkpoint: SafetensorsCheckpoint
    tokenizer: Tokenizer
    chat_template: ChatTemplate

    def weights(self, quant_type: int | None) -> HFWeights:
        """The checkpoint under GGUF names; matrices quantized to `quant_type` as they are read."""
        return HFWeights(self.checkpoint, self.config, quant_type)


def required_tensors(cfg: ModelConfig) -> list[str]:
    from ..encoder import required_tensors as encoder_tensors
    from ..model import required_tensors as decoder_tensors

    return encoder_tensors(cfg) if cfg.encoder else decoder_tensors(cfg)


def _templates(folder: Path, tc: dict[str, Any]) -> tuple[str | None, str | None]:
    """(default template, tool_use template): tokenizer_config's `chat_template` (a string or a
    list of named templates), else chat_template.jinja."""
    src = tc.get("chat_template")
    if isinstance(src, list):
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        return named.get("default"), named.get("tool_use")
    if src is None and (folder / "chat_template.jinja").is_file():
        src = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return src, None


def chat_template(folder: Path, tc: dict[str, Any], tok: Tokenizer, override: str | None) -> ChatTemplate:
    """The folder's template, built the way the GGUF path builds one (same bos/eos handling)."""
    src, tool = _templates(folder, tc)
    meta = {"tokenizer.ggml.tokens": [tok.id_to_token(i) for i in range(tok.vocab_size)],
            "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
            "tokenizer.ggml.add_bos_token": tok.add_bos, "tokenizer.ggml.add_eos_token": tok.add_eos,
            "tokenizer.chat_template": src, "tokenizer.chat_template.tool_use": tool}
    return ChatTemplate.from_gguf_metadata(meta, override)


def open_hf_folder(folder: Path, chat_template_override: str | None = None) -> HFFolder:
    cfg = config_from_hf(folder)
    ckpt = SafetensorsCheckpoint(folder)
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise CheckpointError(f"{tj}: missing (llamatron reads the fast tokenizer's tokenizer.json)")
    tc = read_json(folder / "tokenizer_config.json", required=False)
    gen = read_json(folder / "generation_config.json", required=False)
    try:
        tok = from_hf_files(tj.read_text(encoding="utf-8"), tc, gen, cfg.vocab_size)
    except Exception as e:  # tokenizers raises plain Exceptions for a file it cannot parse
        raise CheckpointError(f"{tj}: cannot be loaded: {e}") from None
    weights = HFWeights(ckpt, cfg)
    weights.check_names(required_tensors(cfg))
    weights.check_types()
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tj}: {tok.vocab_size} tokens but config.json has vocab_size {cfg.vocab_size}")
    return HFFolder(folder, cfg, ckpt, tok, chat_template(folder, tc, tok, chat_template_override))
