"""Tensor names: Hugging Face checkpoints <-> the GGUF names engine/model.py reads.

One table per architecture family, used in both directions: the safetensors loader renames a
checkpoint's tensors to GGUF names (so the one decoder definition reads both formats), and
`llamatron convert` renames a GGUF file's tensors to a checkpoint's. `{i}` is the layer index.
"""

from __future__ import annotations

import re

_COMMON = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# llama / qwen: one norm before the MLP; gemma: norms around both the attention and the MLP
_PRE_FFN = {"blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight"}
_GEMMA = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# BERT under llama.cpp's GGUF names for it (post-norms with biases, learned positions)
_BERT = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
    **{f"blk.{{i}}.attn_{g}.{p}": f"encoder.layer.{{i}}.attention.self.{h}.{p}"
       for g, h in (("q", "query"), ("k", "key"), ("v", "value")) for p in ("weight", "bias")},
    "blk.{i}.attn_output.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "blk.{i}.attn_output.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "blk.{i}.attn_output_norm.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "blk.{i}.attn_output_norm.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "blk.{i}.ffn_up.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "blk.{i}.ffn_up.bias": "encoder.layer.{i}.intermediate.dense.bias",
    "blk.{i}.ffn_down.weight": "encoder.layer.{i}.output.dense.weight",
    "blk.{i}.ffn_down.bias": "encoder.layer.{i}.output.dense.bias",
    "blk.{i}.layer_output_norm.weight": "encoder.layer.{i}.output.LayerNorm.weight",
    "blk.{i}.layer_output_norm.bias": "encoder.layer.{i}.output.LayerNorm.bias",
}
TABLES: dict[str, dict[str, str]] = {
    "llama": _COMMON | _PRE_FFN, "qwen2": _COMMON | _PRE_FFN, "qwen3": _COMMON | _PRE_FFN,
    "gemma3": _COMMON | _GEMMA, "bert": _BERT,
}
# prefixes of task-head checkpoints (BertForMaskedLM keeps the encoder under "bert.")
_PREFIXES = ("bert.",)


def _compile(table: dict[str, str], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for g, h in table.items():
        src, dst = (h, g) if reverse else (g, h)
        out.append((re.compile(re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst))
    return out


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pat, dst in rules:
        m = pat.match(name)
        if m:
            return dst.replace("{i}", m.group(1)) if m.groups() else dst
    return None


def hf_to_gguf(arch: str, names: list[str]) -> dict[str, str]:
    """GGUF name -> checkpoint name for every checkpoint tensor the decoder knows (others are
    left out: rotary buffers, a vision tower's weights)."""
    rules = _compile(TABLES[arch], reverse=True)
    out = {}
    for n in names:
        bare = next((n[len(p):] for p in _PREFIXES if n.startswith(p)), n)
        g = _rename(bare, rules)
        if g is not None:
            out[g] = n
    return out


def gguf_to_hf(arch: str, name: str) -> str | None:
    return _rename(name, _compile(TABLES[arch], reverse=False))


def is_norm(gguf_name: str) -> bool:
    """The RMSNorm weights (gemma stores them as w - 1 in checkpoints, ready to multiply in GGUF)."""
    return gguf_name.endswith("norm.weight")
