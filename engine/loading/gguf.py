"""GGUF reading: a small struct-based parser of the header (metadata + tensor infos) and a
memory-mapped view of the tensor data.

`gguf.GGUFReader` parses every array eagerly (about 2 s for a 50k vocabulary, 6 s for 150k);
reading the key/value section ourselves takes a few tens of milliseconds, which matters for a
server's start-up. Tensor bytes are never copied here: each `QuantTensor` views the mmap.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"

# ggml type id -> (name, block size in elements, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file we cannot read or do not support (message names what and where)."""


def type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type][0]
    try:  # name types we do not run (IQ*, TQ*, ...) the way llama.cpp does
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"ggml type {ggml_type}"


@dataclass
class QuantTensor:
    """A weight as GGUF stores it.

    `data` is uint8 [rows, bytes_per_row] holding the raw blocks of each row; `shape` is the
    logical torch-order shape (rows, cols) (GGUF lists dims fastest first, we reverse them).
    1-D tensors have shape (n,) and data [1, nbytes].
    """

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: torch.Tensor

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device: torch.device | str) -> "QuantTensor":
        return QuantTensor(self.name, self.ggml_type, self.shape, self.data.to(device))


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first)
    ggml_type: int
    offset: int  # relative to the data section


class _Reader:
    """Parses from an in-memory buffer (mmap) by offset: far faster than file reads."""

    def __init__(self, buf: Any, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFError("truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > len(self.buf) - self.pos:
            raise GGUFError(f"implausible string length {n}")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int) -> list[str]:
        buf, pos, out = self.buf, self.pos, []
        unpack_from = struct.unpack_from
        for _ in range(n):
            (ln,) = unpack_from("<Q", buf, pos)
            pos += 8
            out.append(buf[pos : pos + ln].decode("utf-8", errors="replace"))
            pos += ln
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALAR:  # bulk read numeric arrays
                dt = np.dtype(_SCALAR[itype])
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += dt.itemsize * n
                return arr.tolist()
            if itype == _STRING:
                return self.strings(n)
            return [self.value(itype) for _ in range(n)]
        raise GGUFError(f"unknown GGUF value type {vtype}")


def _read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse_header(path, mm)


def _parse_header(path: Path, buf: Any) -> tuple[dict[str, Any], list[TensorInfo], int]:
    r = _Reader(buf, 4)
    version = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        ggml_type, offset = r.unpack("<I"), r.unpack("<Q")
        infos.append(TensorInfo(name, tuple(reversed(dims)), ggml_type, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = (r.pos + align - 1) // align * align
    return meta, infos, data_start


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata (fast: no tensor data touched)."""
    return _read_header(Path(path))[0]


class GGUFFile:
    """An opened GGUF file: metadata, tensor infos, and lazily mapped tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"model file not found: {self.path}")
        self.metadata, infos, self._data_start = _read_header(self.path)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self._mm: mmap.mmap | None = None

    def check_types(self) -> None:
        """Fail before any weight is read if a tensor uses a type we cannot run."""
        bad = sorted({(t.name, t.ggml_type) for t in self.tensors.values() if t.ggml_type not in GGML_TYPES})
        if bad:
            name, tid = bad[0]
            raise GGUFError(
                f"unsupported tensor type {type_name(tid)} (tensor {name!r}, {len(bad)} tensors affected); "
                f"supported: {', '.join(n for n, _, _ in GGML_TYPES.values())}"
            )

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set (MADV_DONTNEED): after loading,
        backends that copied or repacked the weights never read them again, yet every page read
        while loading would otherwise stay counted in RSS (the whole file). Views still in use
        (an embedding looked up from the file) simply fault their pages back in on access."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def _buffer(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def tensor(self, name: str) -> QuantTensor:
        info = self.tensors[name]
        tname, block, bsize = GGML_TYPES[info.ggml_type]
        cols = info.shape[-1]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        if cols % block:
            raise GGUFError(f"tensor {name}: row length {cols} is not a multiple of the {tname} block {block}")
        row_bytes = cols // block * bsize
        start = self._data_start + info.offset
        arr = np.frombuffer(self._buffer(), dtype=np.uint8, count=rows * row_bytes, offset=start)
        # torch warns on read-only buffers; the tensor is never written.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.from_numpy(arr).view(rows, row_bytes)
        return QuantTensor(name, info.ggml_type, info.shape, data)
