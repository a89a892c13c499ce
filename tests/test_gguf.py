"""GGUF reading, config extraction and clear errors for what we cannot run."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from engine.config import ModelConfig, UnsupportedModelError
from engine.loading.gguf import GGUFError, GGUFFile, read_metadata
from engine.model import check_tensors


def _write(path, arch: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_context_length(128)
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_smollm2_config(smollm2_path):
    g = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(g.metadata, set(g.tensors))
    assert (cfg.arch, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        "llama", 30, 576, 9, 3, 64)
    assert cfg.rope_base == 100000.0 and not cfg.rope_neox and cfg.tied_embeddings
    check_tensors(g, cfg)
    t = g.tensor("blk.0.ffn_down.weight")
    assert t.shape == (576, 1536) and t.type_name == "Q4_1" and t.data.shape == (576, 1536 // 32 * 20)


def test_gemma3_config(gemma3_path):
    g = GGUFFile(gemma3_path)
    cfg = ModelConfig.from_gguf(g.metadata, set(g.tensors))
    assert cfg.arch == "gemma3" and cfg.qk_norm and cfg.post_norms and cfg.activation == "gelu_tanh"
    assert cfg.sliding_window == 512 and cfg.rope_base_local == 10000.0 and cfg.rope_neox
    assert [cfg.layer_is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert cfg.head_dim == 256 and cfg.tied_embeddings
    check_tensors(g, cfg)


def test_metadata_is_fast(smollm2_path):
    import time

    t0 = time.perf_counter()
    meta = read_metadata(smollm2_path)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert time.perf_counter() - t0 < 1.0  # gguf.GGUFReader takes ~2 s here


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    _write(p, "mamba", {"token_embd.weight": (np.zeros((4, 64), np.float32), None)})
    with pytest.raises(UnsupportedModelError, match="mamba"):
        ModelConfig.from_gguf(read_metadata(p))


def test_unsupported_tensor_type_named_before_reading(tmp_path):
    p = tmp_path / "iq.gguf"
    # IQ4_NL: 18-byte blocks of 32 -> a [4, 64] tensor is 4 rows of 36 bytes
    raw = np.zeros((4, 36), np.uint8)
    _write(p, "llama", {"blk.0.attn_q.weight": (raw, GGMLQuantizationType.IQ4_NL)})
    g = GGUFFile(p)
    with pytest.raises(GGUFError, match="IQ4_NL") as e:
        g.check_types()
    assert "blk.0.attn_q.weight" in str(e.value)
    assert g._mm is None  # no weight was mapped


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(GGUFError, match="not a GGUF"):
        GGUFFile(p)
