"""The CPU backend: torch reference ops, weights dequantized once at load to dense fp32."""

from __future__ import annotations

from typing import Any

import torch

from . import reference as ref
from .metadata import AttentionMetadata
from .encoder_ops import EncoderOps
from .unfused import UnfusedEpilogues


class TorchOps(UnfusedEpilogues, EncoderOps):
    name = "torch"

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device("cpu")
        self.dtype = dtype

    def prepare_weight(self, qt: Any) -> torch.Tensor:
        return ref.dequantize(qt.data, qt.ggml_type, qt.shape, self.dtype)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.dtype

    def prepare_embedding(self, qt: Any) -> torch.Tensor:
        return self.prepare_weight(qt)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ref.linear(x, w, bias)

    def embedding(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ref.embedding(ids, w)

    def rms_norm(self, x, weight, eps, residual=None):
        return ref.rms_norm(x, weight, eps, residual)

    def rope(self, q, k, positions, cos_sin, neox):
        return ref.rope(q, k, positions, cos_sin, neox)

    def silu_mul(self, gate, up):
        return ref.silu_mul(gate, up)

    def gelu_tanh_mul(self, gate, up):
        return ref.gelu_tanh_mul(gate, up)

    def store_kv(self, k, v, kc, vc, slots) -> None:
        ref.store_kv(k, v, kc, vc, slots)

    def rope_store_kv(self, q, k, v, positions, cos_sin, neox, kc, vc, slots, q_norm=None, k_norm=None, eps=0.0):
        return ref.rope_store_kv(q, k, v, positions, cos_sin, neox, kc, vc, slots, q_norm, k_norm, eps)

    def paged_attention(
        self, q, kc, vc, meta: AttentionMetadata, scale: float, sliding_window: int = 0, softcap: float = 0.0
    ) -> torch.Tensor:
        return ref.paged_attention(q, kc, vc, meta, scale, sliding_window, softcap)
