"""Safetensors checkpoints (one file or shards named by `model.safetensors.index.json`), memory-mapped.

Every header is read and checked before any tensor byte is touched: a missing shard, a header that
is truncated or not JSON, offsets past the end of the file, a size that does not match the shape,
or a dtype we cannot run is a CheckpointError naming the file and the problem. Tensors come out as
`QuantTensor`s of type F32/F16/BF16 whose bytes view the mmap (no copy), so the one decoder
(engine/model.py) and every backend's `prepare_weight` take them as they take GGUF tensors.

Reading headers needs no torch (the model router describes folders without it). The header
(8-byte little-endian length, then JSON) is parsed here rather than through
`safetensors.safe_open`: the loader needs the byte offsets to map tensors itself, and to drop the
pages it has read (`release_pages`, as engine/loading/gguf.py does) so that loading a checkpoint
never holds the whole file in the resident set. The `safetensors` library writes checkpoints
(engine/loading/convert.py) and checks ours in the tests.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf import QuantTensor

# safetensors dtype -> (ggml type, bytes per element): the float types every backend takes
DTYPES = {"F32": (0, 4), "F16": (1, 2), "BF16": (30, 2)}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A Hugging Face checkpoint we cannot read (the message names the file and the problem)."""


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def ggml_type(self) -> int:
        return DTYPES[self.dtype][0] if self.dtype in DTYPES else -1


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, every offset and size checked against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {n} but the file "
                                      f"has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})") from None
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                                  f"{data_len}): the file is truncated or corrupt")
        want = math.prod(shape) * ITEMSIZE.get(dtype, 0)
        if dtype in ITEMSIZE and end - begin != want:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes, its shape {list(shape)} "
                                  f"of {dtype} needs {want}")
        out[name] = TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, else the one file."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard {missing[0]} is missing from {folder}"
                                  + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))
        return [folder / s for s in shards]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX}" + (f" (and {len(found)} other .safetensors files)"
                                                               if found else ""))


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder by their checkpoint names, mapped lazily per file."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorEntry] = {}
        for path in checkpoint_files(self.folder):
            for name, entry in read_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {self.tensors[name].file.name}")
                self.tensors[name] = entry
        self._maps: dict[Path, mmap.mmap] = {}

    def check_dtypes(self, names: list[str]) -> None:
        """Fail before any weight is read if a tensor the model needs has a dtype we cannot run."""
        bad = [self.tensors[n] for n in names if self.tensors[n].dtype not in DTYPES]
        if bad:
            t = bad[0]
            raise CheckpointError(f"{t.file}: tensor {t.name!r} has dtype {t.dtype} ({len(bad)} tensors affected); "
                                  f"supported: {', '.join(DTYPES)} (quantized checkpoints: use their GGUF file)")

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def tensor(self, name: str) -> QuantTensor:
        """A view of the mmap as the raw rows of a float QuantTensor (copied only if misaligned)."""
        import torch

        e = self.tensors[name]
        ggml_type, item = DTYPES[e.dtype]
        shape = e.shape or (1,)
        cols = shape[-1]
        rows = e.nbytes // max(cols * item, 1)
        arr = np.frombuffer(self._map(e.file), dtype=np.uint8, count=e.nbytes, offset=e.start)
        if e.start % item:  # typed views need aligned storage (the format does not promise it)
            arr = arr.copy()
        with warnings.catch_warnings():  # torch warns on read-only buffers; the tensor is never written
            warnings.simplefilter("ignore")
            data = torch.from_numpy(arr).view(rows if len(shape) > 1 else 1, -1)
        return QuantTensor(name, ggml_type, shape, data)

    def release_pages(self) -> None:
        """Drop the pages read so far from the resident set (see GGUFFile.release_pages)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mm in self._maps.values():
                mm.madvise(mmap.MADV_DONTNEED)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in {e.file for e in self.tensors.values()})
