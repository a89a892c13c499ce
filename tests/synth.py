"""Tiny synthetic GGUF models for fast tests: random weights, a real tokenizer.

`write_tiny_model(path, ...)` writes a 1-2 layer llama (or qwen2, qwen3, gemma3) model with gguf.GGUFWriter. The
tokenizer metadata (vocabulary, merges, special ids, chat template) is copied from a real GGUF file
(smollm2 by default), so the engine loads it exactly like a real model. Matrices are quantized with
gguf.quants.quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, F32); the K-quant types (Q2_K..Q6_K), which
gguf cannot quantize, get random blocks whose f16 scales are set to small finite values.

    from tests.synth import write_tiny_model
    path = write_tiny_model(tmp_path / "tiny.gguf", weight_type="Q4_1")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

SMOLLM2 = Path(os.path.expanduser("~/.cache/llamatron/smollm2-135m-instruct.gguf"))

# K-quants: byte offsets of the f16 super-block scales (d, and dmin where the type has one)
_KQUANT_SCALES = {
    "Q2_K": (84, (80, 82)),
    "Q3_K": (110, (108,)),
    "Q4_K": (144, (0, 2)),
    "Q5_K": (176, (0, 2)),
    "Q6_K": (210, (208,)),
}


def tokenizer_metadata(source: Path = SMOLLM2, vocab_size: int | None = None) -> dict:
    """The tokenizer.* keys of a real GGUF file; with `vocab_size`, a BPE vocabulary cut to its first
    tokens and the merges among them (still a working tokenizer: the byte tokens come first). A small
    vocabulary keeps the output matmul cheap where it dominates (the Triton interpreter)."""
    from engine.loading.gguf import read_metadata

    meta = {k: v for k, v in read_metadata(source).items() if k.startswith("tokenizer.")}
    if vocab_size is not None and vocab_size < len(meta["tokenizer.ggml.tokens"]):
        kept = set(meta["tokenizer.ggml.tokens"][:vocab_size])
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            if key in meta:
                meta[key] = meta[key][:vocab_size]
        if "tokenizer.ggml.merges" in meta:
            meta["tokenizer.ggml.merges"] = [
                m for m in meta["tokenizer.ggml.merges"]
                if all(part in kept for part in m.split(" ")) and m.replace(" ", "") in kept
            ]
    return meta


def _add_kv(w: GGUFWriter, key: str, val) -> None:
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        w.add_uint32(key, val)
    elif isinstance(val, float):
        w.add_float32(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    elif isinstance(val, list) and val:
        sub = {str: GGUFValueType.STRING, int: GGUFValueType.INT32, float: GGUFValueType.FLOAT32}[type(val[0])]
        w.add_key_value(key, val, GGUFValueType.ARRAY, sub_type=sub)


def _kquant_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    size, scale_offsets = _KQUANT_SCALES[name]
    if cols % 256:
        raise ValueError(f"{name} needs rows of a multiple of 256 values, got {cols}")
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for off in scale_offsets:
        scale = (rng.random(len(blocks)) * 2e-3 + 1e-4).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def _matrix(w: GGUFWriter, name: str, arr: np.ndarray, qtype: str, rng: np.random.Generator) -> None:
    t = GGMLQuantizationType[qtype]
    if qtype in _KQUANT_SCALES:
        w.add_tensor(name, _kquant_blocks(qtype, *arr.shape, rng), raw_dtype=t)
    elif qtype in ("F32", "F16"):
        w.add_tensor(name, arr.astype(np.float32 if qtype == "F32" else np.float16))
    else:
        w.add_tensor(name, quantize(arr.astype(np.float32), t), raw_dtype=t)


def write_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 128,
    context: int = 1024,
    weight_type: str = "Q8_0",
    embed_type: str | None = None,
    tied: bool = False,
    seed: int = 0,
    tokenizer_source: Path = SMOLLM2,
    vocab_size: int | None = None,
    split_max_tensors: int = 0,
) -> Path:
    """Writes the model and returns its path. Sizes must suit the quant type (32 or 256 per row).
    `split_max_tensors`: cut it as llama.cpp's gguf-split does (`<stem>-00001-of-0000N.gguf`, ...,
    the first part's path returned)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tok = tokenizer_metadata(tokenizer_source, vocab_size)
    vocab = len(tok["tokenizer.ggml.tokens"])
    head_dim = hidden // n_heads
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_string("general.name", f"tiny-{arch}-{weight_type.lower()}")
    for key, val in {
        "context_length": context, "embedding_length": hidden, "block_count": n_layers,
        "feed_forward_length": ffn, "attention.head_count": n_heads, "attention.head_count_kv": n_kv_heads,
        "rope.dimension_count": head_dim, "vocab_size": vocab,
    }.items():
        w.add_uint32(f"{arch}.{key}", val)
    if arch == "gemma3":
        w.add_uint32("gemma3.attention.sliding_window", 8)  # short: tiny prompts cross it
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    for key, val in tok.items():
        _add_kv(w, key, val)

    def mat(name: str, rows: int, cols: int, qtype: str = weight_type, std: float | None = None) -> None:
        std = std if std is not None else cols**-0.5
        _matrix(w, name, rng.normal(0, std, size=(rows, cols)), qtype, rng)

    def vec(name: str, n: int, mean: float = 1.0, std: float = 0.1) -> None:
        w.add_tensor(name, rng.normal(mean, std, size=n).astype(np.float32))

    mat("token_embd.weight", vocab, hidden, embed_type or weight_type, std=1.0)
    for i in range(n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", hidden)
        mat(p + "attn_q.weight", n_heads * head_dim, hidden)
        mat(p + "attn_k.weight", n_kv_heads * head_dim, hidden)
        mat(p + "attn_v.weight", n_kv_heads * head_dim, hidden)
        mat(p + "attn_output.weight", hidden, n_heads * head_dim)
        if arch == "qwen2":
            vec(p + "attn_q.bias", n_heads * head_dim, 0.0)
            vec(p + "attn_k.bias", n_kv_heads * head_dim, 0.0)
            vec(p + "attn_v.bias", n_kv_heads * head_dim, 0.0)
        if arch in ("qwen3", "gemma3"):
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        if arch == "gemma3":
            vec(p + "post_attention_norm.weight", hidden)
            vec(p + "post_ffw_norm.weight", hidden)
        vec(p + "ffn_norm.weight", hidden)
        mat(p + "ffn_gate.weight", ffn, hidden)
        mat(p + "ffn_up.weight", ffn, hidden)
        mat(p + "ffn_down.weight", hidden, ffn)
    vec("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0] if split_max_tensors else path


def load_tiny_model(folder: Path, weight_type: str = "Q8_0", max_model_len: int = 256):
    """A tiny synthetic model written into `folder` and loaded on the CPU (engine tests)."""
    from engine.config import EngineConfig
    from engine.loading.loader import load_model

    path = write_tiny_model(folder / "tiny.gguf", weight_type=weight_type)
    return load_model(EngineConfig(model=str(path), device="cpu", max_model_len=max_model_len))


def write_tiny_hf_folder(folder: Path, dtype: str = "f32", shard_mb: float = 5000, **kw) -> Path:
    """A tiny Hugging Face folder: a tiny GGUF (write_tiny_model's `kw`) through `llamatron convert`."""
    from engine.loading.convert import convert

    folder.mkdir(parents=True, exist_ok=True)
    gguf = write_tiny_model(folder / "tiny.gguf", **kw)
    return convert(gguf, folder / "hf", dtype=dtype, shard_mb=shard_mb, overwrite=True)


def make_engine(loaded, num_blocks: int = 64, **kw):
    """An LLMEngine on a loaded model (no CUDA graphs), `num_blocks` KV blocks, EngineConfig fields in kw."""
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine

    kw.setdefault("max_model_len", 256)
    return LLMEngine(EngineConfig(model=str(loaded.path), device="cpu", cuda_graphs=False, **kw), loaded,
                     num_blocks=num_blocks)
