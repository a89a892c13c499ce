"""Compiles the C kernels in csrc/ once per machine and loads them with ctypes.

The library is built with the C compiler the machine has (`$CC`, else cc/gcc/clang) for its own
CPU (-march=native: AVX-512 VNNI where present, a portable path otherwise) and cached under
$LLAMATRON_HOME/cpu-kernels/<hash of sources, compiler, flags and CPU>/. No compiler, or a
failed build, means no library: the CPU backend then falls back to the torch reference ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("llamatron.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("pool.c", "qgemm.c", "attention.c", "elementwise.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-std=c11")

_p, _i64, _f, _i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "lt_set_threads": ([_i], _i),
    "lt_get_threads": ([], _i),
    "lt_has_vnni": ([], _i),
    "lt_quantize_rows": ([_p, _i64, _i64, _i64, _p, _p, _p, _p], None),
    "lt_linear": ([_p, _i64, _i64, _p, _p, _p], _i),
    "lt_qgemm": ([_p, _p, _p, _p, _p, _i64, _p, _p], None),
    "lt_paged_attention": ([_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f, _i64, _f],
                           _i),
    "lt_store_kv": ([_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64], None),
    "lt_rms_norm": ([_p, _p, _p, _p, _p, _i64, _i64, _f], None),
    "lt_rope": ([_p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i], None),
    "lt_gated_act": ([_p, _p, _i64, _i64, _i64, _i64, _p, _i], None),
}
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}  # -march value -> library (None: could not build)


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_id() -> str:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _key(cc: str, march: str) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, "common.h"):
        h.update((CSRC / name).read_bytes())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join((version, *FLAGS, march, _cpu_id(), platform.machine())).encode())
    return h.hexdigest()[:16]


def _build(cc: str, march: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        cmd = [cc, *FLAGS, f"-march={march}", "-o", str(so), *(str(CSRC / s) for s in SOURCES), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(so, out)  # atomic: a concurrent build never sees half a library


def load(march: str = "native") -> ctypes.CDLL | None:
    """The kernel library for `march` (built on first use), or None when this machine cannot build
    it. "native" is the machine's own CPU; tests also build a portable variant ("x86-64-v2": no
    AVX-512, the scalar paths)."""
    with _lock:
        if march not in _libs:
            _libs[march] = _load(march)
        return _libs[march]


def _load(march: str) -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the CPU backend uses the torch reference ops")
        return None
    home = Path(os.environ.get("LLAMATRON_HOME", "~/.cache/llamatron")).expanduser()
    path = home / "cpu-kernels" / _key(cc, march) / "libllamatron_cpu.so"
    try:
        if not path.is_file():
            log.info("building the CPU kernels with %s for %s (once per machine)", cc, march)
            _build(cc, march, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("CPU kernels unavailable, using the torch reference ops: %s", e)
        return None
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib
