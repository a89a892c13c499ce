"""The Triton backend: GGUF blocks stay quantized on the device; every op is a Triton kernel.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (tests). Norm weights and biases
(F32 1-D tensors) are kept dense; quantized matrices stay QuantTensors and go through `qmatmul`.
Float matrices (F32/F16/BF16: Hugging Face checkpoints served unquantized, the odd GGUF tensor)
are dense tensors in their own dtype multiplied by `torch.matmul`: cuBLAS's GEMV and GEMM run at
the bandwidth limit for dense 16-bit weights, which a GGUF-block kernel cannot beat there.
"""

from __future__ import annotations

from typing import Any

import torch

from .encoder_ops import EncoderOps
from .metadata import AttentionMetadata


_FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # ggml type -> dense dtype


class TritonOps(EncoderOps):
    name = "triton"

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.device = device
        # bf16 on a GPU; the interpreter cannot do bf16 arithmetic, so fp32 there.
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    def prepare_weight(self, qt: Any) -> Any:
        from . import packed, ref_quant

        if len(qt.shape) == 1:  # norms and biases: small, dense fp32
            return ref_quant.dequantize(qt.data, qt.ggml_type, qt.shape, torch.float32).to(self.device)
        if qt.ggml_type in packed.PACKED_TYPES:  # aligned planes, repacked on the device
            return packed.pack(qt.to(self.device))
        if qt.ggml_type in _FLOAT_DTYPES:  # kept in its own dtype; fp32 activations (interpreter): fp32
            w = qt.data.to(self.device).view(_FLOAT_DTYPES[qt.ggml_type]).reshape(qt.shape)
            return w.float() if self.dtype == torch.float32 else w
        return qt.to(self.device)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.dtype

    def prepare_embedding(self, qt: Any) -> Any:
        return self.prepare_weight(qt)

    def linear(self, x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        from .qmatmul import qmatmul

        if isinstance(w, torch.Tensor):  # a dense float matrix (cuBLAS); bias added in fp32 as qmatmul does
            y = torch.nn.functional.linear(x if x.dtype == w.dtype else x.to(w.dtype), w)
            return (y.float() + bias).to(x.dtype) if bias is not None else y.to(x.dtype)
        return qmatmul(x, w, bias=bias)

    def embedding(self, ids: torch.Tensor, w: Any) -> torch.Tensor:
        from .dequant import dequantize
        from .packed import PackedWeight
        from .qmatmul_packed import dequant_rows

        if isinstance(w, PackedWeight):
            return dequant_rows(w, ids, self.dtype)
        if isinstance(w, torch.Tensor):
            return w[ids].to(self.dtype)
        rows = w.data.index_select(0, ids.long())
        return dequantize(rows, w.ggml_type, (ids.shape[0], w.shape[-1]), self.dtype)

    def rms_norm(self, x, weight, eps, residual=None):
        from .norm import rms_norm

        return rms_norm(x, weight, eps, residual)

    def rope(self, q, k, positions, cos_sin, neox):
        from .rope import rope

        return rope(q, k, positions, cos_sin, neox)

    def prepare_gate_up(self, qt: Any, rows: int) -> Any:
        """[gate; up] packed as one pair whose GEMV applies the activation in its epilogue."""
        from dataclasses import replace

        from .packed import PackedWeight

        w = self.prepare_weight(qt)
        return replace(w, pair=rows) if isinstance(w, PackedWeight) and rows % 8 == 0 else w

    def gated_linear(self, x: torch.Tensor, w: Any, gelu: bool) -> torch.Tensor:
        from . import unfused
        from .qmatmul import qmatmul

        if getattr(w, "pair", 0):
            return qmatmul(x, w, act=2 if gelu else 1)
        return unfused.gated_linear(self, x, w, gelu)

    def linear_residual_norm(self, x, w, residual, norm_w, eps, post_w=None):
        """The matmul, then in the same launch the residual add and RMSNorm of each finished row."""
        from . import unfused
        from .packed import PackedWeight
        from .qmatmul import qmatmul
        from .qmatmul_packed import NormTail

        if not isinstance(w, PackedWeight) or residual.dtype != x.dtype or not residual.is_contiguous():
            return unfused.linear_residual_norm(self, x, w, residual, norm_w, eps, post_w)
        h = torch.empty_like(residual)
        return qmatmul(x, w, tail=NormTail(residual, norm_w, eps, h, post_w)), h

    def silu_mul(self, gate, up):
        from .act import silu_mul

        return silu_mul(gate, up)

    def gelu_tanh_mul(self, gate, up):
        from .act import gelu_tanh_mul

        return gelu_tanh_mul(gate, up)

    def store_kv(self, k, v, kc, vc, slots) -> None:
        from .attention import store_kv

        store_kv(k, v, kc, vc, slots)

    def rope_store_kv(self, q, k, v, positions, cos_sin, neox, kc, vc, slots, q_norm=None, k_norm=None, eps=0.0):
        from .rope import rope_store_kv

        return rope_store_kv(q, k, v, positions, cos_sin, neox, kc, vc, slots, q_norm, k_norm, eps)

    def paged_attention(
        self, q, kc, vc, meta: AttentionMetadata, scale: float, sliding_window: int = 0, softcap: float = 0.0
    ) -> torch.Tensor:
        from .attention import paged_attention

        return paged_attention(q, kc, vc, meta, scale, sliding_window, softcap)
