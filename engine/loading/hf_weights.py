"""A safetensors checkpoint seen through GGUF names: what `Model.from_gguf` reads, for HF folders.

It offers the GGUFFile surface the decoder's loader uses (`tensors` with ggml type and shape,
`tensor(name)`, `check_types`, `release_pages`, `path`), so engine/model.py has one way to load
weights whatever the file format. Tensors view the mmap as F32/F16/BF16 QuantTensors; with a
quantize type, matrices are quantized here, one at a time, into GGUF blocks. Gemma's norm
weights are stored as w - 1 in checkpoints (HF Gemma multiplies by 1 + w): the 1 is added here.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import torch

from ..config import ModelConfig
from .gguf import QuantTensor, TensorInfo
from .hf_names import hf_to_gguf, is_norm
from .quantize import quantize, target_type
from .safetensors_file import CheckpointError, SafetensorsCheckpoint


# checkpoint tensors no forward pass reads: rotary and position-id buffers, BERT's pooler and
# masked-LM heads (sentence-transformers pools the hidden states itself)
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|position_ids$|^(bert\.)?pooler\.|^cls\.")


class HFWeights:
    def __init__(self, ckpt: SafetensorsCheckpoint, cfg: ModelConfig, quant_type: int | None = None) -> None:
        self.ckpt, self.cfg, self.path = ckpt, cfg, ckpt.folder
        self.names = hf_to_gguf(cfg.arch, list(ckpt.tensors))  # GGUF name -> checkpoint name
        self.tensors: dict[str, TensorInfo] = {}
        for g, h in self.names.items():
            e = ckpt.tensors[h]
            self.tensors[g] = TensorInfo(g, e.shape, target_type(e.ggml_type, e.shape, quant_type), 0)
        if "output.weight" not in self.tensors:  # no lm_head: the embedding is the output (as HF ties it)
            cfg.tied_embeddings = True
        if cfg.tied_embeddings:  # a tied checkpoint may still carry a copy of the embedding as lm_head
            self.tensors.pop("output.weight", None)

    def check_types(self) -> None:
        self.ckpt.check_dtypes(list(self.names.values()))

    def check_names(self, needed: list[str]) -> None:
        """A clear error naming the checkpoint tensors that are missing, or present but unknown to
        the model (a variant it would run wrongly, e.g. an o_proj bias), before any is read."""
        from .hf_names import gguf_to_hf

        def listed(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        missing = [gguf_to_hf(self.cfg.arch, n) or n for n in needed if n not in self.tensors]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensors for {self.cfg.arch}: {listed(missing)}")
        used = {self.names[n] for n in needed} | {self.names.get("output.weight")}  # a tied copy: unused, harmless
        extra = sorted(n for n in self.ckpt.tensors if n not in used and not _IGNORED.search(n))
        if extra:
            raise CheckpointError(f"{self.path}: tensors that {self.cfg.arch} as llamatron runs it has no place for: "
                                  f"{listed(extra)}")

    def tensor(self, name: str) -> QuantTensor:
        qt = self.ckpt.tensor(self.names[name])
        qt = QuantTensor(name, qt.ggml_type, qt.shape, qt.data)
        if self.cfg.arch == "gemma3" and is_norm(name):
            from kernels.ref_quant import dequantize

            w = dequantize(qt.data, qt.ggml_type, qt.shape) + 1.0
            return QuantTensor(name, 0, qt.shape, w.view(torch.uint8).reshape(1, -1))
        want = self.tensors[name].ggml_type
        if want == qt.ggml_type:
            return qt
        return quantize(qt, want, self.ckpt.release_pages)  # the blocks made no longer need the file's pages

    def release_pages(self) -> None:
        """The file's pages read so far, and the heap that quantizing freed, back to the system:
        glibc keeps freed temporaries (tens of MB per matrix) in its heap, which the resident set
        would otherwise count until the process ends."""
        self.ckpt.release_pages()
        trim_heap()


def trim_heap() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc: nothing to trim
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None
