"""The composite ops (`prepare_gate_up`, `gated_linear`, `linear_residual_norm`) spelled with a
backend's basic ops, for backends whose matmul has no fused epilogue (torch, the C CPU kernels) and
for the Triton backend's unpacked weights. `UnfusedEpilogues` gives a backend class all three."""

from __future__ import annotations

from typing import Any

import torch


def gated_linear(ops: Any, x: torch.Tensor, w: Any, gelu: bool) -> torch.Tensor:
    """act(x gate^T) * (x up^T) for a [gate; up] weight: a matmul, a split and the activation op."""
    gate, up = ops.linear(x, w).chunk(2, dim=-1)
    return ops.gelu_tanh_mul(gate, up) if gelu else ops.silu_mul(gate, up)


def linear_residual_norm(ops: Any, x: torch.Tensor, w: Any, residual: torch.Tensor, norm_w: torch.Tensor,
                         eps: float, post_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x w^T, [y = rms_norm(y, post_w)], then (rms_norm(y + residual, norm_w), y + residual)."""
    y = ops.linear(x, w)
    if post_w is not None:
        y, _ = ops.rms_norm(y, post_w, eps)
    return ops.rms_norm(y, norm_w, eps, residual)


class UnfusedEpilogues:
    """Mixin: the composite ops of kernels.Ops through the class's own linear / rms_norm / activations."""

    def prepare_gate_up(self, qt: Any, rows: int) -> Any:
        return self.prepare_weight(qt)  # type: ignore[attr-defined]

    def gated_linear(self, x: torch.Tensor, w: Any, gelu: bool) -> torch.Tensor:
        return gated_linear(self, x, w, gelu)

    def linear_residual_norm(self, x: torch.Tensor, w: Any, residual: torch.Tensor, norm_w: torch.Tensor,
                             eps: float, post_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_residual_norm(self, x, w, residual, norm_w, eps, post_w)
