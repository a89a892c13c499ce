"""The encoder ops of kernels.Ops (LayerNorm with bias, erf GELU, bidirectional attention within
each input) as one mixin for every backend: the torch reference ops, which run on CPU and CUDA
tensors alike. An encoder's time is its matmuls (`linear`, each backend's own); these three are a
few percent of it, so they have no kernels of their own."""

from __future__ import annotations

import torch

from . import reference as ref


class EncoderOps:
    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return ref.layer_norm(x, weight, bias, eps)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return ref.gelu(x)

    def dense_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        scale: float) -> torch.Tensor:
        return ref.dense_attention(q, k, v, cu_seqlens, scale)
