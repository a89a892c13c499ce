"""CpuOps: the CPU backend on llamatron's C kernels (csrc/), weights kept quantized.

Matrices become PackedWeight planes at load (kernels/cpu/pack.py) and run through the int8-activation
kernel; norms, RoPE, KV stores, attention over the paged cache and the gated activation are one C
call each, all on one thread pool sized by `threads`. Activations, norms, attention and logits are
fp32, the KV cache fp16. Weights of a type the kernels do not take (F16/F32 matrices) stay dense
fp32 for torch.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from .. import quant_layouts as L
from .. import reference as ref
from ..metadata import AttentionMetadata
from ..encoder_ops import EncoderOps
from ..unfused import UnfusedEpilogues
from . import build
from .pack import PackedWeight, pack, supported, unpack_rows


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def usable_cores() -> int:
    """The cores this process may run on (taskset / cgroup affinity included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CpuOps(UnfusedEpilogues, EncoderOps):
    name = "cpu"

    def __init__(self, threads: int = 0, lib: ctypes.CDLL | None = None) -> None:
        self.lib = lib or build.load()
        if self.lib is None:
            raise RuntimeError("the CPU kernel library is not available")
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.kv_dtype = torch.float16  # as llama.cpp: half the bytes attention reads per token
        self.threads = self.lib.lt_set_threads(threads or usable_cores())
        # This backend owns the cores: torch's remaining ops in a step (sampling, gathers) are small,
        # and its intra-op workers spinning after them would take the cores from the kernels' pool
        # (measured: 2 threads each made batch-1 decode 40% slower than one torch thread).
        torch.set_num_threads(1)
        # the C calls of a step, looked up once (attribute access on a CDLL costs a dict lookup each)
        lib = self.lib
        self._linear, self._rms_norm, self._attention = lib.lt_linear, lib.lt_rms_norm, lib.lt_paged_attention
        self._self_test()

    def _self_test(self) -> None:
        """One small matmul per storage kind against the fp32 reference: a library the compiler got
        wrong on an unusual host must not serve garbage (the caller falls back to torch)."""
        from types import SimpleNamespace

        g = torch.Generator().manual_seed(0)
        for t in (L.Q4_1, L.Q8_0, L.Q6_K):
            raw = L.random_blocks(t, 16, 256, g)
            w = self.prepare_weight(SimpleNamespace(data=raw, ggml_type=t, shape=(16, 256)))
            x = torch.randn(3, 256, generator=g)
            want = x @ ref.dequantize(raw, t, (16, 256)).T
            err = ((self.linear(x, w) - want).norm() / want.norm()).item()
            if not err < 0.03:  # int8 activations: ~0.005
                raise RuntimeError(f"CPU kernel self-test failed for {L.NAMES[t]} (relative error {err:.3g})")

    # ---- weights -------------------------------------------------------------------------
    def prepare_weight(self, qt: Any) -> Any:
        if supported(qt.ggml_type, qt.shape):
            return pack(qt.data, qt.ggml_type, qt.shape)
        return ref.dequantize(qt.data, qt.ggml_type, qt.shape, torch.float32)

    def prepare_embedding(self, qt: Any) -> Any:
        """A table only looked up: rows are dequantized from the GGUF blocks (the mmap) per step."""
        return qt if len(qt.shape) == 2 and qt.ggml_type in L.QUANT_TYPES else self.prepare_weight(qt)

    def embedding(self, ids: torch.Tensor, w: Any) -> torch.Tensor:
        if isinstance(w, PackedWeight):
            return unpack_rows(w, ids)
        if isinstance(w, torch.Tensor):
            return w[ids]
        rows = w.data.index_select(0, ids.long())
        return ref.dequantize(rows, w.ggml_type, (ids.shape[0], w.shape[-1]), torch.float32)

    # ---- matmul ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(w, PackedWeight):
            return ref.linear(x, w, bias)
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = torch.empty(x.shape[0], w.shape[0])
        if self._linear(x.data_ptr(), x.shape[0], x.stride(0), w.desc_ptr, _ptr(bias), y.data_ptr()):
            raise MemoryError("lt_linear: no memory for the activation scratch")
        return y

    # ---- layer ops ---------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # (view() costs ~2 us a call on CPU tensors: only q/k heads [T, n, hd] take that path)
        if x.dim() != 2 or not x.is_contiguous():
            out, res = self.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps,
                                     None if residual is None else residual.reshape(-1, x.shape[-1]))
            return out.view(x.shape), res.view(x.shape)
        T, H = x.shape
        out = torch.empty(T, H)
        if residual is None:
            self._rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), None, T, H, eps)
            return out, x
        if not residual.is_contiguous():
            residual = residual.contiguous()
        new_res = torch.empty(T, H)
        self._rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), new_res.data_ptr(), T, H,
                       eps)
        return out, new_res

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
             neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """In place on q [T, nh, hd] and k [T, nkv, hd] (rows may be strided views of a fused QKV)."""
        T, nh, hd = q.shape
        assert q.stride(2) == k.stride(2) == 1 and q.stride(1) == k.stride(1) == hd
        pos = positions.to(torch.int64).contiguous()
        self.lib.lt_rope(q.data_ptr(), k.data_ptr(), cos_sin.data_ptr(), pos.data_ptr(), T, q.stride(0),
                         k.stride(0), nh, k.shape[1], hd, cos_sin.shape[-1], int(neox))
        return q, k

    def _gated(self, gate: torch.Tensor, up: torch.Tensor, kind: int) -> torch.Tensor:
        T, I = gate.shape
        assert gate.stride(1) == up.stride(1) == 1
        out = torch.empty(T, I)
        self.lib.lt_gated_act(gate.data_ptr(), up.data_ptr(), gate.stride(0), up.stride(0), T, I, out.data_ptr(), kind)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._gated(gate, up, 0)

    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._gated(gate, up, 1)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                 slots: torch.Tensor) -> None:
        T, nkv, hd = k.shape
        assert k.stride(1) == v.stride(1) == hd and k.stride(2) == v.stride(2) == 1
        self.lib.lt_store_kv(k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(), slots.data_ptr(), T,
                             k.stride(0), v.stride(0), nkv * hd)

    def rope_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin: torch.Tensor, neox: bool, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                      q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                      eps: float = 0.0) -> torch.Tensor:
        """The C ops composed: norms into new tensors, RoPE in place (on q/k themselves when there is no
        norm: views of the fused QKV output, as before), then the KV store."""
        if q_norm is not None:
            q, _ = self.rms_norm(q, q_norm, eps)
        if k_norm is not None:
            k, _ = self.rms_norm(k, k_norm, eps)
        q, k = self.rope(q, k, positions, cos_sin, neox)
        self.store_kv(k, v, kc, vc, slots)
        return q

    def paged_attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
                        scale: float, sliding_window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        T, nh, hd = q.shape
        nkv, bs = kc.shape[2], kc.shape[1]
        assert q.stride(2) == 1 and q.stride(1) == hd
        out = torch.empty(T, nh, hd)  # every row belongs to a sequence with queries: all are written
        tables = meta.block_tables
        if self._attention(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(), meta.seq_lens.data_ptr(),
                           meta.cu_seqlens_q.data_ptr(), out.data_ptr(), q.stride(0), nh, nkv, hd, bs, tables.shape[1],
                           tables.shape[0], scale, sliding_window, softcap):
            raise MemoryError("lt_paged_attention: no memory for its scratch")
        return out
