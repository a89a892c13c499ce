"""Decode steps (one token per sequence) replayed from CUDA graphs, with lm_head and greedy argmax inside.

Per step the host does three things around one `graph.replay()`:
1. packs the step's metadata (ids, positions, KV slots, block tables, seq lens, cu_seqlens) and the
   padding rows into ONE int32 buffer (PackedLayout.pack) and copies it with ONE non-blocking copy
   from pinned memory into the static device buffer the graph reads through typed views;
2. replays the graph: forward + lm_head + greedy argmax (decode_step) for the bucket;
3. either copies the sampled ids back (one non-blocking copy into pinned memory + one sync) when
   every sequence is plain greedy, or hands the graph's logits to the sampler.

Two pinned host buffers alternate, each fenced by the event of the copy that last read it, so a
buffer is never rewritten while an earlier asynchronous copy may still read it.

A batch of B sequences runs the smallest bucket b >= B; rows B.. are padding: slot -1 (no KV
write), seq_len 0 and q_len 0 (cu_seqlens stays at B), so attention skips them and their rows are
never read. Requires graph-safe ops (the Triton backend: no host syncs, no data-dependent
allocation); max_seqlen_k is fixed at max_model_len for the capture.

Everything but the capture itself runs on CPU too (`capture=False` calls the step eagerly), which
is how tests/test_graph_runner.py covers the packing, the step function and the runner's flow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from kernels import AttentionMetadata

from .sampling import greedy_token_ids

if TYPE_CHECKING:
    from .step_metadata import StepMetadata

log = logging.getLogger("llamatron.runner")

GraphMode = Literal["auto", "require", "off"]
_MODES: dict[Any, GraphMode] = {True: "auto", False: "off", "auto": "auto", "require": "require", "off": "off"}


class GraphCaptureError(RuntimeError):
    """cuda_graphs="require" and the decode graphs could not be captured."""


def graph_mode(value: bool | str) -> GraphMode:
    """EngineConfig.cuda_graphs -> "auto" (True: capture, run eagerly with a warning when that
    fails), "require" (capture failure raises GraphCaptureError), "off" (False)."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, (bool, str)) and key in _MODES:
        return _MODES[key]
    raise ValueError(f"cuda_graphs: expected auto, require, off, True or False, got {value!r}")


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16, and max_num_seqs itself."""
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)) if b <= max_num_seqs} | {max_num_seqs})


@dataclass
class PackedViews:
    """Typed views of one packed metadata buffer (host or device)."""

    input_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    slot_mapping: torch.Tensor  # [rows] int64, -1 = padding
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    seq_lens: torch.Tensor  # [rows] int32
    cu_seqlens_q: torch.Tensor  # [rows + 1] int32

    def meta(self, block_size: int, max_seqlen_k: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, self.block_tables, self.seq_lens, self.cu_seqlens_q,
                                 max_seqlen_q=1, max_seqlen_k=max_seqlen_k, block_size=block_size)


@dataclass(frozen=True)
class PackedLayout:
    """Where each field of a decode step of `rows` sequences sits in one int32 buffer: the three
    int64 fields first (two words each, so every int64 view starts on an 8-byte boundary), then
    block_tables, seq_lens, cu_seqlens_q."""

    rows: int
    max_blocks: int

    @property
    def words(self) -> int:
        return self.rows * (8 + self.max_blocks) + 1

    def views(self, buf: torch.Tensor) -> PackedViews:
        r, w = self.rows, self.max_blocks
        if buf.dtype != torch.int32 or buf.dim() != 1 or buf.numel() < self.words:
            raise ValueError(f"need a 1-D int32 buffer of >= {self.words} words, got {buf.dtype} {tuple(buf.shape)}")
        i64 = [buf[2 * r * k : 2 * r * (k + 1)].view(torch.int64) for k in range(3)]
        o = 6 * r
        tables = buf[o : o + r * w].view(r, w)
        o += r * w
        return PackedViews(*i64, tables, buf[o : o + r], buf[o + r : o + 2 * r + 1])

    def pack(self, buf: torch.Tensor, step: StepMetadata | None) -> None:
        """Writes `step` (B <= rows sequences, one token each; None: B = 0) and the padding rows B..
        into the host buffer `buf`: id 0, position 0, slot -1, block table 0, seq_len 0, cu_seqlens B."""
        if step is None:
            buf[: self.words].numpy()[:] = 0
            self.views(buf).slot_mapping.fill_(-1)
            return
        B = len(step.seq_lens)
        if B > self.rows or len(step.input_ids) != B or len(step.cu_seqlens_q) != B + 1:
            raise ValueError(f"a decode step of {B} sequences ({len(step.input_ids)} tokens) "
                             f"does not fit {self.rows} rows")
        v = self.views(buf)
        ids, pos, slots = v.input_ids.numpy(), v.positions.numpy(), v.slot_mapping.numpy()
        tables, lens, cu = v.block_tables.numpy(), v.seq_lens.numpy(), v.cu_seqlens_q.numpy()
        ids[:B], ids[B:] = step.input_ids, 0
        pos[:B], pos[B:] = step.positions, 0
        slots[:B], slots[B:] = step.slot_mapping, -1
        tables.fill(0)
        for i, t in enumerate(step.block_tables):
            tables[i, : len(t)] = t
        lens[:B], lens[B:] = step.seq_lens, 0
        cu[: B + 1], cu[B + 1 :] = step.cu_seqlens_q, B


@dataclass
class DecodeOutputs:
    """What a decode step leaves on the device: one row per (padded) sequence."""

    hidden: torch.Tensor  # [b, hidden] last-layer states (prompt logprobs read them)
    logits: torch.Tensor  # [b, vocab] float32, lm_head output (the full sampler reads them)
    token_ids: torch.Tensor  # [b] int64 greedy choice: Sampler's temperature-0 pick on these logits

    def __getitem__(self, rows: slice) -> DecodeOutputs:
        return DecodeOutputs(self.hidden[rows], self.logits[rows], self.token_ids[rows])


def decode_step(model, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> DecodeOutputs:
    """The work a decode graph captures: forward, lm_head on every row, greedy argmax."""
    hidden = model.forward(input_ids, positions, meta, kv_caches)
    logits = model.compute_logits(hidden)
    return DecodeOutputs(hidden, logits, greedy_token_ids(logits))


class _Fence:
    """Marks when an asynchronous copy has finished (a CUDA event); a no-op where copies are synchronous."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # returns at once for an event never recorded


class CudaGraphRunner:
    """One graph per bucketed batch size, captured at start-up over the static packed buffer.

    `capture=False` (tests, CPU) runs the same step eagerly instead of replaying a graph."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks: int, block_size: int,
                 max_model_len: int, capture: bool = True) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.device = dev = model.ops.device
        self.buckets = decode_buckets(max_num_seqs)
        n = self.buckets[-1]
        self.layouts = {b: PackedLayout(b, max_blocks) for b in self.buckets}
        words = self.layouts[n].words
        pin = dev.type == "cuda"
        self.device_buf = torch.zeros(words, dtype=torch.int32, device=dev)
        self.host_bufs = [torch.zeros(words, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.fences = [_Fence(dev), _Fence(dev)]
        self.turn = 0
        self.ids_host = torch.zeros(n, dtype=torch.int64, pin_memory=pin)
        self.views = {b: lay.views(self.device_buf) for b, lay in self.layouts.items()}
        self.block_size, self.max_model_len = block_size, max_model_len
        self.logits: torch.Tensor | None = None  # [n, vocab] shared by every bucket; sized by the first step
        self.steps: dict[int, Callable[[], DecodeOutputs]] = {}
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            self._upload(b, None)  # all rows padding: the warm-up writes no KV
            out = self._step(b)  # warm-up (eager): compiles the kernels, sizes self.logits
            if not capture:
                self.steps[b] = lambda b=b: self._step(b)
                continue
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._step(b)
            pool = g.pool()
            self.steps[b] = _replayer(g, out)
        if capture:
            torch.cuda.synchronize()
            log.info("captured CUDA graphs (forward + lm_head + greedy argmax) for decode batch sizes %s",
                     self.buckets)

    def _step(self, b: int) -> DecodeOutputs:
        v = self.views[b]
        out = decode_step(self.model, v.input_ids, v.positions, v.meta(self.block_size, self.max_model_len),
                          self.kv_caches)
        if self.logits is None:
            self.logits = torch.empty(self.buckets[-1], out.logits.shape[1], dtype=out.logits.dtype,
                                      device=self.device)
        self.logits[:b].copy_(out.logits)  # one buffer for all buckets, not one [b, vocab] per graph
        return DecodeOutputs(out.hidden, self.logits[:b], out.token_ids)

    def _upload(self, b: int, step: StepMetadata | None) -> None:
        """The step's one host-to-device copy (padding included), from the host buffer whose last copy is done."""
        i = self.turn
        self.turn ^= 1
        host, lay = self.host_bufs[i], self.layouts[b]
        self.fences[i].wait()
        lay.pack(host, step)
        self.device_buf[: lay.words].copy_(host[: lay.words], non_blocking=True)
        self.fences[i].record()

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.buckets[-1]

    def run(self, step: StepMetadata) -> DecodeOutputs:
        B = len(step.seq_lens)
        b = next(x for x in self.buckets if x >= B)
        self._upload(b, step)
        return self.steps[b]()[:B]

    def sampled_ids(self, out: DecodeOutputs, rows: list[int]) -> list[int]:
        """The greedy ids of `rows`: one copy back into pinned memory, one sync."""
        host = self.ids_host[: out.token_ids.shape[0]]
        host.copy_(out.token_ids, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        ids = host.tolist()
        return [ids[r] for r in rows]


def capture_decode_graphs(mode: GraphMode, device: torch.device,
                          make: Callable[[], CudaGraphRunner]) -> CudaGraphRunner | None:
    """The graph runner, or None where decode runs eagerly ("off", not CUDA, or "auto" after a failed
    capture, with a warning); "require" raises GraphCaptureError instead of running eagerly."""
    if mode == "off":
        return None
    if device.type != "cuda":
        if mode == "require":
            raise GraphCaptureError(f"cuda_graphs='require' needs a CUDA device, not {device}")
        return None
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - "auto": graphs are an optimization; eager always works
        if mode == "require":
            raise GraphCaptureError(f"CUDA graph capture failed: {e}") from e
        log.warning("CUDA graph capture failed, running eagerly: %s", e)
        return None


def _replayer(g: torch.cuda.CUDAGraph, out: DecodeOutputs) -> Callable[[], DecodeOutputs]:
    def replay() -> DecodeOutputs:
        g.replay()
        return out

    return replay
