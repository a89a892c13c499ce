"""ModelConfig (architecture facts read from GGUF metadata) and EngineConfig (runtime limits).

Every difference between the supported architectures is data here; engine/model.py has one
decoder definition that reads these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
# GGUF `<arch>.pooling_type` (llama.cpp's enum) -> pooling name; unspecified (-1) and rank (4): mean
GGUF_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last"}


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str
    name: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # split-halves rotation (qwen2/qwen3/gemma3) vs adjacent pairs (llama GGUF)
    rope_base_local: float | None = None  # sliding-window layers' rope base (gemma3: 10000)
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # gemma: norms after attention and FFN outputs
    sliding_window: int = 0  # 0 = none
    sliding_window_pattern: int = 0  # gemma3: every Nth layer is global, the others sliding
    embed_scale: float = 1.0
    activation: str = "silu"  # or "gelu_tanh"
    tied_embeddings: bool = False
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    pooling: str = "mean"  # embeddings' default pooling (GGUF `<arch>.pooling_type`, else mean)
    rope_freq_factors: tuple[float, ...] | None = None  # divisors of the global rope frequencies (rope_scaling)
    # encoders (BERT): bidirectional attention over learned absolute positions; embeddings only
    encoder: bool = False
    max_positions: int = 0  # rows of the learned position table
    type_vocab_size: int = 0
    format: str = "gguf"  # the checkpoint read: "gguf" or "safetensors"
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_is_sliding(self, layer: int) -> bool:
        if self.sliding_window <= 0:
            return False
        if self.sliding_window_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0

    def layer_window(self, layer: int) -> int:
        return self.sliding_window if self.layer_is_sliding(layer) else 0

    @property
    def scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        if self.encoder:  # attends within its own input: no KV cache
            return 0
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str] | None = None) -> "ModelConfig":
        arch = meta.get("general.architecture", "")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        names = tensor_names or set()

        def get(key: str, default: Any = None) -> Any:
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{key}")
            return v

        hidden = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        n_kv = get("attention.head_count_kv", n_heads)
        if isinstance(n_kv, list):  # per-layer lists appear in some files; we need one value
            n_kv = max(n_kv)
        head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
        vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
        cfg = cls(
            arch=arch,
            name=str(meta.get("general.name", arch)),
            vocab_size=vocab,
            hidden_size=hidden,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=head_dim,
            intermediate_size=int(get("feed_forward_length")),
            context_length=int(get("context_length", 2048)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            rope_neox=arch != "llama",
            tied_embeddings="output.weight" not in names if names else False,
        )
        pooling_type = meta.get(f"{arch}.pooling_type")
        if isinstance(pooling_type, int):
            cfg.pooling = GGUF_POOLING.get(pooling_type, "mean")
        if arch == "qwen2":
            cfg.qkv_bias = True
        if arch == "qwen3":
            cfg.qk_norm = True
        if arch == "gemma3":
            cfg.qk_norm = True
            cfg.post_norms = True
            cfg.activation = "gelu_tanh"
            cfg.embed_scale = math.sqrt(hidden)
            cfg.sliding_window = int(meta.get("gemma3.attention.sliding_window", 0))
            cfg.sliding_window_pattern = 6
            cfg.rope_base_local = 10000.0
            # llama.cpp: query scaled by 1/sqrt(n_embd_head_k) for gemma3
            cfg.attn_scale = 1.0 / math.sqrt(head_dim)
        return cfg


@dataclass
class EngineConfig:
    """Runtime limits of one engine (one model on one device)."""

    model: str = "smollm2-135m-instruct"  # registry name, path to a .gguf or to a Hugging Face folder
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int = 0  # -c; 0: the model's training context (capped at 8192 on CPU)
    max_num_seqs: int = 8  # -np: sequences decoded together
    max_num_batched_tokens: int = 2048  # token budget of one step
    # prompt tokens per step while sequences decode (their inter-token gap); 0: 256 on CPU, 1024 on GPU
    long_prefill_tokens: int = 0
    block_size: int = 16
    kv_cache_gib: float = 1.0  # CPU: KV pool size
    gpu_memory_fraction: float = 0.85  # CUDA: fraction of free memory after weights for the KV pool
    enable_prefix_caching: bool = True
    chat_template: str | None = None  # path overriding the model's template
    cuda_graphs: bool | str = True  # "auto" (= True) | "require" (capture failure raises) | "off" (= False)
    cpu_weights: str = "auto"  # CPU: "auto" (quantized C kernels) | "exact" (dense fp32 torch reference)
    threads: int = 0  # CPU kernel threads (llama.cpp's -t); 0: the cores torch sees
    pooling: str = ""  # embeddings: mean | cls | last | none; "": the model's (ModelConfig.pooling)
    # weights of a Hugging Face checkpoint: "" (GPU: bf16; CPU: q8_0, or fp32 with cpu_weights exact),
    # "none" (as stored), "q8_0" or "q4_k" (quantized at load into GGUF blocks)
    quantize: str = ""
