"""What a model is, read from its headers alone: the facts `/v1/models` and `llamatron models`
show for a model that is not loaded (size, context, parameters, quantization), for a GGUF file
(or a split one) and for a Hugging Face folder (config.json and the safetensors headers).

No tensor data is read and torch is not imported: the model router describes every model of a
folder at start-up, in its own lean process, and a broken file shows up as an error here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gguf import GGML_TYPES, GGUFFile, tensor_nbytes

# llama.cpp's llama_vocab_type by tokenizer.ggml.model
VOCAB_TYPES = {"llama": 1, "gpt2": 2, "bert": 3, "t5": 4, "rwkv": 5}


@dataclass(frozen=True)
class ModelInfo:
    format: str  # "gguf" or "safetensors"
    arch: str
    name: str
    size: int  # bytes on disk (all parts)
    tensor_bytes: int  # the weights alone (llama-server's `meta.size`)
    n_params: int
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layers: int
    ftype: str  # llama.cpp's file type name ("Q4_1", "Q4_K_M", ...) or a folder's dtype ("BF16"); "": unknown
    vocab_type: int
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ftype_name(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return str(value)


# tokenizer.json `model.type` -> llama.cpp's vocab type
HF_VOCAB_TYPES = {"BPE": 2, "WordPiece": 3, "Unigram": 4}


def describe(path: str | Path) -> ModelInfo:
    """The header facts of a GGUF model (a split model: all its parts) or a Hugging Face folder.
    Raises a ValueError (GGUFError, CheckpointError, UnsupportedModelError) naming the file."""
    if Path(path).is_dir():
        return _describe_folder(Path(path))
    g = GGUFFile(path)
    meta = g.metadata
    arch = str(meta.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)
        return int(max(v) if isinstance(v, list) else v)

    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in g.tensors.values())
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    return ModelInfo(
        format="gguf", arch=arch, name=str(meta.get("general.name", g.path.stem)),
        size=sum(p.stat().st_size for p in g.paths),
        tensor_bytes=sum(tensor_nbytes(t) for t in g.tensors.values() if t.ggml_type in GGML_TYPES), n_params=n_params, n_vocab=int(vocab),
        n_ctx_train=num("context_length"), n_embd=num("embedding_length"), n_layers=num("block_count"),
        ftype=_ftype_name(meta.get("general.file_type")),
        vocab_type=VOCAB_TYPES.get(str(meta.get("tokenizer.ggml.model", "")), 0),
        files=tuple(str(p) for p in g.paths))


def _describe_folder(folder: Path) -> ModelInfo:
    import json

    from .hf_config import config_from_hf
    from .safetensors_file import SafetensorsCheckpoint

    cfg = config_from_hf(folder)
    ckpt = SafetensorsCheckpoint(folder)
    by_dtype: dict[str, int] = {}
    for t in ckpt.tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    files = sorted({t.file for t in ckpt.tensors.values()})
    try:
        kind = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        kind = ""
    return ModelInfo(
        format="safetensors", arch=cfg.arch, name=folder.name, size=sum(f.stat().st_size for f in files),
        tensor_bytes=sum(by_dtype.values()), n_params=sum(int(np.prod(t.shape, dtype=np.int64))
                                                          for t in ckpt.tensors.values()),
        n_vocab=cfg.vocab_size, n_ctx_train=cfg.context_length, n_embd=cfg.hidden_size, n_layers=cfg.n_layers,
        ftype=max(by_dtype, key=by_dtype.get) if by_dtype else "", vocab_type=HF_VOCAB_TYPES.get(kind, 0),
        files=tuple(str(f) for f in files))
