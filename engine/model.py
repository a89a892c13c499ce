"""One decoder definition for llama, qwen2, qwen3 and gemma3.

Architecture differences are data in ModelConfig (QKV bias, QK-norm, post-norms, sliding-window
layers, rope base and style, embedding scale, activation, tied output). Every tensor op goes
through `ops = kernels.backend(device)`; this file never branches on the device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from kernels import AttentionMetadata, Ops
from kernels.reference import rope_cache

from .config import ModelConfig
from .loading.gguf import GGUFError, GGUFFile, QuantTensor


class StepInterrupted(Exception):
    """The interrupt event given to Model.forward was set (checked between layers)."""


@dataclass
class LayerWeights:
    """One layer's prepared weights. Q, K and V (and gate and up) are one matrix when their GGUF
    types agree (rows concatenated at load: one matmul instead of three); otherwise separate."""

    attn_norm: Any
    wo: Any
    ffn_norm: Any
    w_down: Any
    wqkv: Any = None  # fused [q; k; v] rows, with bqkv
    bqkv: Any = None
    wq: Any = None
    wk: Any = None
    wv: Any = None
    bq: Any = None
    bk: Any = None
    bv: Any = None
    w_gate_up: Any = None  # fused [gate; up] rows
    w_gate: Any = None
    w_up: Any = None
    q_norm: Any = None
    k_norm: Any = None
    post_attn_norm: Any = None
    post_ffn_norm: Any = None


def _required_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
    p = f"blk.{layer}."
    names = {
        "attn_norm": p + "attn_norm.weight", "wq": p + "attn_q.weight", "wk": p + "attn_k.weight",
        "wv": p + "attn_v.weight", "wo": p + "attn_output.weight", "ffn_norm": p + "ffn_norm.weight",
        "w_gate": p + "ffn_gate.weight", "w_up": p + "ffn_up.weight", "w_down": p + "ffn_down.weight",
    }
    if cfg.qkv_bias:
        names |= {"bq": p + "attn_q.bias", "bk": p + "attn_k.bias", "bv": p + "attn_v.bias"}
    if cfg.qk_norm:
        names |= {"q_norm": p + "attn_q_norm.weight", "k_norm": p + "attn_k_norm.weight"}
    if cfg.post_norms:
        names |= {"post_attn_norm": p + "post_attention_norm.weight", "post_ffn_norm": p + "post_ffw_norm.weight"}
    return names


def fusable(gguf: GGUFFile, names: list[str]) -> bool:
    infos = [gguf.tensors[n] for n in names]
    return len({i.ggml_type for i in infos}) == 1 and len({i.shape[1:] for i in infos}) == 1


def concat_rows(gguf: GGUFFile, names: list[str]) -> QuantTensor:
    """The GGUF rows of several same-type tensors as one (each row is whole blocks)."""
    parts = [gguf.tensor(n) for n in names]
    n, name, kind = sum(p.shape[0] for p in parts), "+".join(names), parts[0].ggml_type
    if len(parts[0].shape) == 1:  # biases: data is [1, bytes]
        return QuantTensor(name, kind, (n,), torch.cat([p.data.reshape(-1) for p in parts])[None])
    return QuantTensor(name, kind, (n, *parts[0].shape[1:]), torch.cat([p.data for p in parts]))


def _layer_weights(gguf: GGUFFile, ops: Ops, names: dict[str, str]) -> LayerWeights:
    w = {f: ops.prepare_weight(gguf.tensor(n)) for f, n in names.items()
         if f not in ("wq", "wk", "wv", "bq", "bk", "bv", "w_gate", "w_up")}
    qkv = [names["wq"], names["wk"], names["wv"]]
    if fusable(gguf, qkv):
        w["wqkv"] = ops.prepare_weight(concat_rows(gguf, qkv))
        if "bq" in names:
            w["bqkv"] = ops.prepare_weight(concat_rows(gguf, [names["bq"], names["bk"], names["bv"]]))
    else:
        w |= {f: ops.prepare_weight(gguf.tensor(names[f])) for f in ("wq", "wk", "wv", "bq", "bk", "bv") if f in names}
    if fusable(gguf, [names["w_gate"], names["w_up"]]):
        w["w_gate_up"] = ops.prepare_gate_up(concat_rows(gguf, [names["w_gate"], names["w_up"]]),
                                             gguf.tensors[names["w_gate"]].shape[0])
    else:
        w |= {f: ops.prepare_weight(gguf.tensor(names[f])) for f in ("w_gate", "w_up")}
    return LayerWeights(**w)


def required_tensors(cfg: ModelConfig) -> list[str]:
    """The GGUF names of every tensor the decoder reads (output.weight too unless tied)."""
    needed = ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tied_embeddings else ["output.weight"])
    for i in range(cfg.n_layers):
        needed += list(_required_names(cfg, i).values())
    return needed


def check_tensors(gguf: GGUFFile, cfg: ModelConfig) -> None:
    """Fail with a clear message before reading any weight if a tensor the decoder needs is missing."""
    needed = [n for n in required_tensors(cfg) if n != "output.weight"]  # GGUF: absent means tied
    missing = [n for n in needed if n not in gguf.tensors]
    if missing:
        raise GGUFError(f"{gguf.path.name}: missing tensors for {cfg.arch}: {', '.join(missing[:5])}")


class Model:
    def __init__(self, cfg: ModelConfig, ops: Ops, embed: Any, layers: list[LayerWeights],
                 out_norm: Any, lm_head: Any, max_positions: int) -> None:
        self.cfg, self.ops = cfg, ops
        self.embed, self.layers, self.out_norm, self.lm_head = embed, layers, out_norm, lm_head
        rot = cfg.rope_dim
        self.rope_global = rope_cache(cfg.rope_base, rot, max_positions, ops.device, cfg.rope_freq_factors)
        self.rope_local = (
            rope_cache(cfg.rope_base_local, rot, max_positions, ops.device)
            if cfg.rope_base_local else self.rope_global
        )

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, cfg: ModelConfig, ops: Ops, max_positions: int) -> "Model":
        """`gguf`: a GGUFFile, or anything with its surface (engine/loading/hf_weights.py: a
        safetensors checkpoint under GGUF names)."""
        gguf.check_types()
        check_tensors(gguf, cfg)
        layers = []
        for i in range(cfg.n_layers):
            layers.append(_layer_weights(gguf, ops, _required_names(cfg, i)))
            gguf.release_pages()  # the file's pages read so far: peak RSS holds one layer of them, not the file
        if "output.weight" in gguf.tensors:  # untied: the embedding is only ever looked up
            embed = ops.prepare_embedding(gguf.tensor("token_embd.weight"))
            lm_head = ops.prepare_weight(gguf.tensor("output.weight"))
        else:
            embed = lm_head = ops.prepare_weight(gguf.tensor("token_embd.weight"))
        return cls(cfg, ops, embed, layers, ops.prepare_weight(gguf.tensor("output_norm.weight")), lm_head,
                   max_positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                interrupt: threading.Event | None = None) -> torch.Tensor:
        """Hidden states of the last layer; `interrupt`, set from another thread, stops the pass
        at the next layer with StepInterrupted."""
        ops, cfg = self.ops, self.cfg
        h = ops.embedding(input_ids, self.embed)
        if cfg.embed_scale != 1.0:
            h = h * cfg.embed_scale
        x, residual = ops.rms_norm(h, self.layers[0].attn_norm, cfg.rms_eps)
        # Each RMSNorm after the first rides on the matmul before it (o_proj, down): the residual add,
        # gemma's post-norms and the next norm run once the matmul's rows are complete, in its launch.
        for i, layer in enumerate(self.layers):
            if interrupt is not None and interrupt.is_set():
                raise StepInterrupted()
            o = self._attention(i, layer, x, positions, meta, kv_caches[i])
            x, residual = ops.linear_residual_norm(o, layer.wo, residual, layer.ffn_norm, cfg.rms_eps,
                                                   layer.post_attn_norm)
            nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.out_norm
            x, residual = ops.linear_residual_norm(self._mlp_act(layer, x), layer.w_down, residual, nxt, cfg.rms_eps,
                                                   layer.post_ffn_norm)
        return x

    def _attention(self, i: int, layer: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ops, cfg = self.ops, self.cfg
        T, nq, nkv = x.shape[0], cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if layer.wqkv is not None:  # views of one output: rows strided, heads contiguous
            q, k, v = ops.linear(x, layer.wqkv, layer.bqkv).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = (ops.linear(x, layer.wq, layer.bq), ops.linear(x, layer.wk, layer.bk),
                       ops.linear(x, layer.wv, layer.bv))
        q = q.view(T, cfg.n_heads, cfg.head_dim)
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim)
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim)
        window = cfg.layer_window(i)
        q = ops.rope_store_kv(q, k, v, positions, self.rope_local if window else self.rope_global, cfg.rope_neox,
                              kv[0], kv[1], meta.slot_mapping, layer.q_norm, layer.k_norm, cfg.rms_eps)
        o = ops.paged_attention(q, kv[0], kv[1], meta, cfg.scale, window, cfg.attn_softcap)
        return o.reshape(T, cfg.n_heads * cfg.head_dim)  # o_proj: in forward, fused with the norm after it

    def _mlp_act(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        gelu = self.cfg.activation == "gelu_tanh"
        if layer.w_gate_up is not None:  # the activation in the matmul's epilogue where the backend can
            act = ops.gated_linear(x, layer.w_gate_up, gelu)
        else:
            gate, up = ops.linear(x, layer.w_gate), ops.linear(x, layer.w_up)
            act = ops.gelu_tanh_mul(gate, up) if gelu else ops.silu_mul(gate, up)
        return act  # down: in forward, fused with the norm after it

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.lm_head).float()
        if self.cfg.final_softcap > 0:
            logits = self.cfg.final_softcap * torch.tanh(logits / self.cfg.final_softcap)
        return logits

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (num_blocks, block_size, self.cfg.n_kv_heads, self.cfg.head_dim)
        dev, dt = self.ops.device, self.ops.kv_dtype
        # empty, not zeros: a slot is always written before it is read, and untouched pages of a large
        # CPU pool stay out of the resident set (RSS grows with the KV actually used)
        return [(torch.empty(shape, dtype=dt, device=dev), torch.empty(shape, dtype=dt, device=dev))
                for _ in range(self.cfg.n_layers)]
