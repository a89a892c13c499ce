"""Triton launches intercepted on a machine without a GPU: compiled for sm_90 and recorded, not run.

A stand-in driver answers the JIT's questions about the device (an sm_90 target, device 0, stream 0),
so `kernel[grid](...)` goes through Triton's own dispatch (the same specialization of arguments:
16-byte-aligned pointers, integers equal to 1 or divisible by 16, and the same compile as on an
H100) and returns before the launch. The qmatmul dispatcher is told it runs on an H100 (compute
capability 9.0, 132 SMs) so it picks the GPU's configs and split-K; attention already assumes 132
SMs off the GPU. Torch ops seen while capturing are counted as the kernels a CUDA build would launch
(views and allocations excluded). Outputs of intercepted kernels are left unwritten: this measures
what runs, not what it computes.

Import this module before anything imports triton: TRITON_INTERPRET must be unset, or `triton.jit`
builds interpreter functions that never reach the driver.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100_SMS = 132
SM90 = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    args: dict[str, Any]  # bound arguments by name, constexprs included
    compiled: Any  # triton CompiledKernel, or None when capturing without compiling
    phase: str

    @property
    def ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


@dataclass
class Capture:
    launches: list[Launch] = field(default_factory=list)
    torch_ops: Counter = field(default_factory=Counter)  # (phase, op name) -> count
    phase: str = ""

    def count(self, phase: str | None = None) -> tuple[int, int]:
        """(Triton launches, torch kernels) in one phase, or in all."""
        tri = sum(1 for x in self.launches if phase is None or x.phase == phase)
        tor = sum(n for (p, _), n in self.torch_ops.items() if phase is None or p == phase)
        return tri, tor


class _FakeDriver:
    """What JITFunction.run asks of the active driver before it compiles."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return SM90

    def is_active(self) -> bool:
        return True


# ops that launch no kernel on a GPU: metadata, views, allocation, and host-side tensor creation
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "detach", "alias",
              "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_nonzero",
              "promote_types", "result_type", "is_same_size"}


class _CountOps(TorchDispatchMode):
    def __init__(self, capture: Capture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_KERNEL:
            self.capture.torch_ops[(self.capture.phase, name)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def capture_launches(compile_kernels: bool = True) -> Iterator[Capture]:
    """Within the block, every Triton launch is compiled for sm_90 (or only recorded) and not run;
    torch ops are counted. Set `capture.phase` to label what follows."""
    from kernels import qmatmul

    cap = Capture()
    orig_run, orig_info, orig_driver = JITFunction.run, qmatmul._device_info, driver._active

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        bound = inspect.signature(self.fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                                   if k in self.arg_names})
        compiled = orig_run(self, *args, grid=grid, warmup=True, **kwargs) if compile_kernels else None
        g = grid(bound.arguments) if callable(grid) else grid
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"  # two kernels are called _reduce_kernel
        cap.launches.append(Launch(name, tuple(g), dict(bound.arguments), compiled, cap.phase))
        return compiled

    driver.set_active(_FakeDriver())
    JITFunction.run = run
    qmatmul._device_info = lambda device: ((9, 0), H100_SMS)
    try:
        with _CountOps(cap):
            yield cap
    finally:
        JITFunction.run, qmatmul._device_info = orig_run, orig_info
        driver._active = orig_driver  # reset_active() would look for a real driver: there is none


def with_phase(cap: Capture, phase: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    cap.phase = phase
    try:
        return fn(*args, **kwargs)
    finally:
        cap.phase = ""

