"""The encoder of BERT-family embedding models (all-MiniLM-L6-v2 and kin), for /v1/embeddings.

A separate forward beside engine/model.py's decoder rather than more branches inside it: the two
share the op set, the weight loading and the engine, but almost no layer structure. BERT sums
learned absolute position and token-type embeddings into the word embedding (no RoPE), normalizes
*after* each residual add with LayerNorm that has a bias, runs an ungated erf-GELU MLP with biases
everywhere, and attends bidirectionally. Folding that into the decoder would put a branch on
every line of it.

Bidirectional attention needs each input whole in one step (a later token changes every earlier
token's state), so the engine schedules encoder inputs unchunked (engine/core/scheduler.py) and the
encoder keeps no KV cache: `forward` attends within each sequence of the flat batch
(`ops.dense_attention` over `meta.cu_seqlens_q`). Every input is one segment (token type 0).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kernels import AttentionMetadata, Ops

from .config import ModelConfig
from .model import StepInterrupted, concat_rows, fusable

_LAYER = ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight", "attn_v.bias",
          "attn_output.weight", "attn_output.bias", "attn_output_norm.weight", "attn_output_norm.bias",
          "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias",
          "layer_output_norm.weight", "layer_output_norm.bias")
_EMBED = ("token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.weight",
          "token_embd_norm.bias")


def required_tensors(cfg: ModelConfig) -> list[str]:
    """The (llama.cpp GGUF) names of every tensor the encoder reads."""
    return list(_EMBED) + [f"blk.{i}.{n}" for i in range(cfg.n_layers) for n in _LAYER]


class Encoder:
    def __init__(self, cfg: ModelConfig, ops: Ops, embed: dict[str, Any], layers: list[dict[str, Any]]) -> None:
        self.cfg, self.ops, self.embed, self.layers = cfg, ops, embed, layers

    @classmethod
    def from_weights(cls, weights: Any, cfg: ModelConfig, ops: Ops) -> "Encoder":
        """`weights`: a source with the GGUFFile surface (engine/loading/hf_weights.py)."""
        emb = {n: (ops.prepare_embedding if n.endswith("embd.weight") or n == "token_types.weight"
                   else ops.prepare_weight)(weights.tensor(n)) for n in _EMBED}
        layers = []
        for i in range(cfg.n_layers):
            p = f"blk.{i}."
            w = {n: ops.prepare_weight(weights.tensor(p + n)) for n in _LAYER if not n.startswith("attn_q")
                 and not n.startswith("attn_k") and not n.startswith("attn_v")}
            qkv = [p + f"attn_{x}.weight" for x in "qkv"]
            if fusable(weights, qkv):
                w["wqkv"] = ops.prepare_weight(concat_rows(weights, qkv))
                w["bqkv"] = ops.prepare_weight(concat_rows(weights, [p + f"attn_{x}.bias" for x in "qkv"]))
            else:
                w |= {f"attn_{x}.{k}": ops.prepare_weight(weights.tensor(p + f"attn_{x}.{k}"))
                      for x in "qkv" for k in ("weight", "bias")}
            layers.append(w)
            weights.release_pages()
        return cls(cfg, ops, emb, layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[Any], interrupt: threading.Event | None = None) -> torch.Tensor:
        """The last layer's hidden states [T, H] of every input in the flat batch (each whole)."""
        ops, cfg, e = self.ops, self.cfg, self.embed
        token_type = torch.zeros_like(input_ids)
        h = (ops.embedding(input_ids, e["token_embd.weight"]) + ops.embedding(positions, e["position_embd.weight"])
             + ops.embedding(token_type, e["token_types.weight"]))
        h = ops.layer_norm(h, e["token_embd_norm.weight"], e["token_embd_norm.bias"], cfg.rms_eps)
        for w in self.layers:
            if interrupt is not None and interrupt.is_set():
                raise StepInterrupted()
            a = ops.linear(self._attention(w, h, meta), w["attn_output.weight"], w["attn_output.bias"])
            h = ops.layer_norm(a + h, w["attn_output_norm.weight"], w["attn_output_norm.bias"], cfg.rms_eps)
            f = ops.linear(ops.gelu(ops.linear(h, w["ffn_up.weight"], w["ffn_up.bias"])), w["ffn_down.weight"],
                           w["ffn_down.bias"])
            h = ops.layer_norm(f + h, w["layer_output_norm.weight"], w["layer_output_norm.bias"], cfg.rms_eps)
        return h

    def _attention(self, w: dict[str, Any], h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ops, cfg, T = self.ops, self.cfg, h.shape[0]
        if "wqkv" in w:
            q, k, v = ops.linear(h, w["wqkv"], w["bqkv"]).chunk(3, dim=-1)
        else:
            q, k, v = (ops.linear(h, w[f"attn_{x}.weight"], w[f"attn_{x}.bias"]) for x in "qkv")
        shape = (T, cfg.n_heads, cfg.head_dim)
        o = ops.dense_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), meta.cu_seqlens_q, cfg.scale)
        return o.reshape(T, cfg.n_heads * cfg.head_dim)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.cfg.arch} is an encoder: it embeds, it does not predict tokens")

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[Any]:
        return []  # attention stays within each step's inputs
