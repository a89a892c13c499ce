"""`llamatron convert`: a GGUF file -> a Hugging Face model folder (dequantized weights).

The folder is a checkpoint `transformers` loads as it is: config.json in its keys,
model.safetensors (or shards + model.safetensors.index.json) under its tensor names,
tokenizer.json, tokenizer_config.json (chat template, special tokens), generation_config.json.
What GGUF does differently is undone here:
- llama Q/K rows: llama.cpp's converter permutes them for adjacent-pair rotation; HF keeps the
  split-halves layout, so the permutation is reversed (engine/loading/hf_config.py then runs HF
  llama with rope_neox);
- gemma's norm weights: GGUF stores w ready to multiply, HF stores w - 1 (it multiplies by 1 + w);
- the tokenizer: tokenizer.json is the one our GGUF builder makes (engine/text/tokenizer.py), so
  token ids are identical by construction, plus a post-processor that adds BOS where llama.cpp does.
Weights are dequantized exactly to fp32, then stored as `dtype` (bf16 by default, as HF ships them).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..text.tokenizer import Tokenizer
from .gguf import GGUFFile
from .hf_names import gguf_to_hf, is_norm
from .safetensors_file import INDEX, SINGLE

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_TORCH_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
         "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}


def hf_config(cfg: ModelConfig, tok: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for a decoder, in the keys transformers reads for its architecture."""
    cls, model_type = _ARCH[cfg.arch]
    out: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_base,
        "rope_scaling": None, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tied_embeddings,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "torch_dtype": _TORCH_NAMES[dtype],
        "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if cfg.arch == "gemma3":
        out |= {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": round(cfg.scale ** -2, 6),
                "sliding_window": cfg.sliding_window, "sliding_window_pattern": cfg.sliding_window_pattern,
                "layer_types": ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention"
                                for i in range(cfg.n_layers)],
                "rope_local_base_freq": cfg.rope_base_local, "final_logit_softcapping": cfg.final_softcap or None,
                "attn_logit_softcapping": cfg.attn_softcap or None}
    else:
        out |= {"hidden_act": "silu", "mlp_bias": False}
    if cfg.arch == "qwen2":
        out |= {"use_sliding_window": False, "sliding_window": cfg.context_length, "max_window_layers": cfg.n_layers}
    return out


def tokenizer_files(tok: Tokenizer, meta: dict[str, Any], context: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json, generation_config.json) for a GGUF vocabulary."""
    from tokenizers import processors

    hf = Tokenizer.from_gguf_metadata(meta).hf  # a fresh copy: the post-processor is only for transformers
    if tok.add_bos:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A {tok.bos_token} $B",
            special_tokens=[(tok.bos_token, tok.bos_id)])
    template = meta.get("tokenizer.chat_template")
    tool = meta.get("tokenizer.chat_template.tool_use")
    name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos,
        "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
        "unk_token": name(meta.get("tokenizer.ggml.unknown_token_id")),
        "clean_up_tokenization_spaces": tok.clean_up_spaces, "model_max_length": context,
        "chat_template": ([{"name": "default", "template": template}, {"name": "tool_use", "template": tool}]
                          if tool else template),
    }
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    return hf.to_str(), {k: v for k, v in config.items() if v is not None}, generation


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reverses llama.cpp's Q/K row permutation (adjacent pairs back to split halves per head)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor(g: GGUFFile, cfg: ModelConfig, name: str, dtype: torch.dtype) -> torch.Tensor:
    from kernels.ref_quant import dequantize

    qt = g.tensor(name)
    w = dequantize(qt.data, qt.ggml_type, qt.shape)
    if cfg.arch == "llama" and ".attn_q." in name:
        w = _unpermute(w, cfg.n_heads)
    elif cfg.arch == "llama" and ".attn_k." in name:
        w = _unpermute(w, cfg.n_kv_heads)
    if cfg.arch == "gemma3" and is_norm(name):
        w = w - 1.0
    return w.to(dtype).contiguous()


def _shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Tensors in file order grouped into shards of at most `limit` bytes (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if groups[-1] and used + n > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    return groups


def convert(gguf_path: str | Path, out: str | Path, dtype: str = "bf16", shard_mb: float = 5000,
            overwrite: bool = False) -> Path:
    """Writes the folder `out` (which must not exist unless `overwrite`); returns its path."""
    from safetensors.torch import save_file

    out, dt = Path(out), DTYPES[dtype]
    g = GGUFFile(gguf_path)
    cfg = ModelConfig.from_gguf(g.metadata, set(g.tensors))
    g.check_types()
    tok = Tokenizer.from_gguf_metadata(g.metadata)
    names = {n: gguf_to_hf(cfg.arch, n) for n in g.tensors}
    unknown = [n for n, h in names.items() if h is None]
    if unknown:
        raise ValueError(f"{g.path.name}: no Hugging Face name for {', '.join(unknown[:5])}")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (--overwrite replaces it)")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = [(n, math.prod(g.tensors[n].shape) * dt.itemsize) for n in g.tensors]
    groups = _shards(sizes, int(shard_mb * 2**20))
    weight_map = {}
    for k, group in enumerate(groups):
        fname = SINGLE if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({names[n]: hf_tensor(g, cfg, n, dt) for n in group}, str(tmp / fname), metadata={"format": "pt"})
        g.release_pages()
        weight_map |= {names[n]: fname for n in group}
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    tj, tc, gen = tokenizer_files(tok, g.metadata, cfg.context_length)
    (tmp / "tokenizer.json").write_text(tj, encoding="utf-8")
    for fname, data in (("config.json", hf_config(cfg, tok, dt)), ("tokenizer_config.json", tc),
                        ("generation_config.json", gen)):
        (tmp / fname).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.rename(out)
    return out
