"""What a compiled Triton kernel costs on Hopper, read from its sm_90 SASS and PTX (no GPU needed).

- The hot loop: in SASS, a branch back to an earlier address closes a loop; the innermost loop with
  the most instructions is the one that streams the data (the K loop of a matmul). Its instruction
  count, and the SHFL (warp shuffles) and BAR (block barriers) inside it, are static counts of
  one trip, executed by every warp of the CTA.
- The widest load from a pointer argument: in PTX, the registers derived from that argument (by
  arithmetic, not through loads) address the loads that read it; `ld.global.v4.b32` is 16 bytes.
- Registers and stack (spilled registers) from `cuobjdump --dump-resource-usage`.
The tools are the ones that ship with triton (`triton/backends/nvidia/bin`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# ld.global[.qualifiers][.vN].<type><bits> {dst...}, [addr...]: vector width, element bits, address register
_LD_GLOBAL = re.compile(r"ld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bsuf](8|16|32|64)\s+"
                        r"(\{[^}]*\}|%\w+)\s*,\s*\[\s*(%\w+)")
_REG = re.compile(r"%\w+")


@dataclass(frozen=True)
class LoopStats:
    instructions: int  # SASS instructions in one trip of the hot loop (0: no loop)
    shfl: int
    bar: int


@dataclass(frozen=True)
class Resources:
    regs: int
    stack: int  # bytes per thread; > 0 means registers spilled


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), *flags, f.name],
                              capture_output=True, text=True, check=True).stdout


@lru_cache(maxsize=512)
def sass(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction."""
    return [(int(a, 16), op, rest.strip()) for a, _, op, rest in _SASS_LINE.findall(_cuobjdump(cubin, "-sass"))]


def hot_loop(cubin: bytes) -> LoopStats:
    code = sass(cubin)
    loops = []
    for addr, op, rest in code:
        m = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    if not inner:
        return LoopStats(0, 0, 0)
    lo, hi = max(inner, key=lambda r: r[1] - r[0])
    body = [op for a, op, _ in code if lo <= a <= hi]
    return LoopStats(len(body), sum(op.startswith("SHFL") for op in body), sum(op.startswith("BAR") for op in body))


def resources(cubin: bytes) -> Resources:
    out = _cuobjdump(cubin, "--dump-resource-usage")
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return Resources(int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1)


def widest_load(ptx: str, kernel: str, param: int) -> int:
    """Bytes of the widest global load whose address derives from pointer parameter `param`."""
    seed = re.findall(rf"ld\.param\.\w+\s+(%\w+),\s*\[{re.escape(kernel)}_param_{param}\]", ptx)
    tainted = set(seed)
    lines = [ln.strip() for ln in ptx.splitlines() if ln.strip() and not ln.strip().startswith(("//", "."))]
    changed = True
    while changed:  # registers reassigned in a loop (phi moves) are joined by iterating to a fixed point
        changed = False
        for ln in lines:
            body = ln.split(" ", 1)[1] if ln.startswith("@") else ln
            if body.startswith(("ld.", "st.", "@", "bra", "ret", "setp")):
                continue
            regs = _REG.findall(body)
            if len(regs) >= 2 and regs[0] not in tainted and any(r in tainted for r in regs[1:]):
                tainted.add(regs[0])
                changed = True
    widest = 0
    for vec, bits, _, addr in _LD_GLOBAL.findall(ptx):
        if addr in tainted:
            widest = max(widest, int(vec or 1) * int(bits) // 8)
    return widest
