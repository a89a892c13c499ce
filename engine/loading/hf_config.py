"""config.json of a Hugging Face checkpoint -> ModelConfig, the same fields the GGUF path fills.

Supported: llama, qwen2, qwen3 and gemma3 decoders, and the BERT encoder family (embeddings).
Everything is checked before a weight is read: an unknown `architectures` entry, a rope scaling
we do not implement or a missing field is an UnsupportedModelError naming config.json.

Conventions that differ from GGUF: HF llama checkpoints keep Q/K rows in the split-halves rotary
layout (GGUF permutes them for adjacent pairs), so HF llama runs with `rope_neox=True`; gemma's
norm weights are stored as w - 1 (engine/loading/hf_weights.py adds the 1 back).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..config import ModelConfig, UnsupportedModelError

# `architectures[0]` -> our arch name
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "BertModel": "bert", "BertForMaskedLM": "bert", "BertForPreTraining": "bert",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu": "gelu"}
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise UnsupportedModelError(f"{path}: missing (a Hugging Face model folder needs it)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path}: expected a JSON object")
    return data


def hf_arch(config: dict[str, Any], path: Path) -> str:
    archs = config.get("architectures") or []
    arch = ARCHITECTURES.get(archs[0]) if archs else None
    if arch is None:
        raise UnsupportedModelError(
            f"{path}: unsupported architecture {archs[0] if archs else config.get('model_type')!r}; "
            f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def _rope_freq_factors(rs: dict[str, Any], base: float, rot: int, path: Path) -> tuple[float, ...] | None:
    """Per-frequency divisors of the rotary angles (llama.cpp's rope_freqs) for `rope_scaling`."""
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return (float(rs["factor"]),) * (rot // 2)
    if kind == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        out = []
        for i in range(0, rot, 2):
            wavelen = 2 * math.pi * base ** (i / rot)
            if wavelen < old / hi:
                out.append(1.0)
            elif wavelen > old / lo:
                out.append(factor)
            else:  # the smooth band between the two
                s = (old / wavelen - lo) / (hi - lo)
                out.append(1.0 / ((1 - s) / factor + s))
        return tuple(out)
    raise UnsupportedModelError(f"{path}: rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


def _pooling(folder: Path) -> str | None:
    """The sentence-transformers pooling of `1_Pooling/config.json`, if the folder has one."""
    cfg = read_json(folder / "1_Pooling" / "config.json", required=False)
    if not cfg:
        return None
    modes = [v for k, v in POOLING_MODES.items() if cfg.get(k)]
    other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in POOLING_MODES]
    if other or len(modes) != 1:
        raise UnsupportedModelError(f"{folder / '1_Pooling' / 'config.json'}: pooling {other or modes} is not "
                                    f"supported (one of cls, mean, lasttoken)")
    return modes[0]


def _bert(c: dict[str, Any], folder: Path, get: Any) -> ModelConfig:
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"{folder / 'config.json'}: position_embedding_type "
                                    f"{c['position_embedding_type']!r} is not supported (absolute is)")
    positions = int(get("max_position_embeddings"))
    # sentence-transformers' max_seq_length is the model's context (vLLM reads it the same way)
    st = read_json(folder / "sentence_bert_config.json", required=False)
    context = min(positions, int(st.get("max_seq_length") or positions))
    return ModelConfig(
        arch="bert", name=folder.name, vocab_size=int(get("vocab_size")), hidden_size=hidden,
        n_layers=int(get("num_hidden_layers")), n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(get("intermediate_size")), context_length=context,
        rms_eps=float(c.get("layer_norm_eps", 1e-12)), rope_base=0.0, rope_dim=0, rope_neox=False,
        activation=ACTIVATIONS.get(c.get("hidden_act", "gelu"), "?"), encoder=True, max_positions=positions,
        type_vocab_size=int(c.get("type_vocab_size", 2)), format="safetensors")


def config_from_hf(folder: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (config.json, 1_Pooling/config.json)."""
    path = folder / "config.json"
    c = read_json(path)
    arch = hf_arch(c, path)

    def get(key: str) -> Any:
        if c.get(key) is None:
            raise UnsupportedModelError(f"{path}: lacks {key!r}")
        return c[key]

    if arch == "bert":
        cfg = _bert(c, folder, get)
    else:
        cfg = _decoder(c, arch, path, get)
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if ACTIVATIONS.get(act) != cfg.activation:
        raise UnsupportedModelError(f"{path}: activation {act!r} is not supported for {arch}")
    pooling = _pooling(folder)
    if pooling:
        cfg.pooling = pooling
    return cfg


def _decoder(c: dict[str, Any], arch: str, path: Path, get: Any) -> ModelConfig:
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = int(c.get("head_dim") or hidden // heads)
    # transformers 5 moved rope_theta/rope_scaling into rope_parameters (per layer type for gemma3)
    params = c.get("rope_parameters") or {}
    local = params.get("sliding_attention") or {}
    params = params.get("full_attention", params)
    base = float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)
    gemma = arch == "gemma3"
    cfg = ModelConfig(
        arch=arch, name=path.parent.name, vocab_size=int(get("vocab_size")), hidden_size=hidden,
        n_layers=int(get("num_hidden_layers")), n_heads=heads,
        n_kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(get("intermediate_size")), context_length=int(c.get("max_position_embeddings", 2048)),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_base=base, rope_dim=head_dim, rope_neox=True,
        qkv_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "gemma3"),
        tied_embeddings=bool(c.get("tie_word_embeddings", gemma)), format="safetensors",
        activation="gelu_tanh" if gemma else "silu",
    )
    if arch != "qwen2" and (c.get("attention_bias") or c.get("mlp_bias")):  # o_proj / MLP biases: not in the decoder
        raise UnsupportedModelError(f"{path}: attention_bias / mlp_bias are not supported for {arch}")
    if not gemma and c.get("use_sliding_window"):  # qwen2's optional window (off in every release)
        raise UnsupportedModelError(f"{path}: use_sliding_window is only supported for gemma3")
    cfg.rope_freq_factors = _rope_freq_factors(c.get("rope_scaling") or params, base, head_dim, path)
    if gemma:
        cfg.post_norms = True
        cfg.embed_scale = math.sqrt(hidden)
        cfg.sliding_window = int(c.get("sliding_window") or 0)
        cfg.sliding_window_pattern = _sliding_pattern(c, path)
        cfg.rope_base_local = float(c.get("rope_local_base_freq") or local.get("rope_theta") or 10000.0)
        cfg.attn_scale = float(c.get("query_pre_attn_scalar") or head_dim) ** -0.5
        cfg.attn_softcap = float(c.get("attn_logit_softcapping") or 0.0)
        cfg.final_softcap = float(c.get("final_logit_softcapping") or 0.0)
    return cfg


def _sliding_pattern(c: dict[str, Any], path: Path) -> int:
    """Gemma3's every-Nth-layer-global pattern, from `sliding_window_pattern` or `layer_types`."""
    types = c.get("layer_types")
    if not types:
        return int(c.get("sliding_window_pattern") or 6)
    glob = [i for i, t in enumerate(types) if t != "sliding_attention"]
    n = glob[0] + 1 if glob else len(types) + 1
    if glob != [i for i in range(len(types)) if (i + 1) % n == 0]:
        raise UnsupportedModelError(f"{path}: layer_types do not follow an every-Nth-layer-global pattern")
    return n
