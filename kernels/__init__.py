"""kernels: every tensor op the model calls, behind `backend(device)`.

- "cpu": llamatron's C kernels (kernels/cpu/): weights stay quantized, activations int8 in the
  matmuls, everything else fp32; falls back to "torch" where the library cannot be built.
- "torch": torch reference ops (kernels/reference.py); weights dequantized once to dense fp32
  (`--cpu-weights exact`: the bit-level reference path).
- "cuda": Triton kernels; weights stay in their GGUF blocks in VRAM (QuantTensor).
- "triton": the Triton backend on whatever device the tensors live on (tests run it on CPU
  with TRITON_INTERPRET=1).

`engine/model.py` calls only the methods of `Ops` and never branches on the device.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from .metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "Ops", "backend"]


class Ops(Protocol):
    """The op set a backend provides (see kernels/reference.py for shapes and semantics)."""

    name: str
    device: torch.device
    dtype: torch.dtype  # activation dtype
    kv_dtype: torch.dtype  # KV-cache storage (attention math is fp32 whatever it is)

    def prepare_weight(self, qt: Any) -> Any: ...
    def prepare_embedding(self, qt: Any) -> Any: ...  # a table that is only looked up (untied)
    def linear(self, x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor: ...
    def embedding(self, ids: torch.Tensor, w: Any) -> torch.Tensor: ...
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, neox: bool
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...
    def prepare_gate_up(self, qt: Any, rows: int) -> Any: ...  # [gate; up] rows concatenated, gate has `rows`
    def gated_linear(self, x: torch.Tensor, w: Any, gelu: bool) -> torch.Tensor: ...  # act(x gate^T) * x up^T
    def linear_residual_norm(
        self, x: torch.Tensor, w: Any, residual: torch.Tensor, norm_w: torch.Tensor, eps: float,
        post_w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...  # y = x w^T [post-norm]; (rms_norm(y + residual), y + residual)
    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...
    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor
    ) -> None: ...
    def rope_store_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
        neox: bool, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
        q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
    ) -> torch.Tensor: ...  # norm (optional) + rope of q and k, k/v into the cache; returns q
    def paged_attention(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
        scale: float, sliding_window: int = 0, softcap: float = 0.0,
    ) -> torch.Tensor: ...
    # encoders (BERT): post-LayerNorm with bias, erf GELU, bidirectional attention within each input
    # (no KV cache). Every backend runs these as the torch reference ops: encoders are small and
    # their cost is the matmuls, which go through `linear` like the decoder's.
    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor: ...
    def gelu(self, x: torch.Tensor) -> torch.Tensor: ...
    def dense_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
    ) -> torch.Tensor: ...


def backend(device: str | torch.device = "cpu", cpu_weights: str = "auto", threads: int = 0) -> Ops:
    """`cpu_weights`: "auto" (quantized C kernels where they build) or "exact" (dense fp32);
    `threads`: CPU kernel threads (0: torch's intra-op count, i.e. the cores)."""
    kind = device if isinstance(device, str) else device.type
    if kind == "cpu" and cpu_weights == "auto":
        from .cpu import build

        if build.load() is not None:
            from .cpu.ops import CpuOps

            try:
                return CpuOps(threads)
            except RuntimeError as e:
                logging.getLogger("llamatron.kernels").warning("%s: using the torch reference ops", e)
        kind = "torch"
    if kind in ("cpu", "torch"):
        from .torch_backend import TorchOps

        return TorchOps()
    if kind.startswith("cuda"):
        from .triton_backend import TritonOps

        return TritonOps(torch.device(device))
    if kind == "triton":
        from .triton_backend import TritonOps

        return TritonOps(torch.device("cpu"))
    raise ValueError(f"unknown device {device!r}: expected cpu, cuda or triton")
