"""GGUF reading: a small struct-based parser of the header (metadata + tensor infos) and a
memory-mapped view of the tensor data.

`gguf.GGUFReader` parses every array eagerly (about 2 s for a 50k vocabulary, 6 s for 150k);
reading the key/value section ourselves takes a few tens of milliseconds, which matters for a
server's start-up. Tensor bytes are never copied here: each `QuantTensor` views the mmap.

A model split by llama.cpp's gguf-split (`name-00001-of-00003.gguf`, ...) is one GGUFFile: the
first file holds the metadata and `split.count`, every file its own tensor infos and data section.
Reading headers needs no torch (the model router lists models without importing it).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
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

    def to(self, device: "torch.device | str") -> "QuantTensor":
        return QuantTensor(self.name, self.ggml_type, self.shape, self.data.to(device))


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first)
    ggml_type: int
    offset: int  # relative to the data section
    shard: int = 0  # which file of a split model holds it


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
            try:
                return _parse_header(path, mm)
            except GGUFError as e:
                raise GGUFError(f"{path.name}: {e}" if path.name not in str(e) else str(e)) from None
            except (struct.error, ValueError, OverflowError, MemoryError) as e:  # cut short or garbled
                raise GGUFError(f"{path.name}: truncated or corrupt GGUF header ({e})") from None


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


def tensor_nbytes(info: TensorInfo) -> int:
    _, block, bsize = GGML_TYPES[info.ggml_type]
    return int(np.prod(info.shape, dtype=np.int64)) // block * bsize


SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(first: Path, count: int) -> list[Path]:
    """The files of a model gguf-split cut into `count` parts, named after its first part."""
    m = SPLIT_NAME.match(first.name)
    if m is None or int(m["no"]) != 1 or int(m["count"]) != count:
        raise GGUFError(f"{first.name}: split.count is {count}, but the name is not <name>-00001-of-{count:05d}.gguf")
    return [first.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


@dataclass
class _Shard:
    path: Path
    data_start: int
    mm: mmap.mmap | None = None


class GGUFFile:
    """An opened GGUF file (or the parts of a split one): metadata, tensor infos, and lazily
    mapped tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"model file not found: {self.path}")
        self.metadata, infos, data_start = _read_header(self.path)
        self._shards = [_Shard(self.path, data_start)]
        count = int(self.metadata.get("split.count", 1) or 1)
        for i, part in enumerate(split_paths(self.path, count)[1:] if count > 1 else [], start=1):
            if not part.is_file():
                raise GGUFError(f"{self.path.name}: part {i + 1} of {count} is missing ({part.name})")
            meta, more, start = _read_header(part)
            if int(meta.get("split.no", -1)) != i:
                raise GGUFError(f"{part.name}: split.no is {meta.get('split.no')}, expected {i}")
            self._shards.append(_Shard(part, start))
            infos += [TensorInfo(t.name, t.shape, t.ggml_type, t.offset, i) for t in more]
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}
        self._check_sizes()

    def _check_sizes(self) -> None:
        """A truncated download fails here, naming the file, rather than deep inside a weight read."""
        ends = [0] * len(self._shards)
        for t in self.tensors.values():
            if t.ggml_type in GGML_TYPES:
                ends[t.shard] = max(ends[t.shard], t.offset + tensor_nbytes(t))
        for shard, end in zip(self._shards, ends):
            size = shard.path.stat().st_size
            if shard.data_start + end > size:
                raise GGUFError(f"{shard.path.name}: truncated: the tensors need {shard.data_start + end} bytes, "
                                f"the file has {size}")

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self._shards]

    def file_offset(self, name: str) -> tuple[Path, int]:
        """Which file holds tensor `name`'s data, and at which byte."""
        info = self.tensors[name]
        shard = self._shards[info.shard]
        return shard.path, shard.data_start + info.offset

    @property
    def _mm(self) -> mmap.mmap | None:
        """The first file's map: None until a weight is read."""
        return self._shards[0].mm

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
        for shard in self._shards:
            if shard.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
                shard.mm.madvise(mmap.MADV_DONTNEED)

    def _buffer(self, shard: int) -> mmap.mmap:
        s = self._shards[shard]
        if s.mm is None:
            with open(s.path, "rb") as f:
                s.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return s.mm

    def tensor(self, name: str) -> QuantTensor:
        import warnings

        import torch

        info = self.tensors[name]
        tname, block, bsize = GGML_TYPES[info.ggml_type]
        cols = info.shape[-1]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        if cols % block:
            raise GGUFError(f"tensor {name}: row length {cols} is not a multiple of the {tname} block {block}")
        row_bytes = cols // block * bsize
        start = self._shards[info.shard].data_start + info.offset
        arr = np.frombuffer(self._buffer(info.shard), dtype=np.uint8, count=rows * row_bytes, offset=start)
        with warnings.catch_warnings():  # torch warns on read-only buffers; the tensor is never written
            warnings.simplefilter("ignore")
            data = torch.from_numpy(arr).view(rows, row_bytes)
        return QuantTensor(name, info.ggml_type, info.shape, data)
