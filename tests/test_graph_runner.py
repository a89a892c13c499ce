"""The capture-independent parts of the decode graphs (engine/core/graph_runner.py), on CPU: the packed
metadata buffer, the step the graph captures (forward + lm_head + greedy argmax) against the sampler,
the cuda_graphs modes, and the whole engine driving the graph runner with the step run eagerly."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.core.graph_runner import (
    CudaGraphRunner,
    GraphCaptureError,
    PackedLayout,
    capture_decode_graphs,
    decode_buckets,
    decode_step,
    graph_mode,
)
from engine.core.runner import StepMetadata
from engine.core.sampling import Sampler, SamplingParams, greedy_token_ids, is_plain_greedy
from tests.synth import SMOLLM2, write_tiny_model

needs_tokenizer = pytest.mark.skipif(not SMOLLM2.exists(), reason="needs the smollm2 tokenizer metadata")
BS = 4  # block size of the hand-made steps


# ---- cuda_graphs modes -----------------------------------------------------------------------------
def test_graph_mode_values() -> None:
    assert [graph_mode(v) for v in (True, False, "auto", "require", "off", " Require ")] == [
        "auto", "off", "auto", "require", "off", "require"]
    for bad in ("on", "yes", 1, None):
        with pytest.raises(ValueError):
            graph_mode(bad)


def test_capture_failure_is_an_error_only_when_required(caplog) -> None:
    def fail():
        raise RuntimeError("operation not permitted when stream is capturing")

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with caplog.at_level(logging.WARNING, "llamatron.runner"):
        assert capture_decode_graphs("auto", cuda, fail) is None
    assert "running eagerly" in caplog.text
    with pytest.raises(GraphCaptureError, match="stream is capturing"):
        capture_decode_graphs("require", cuda, fail)
    with pytest.raises(GraphCaptureError, match="CUDA device"):
        capture_decode_graphs("require", cpu, fail)
    made = []
    assert capture_decode_graphs("off", cuda, lambda: made.append(1)) is None
    assert capture_decode_graphs("auto", cpu, lambda: made.append(1)) is None
    assert not made
    assert capture_decode_graphs("require", cuda, lambda: "runner") == "runner"


def test_buckets() -> None:
    assert decode_buckets(1) == [1]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


# ---- the packed metadata buffer --------------------------------------------------------------------
def decode_metadata(lens: list[int], last_ids: list[int], rng: random.Random) -> StepMetadata:
    """One decode token per sequence; sequence i holds lens[i] tokens after the step."""
    tables = [[rng.randrange(1000) for _ in range(-(-n // BS))] for n in lens]
    slots = [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lens, strict=True)]
    return StepMetadata(list(last_ids), [n - 1 for n in lens], slots, tables, list(lens), list(range(len(lens) + 1)))


def unpack(lay: PackedLayout, buf: torch.Tensor) -> dict[str, list]:
    return {k: v.tolist() for k, v in vars(lay.views(buf)).items()}


def test_pack_round_trip_with_padding_rows() -> None:
    rng = random.Random(0)
    lay = PackedLayout(rows=4, max_blocks=5)
    host = torch.full((lay.words + 7,), 12345, dtype=torch.int32)  # larger than needed, dirty
    big = 2**40 + 3  # int64 fields keep values past int32
    step = decode_metadata([17, 3, 20], [big, 7, 49151], rng)
    step.slot_mapping[1] = big
    lay.pack(host, step)
    dev = torch.zeros(lay.words, dtype=torch.int32)
    dev.copy_(host[: lay.words])  # the one copy: the device reads the same layout
    got = unpack(lay, dev)
    assert got["input_ids"] == [big, 7, 49151, 0]
    assert got["positions"] == [16, 2, 19, 0]
    assert got["slot_mapping"] == step.slot_mapping + [-1]
    assert got["block_tables"] == [t + [0] * (5 - len(t)) for t in step.block_tables] + [[0] * 5]
    assert got["seq_lens"] == [17, 3, 20, 0]
    assert got["cu_seqlens_q"] == [0, 1, 2, 3, 3]
    for name, v in vars(lay.views(dev)).items():
        assert v.data_ptr() % v.element_size() == 0, name
    assert host[lay.words :].tolist() == [12345] * 7  # nothing written past the layout

    lay.pack(host, decode_metadata([2], [5], rng))  # a smaller step leaves nothing stale behind
    got = unpack(lay, host)
    assert got["input_ids"] == [5, 0, 0, 0] and got["slot_mapping"][1:] == [-1] * 3
    assert got["block_tables"][1:] == [[0] * 5] * 3 and got["seq_lens"] == [2, 0, 0, 0]
    assert got["cu_seqlens_q"] == [0, 1, 1, 1, 1]

    lay.pack(host, None)  # all padding (graph warm-up and capture)
    got = unpack(lay, host)
    assert got["slot_mapping"] == [-1] * 4 and got["seq_lens"] == [0] * 4 and got["cu_seqlens_q"] == [0] * 5


def test_pack_rejects_what_does_not_fit() -> None:
    lay = PackedLayout(rows=2, max_blocks=3)
    host = torch.zeros(lay.words, dtype=torch.int32)
    with pytest.raises(ValueError):
        lay.pack(host, decode_metadata([1, 1, 1], [1, 2, 3], random.Random(0)))
    prefill = StepMetadata([1, 2], [0, 1], [0, 1], [[0]], [2], [0, 2])  # two tokens of one sequence
    with pytest.raises(ValueError):
        lay.pack(host, prefill)
    with pytest.raises(ValueError):
        lay.views(torch.zeros(lay.words - 1, dtype=torch.int32))


# ---- greedy: the graph's argmax is the sampler's temperature-0 pick --------------------------------
class Row:
    def __init__(self, params: SamplingParams, prompt=(1, 2), out=()) -> None:
        self.params, self.prompt_token_ids = params, list(prompt)
        self.token_ids, self.generator = list(prompt) + list(out), None


def test_greedy_ties_match_the_sampler() -> None:
    inf = float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [-inf, -inf, 5.0, 5.0], [2.0, -inf, 2.0, 1.0]])
    rows = [Row(SamplingParams(temperature=0)) for _ in range(4)]
    assert greedy_token_ids(logits).tolist() == Sampler(4)(logits, rows).token_ids == [1, 0, 2, 0]


def test_plain_greedy_is_exactly_what_the_sampler_leaves_alone() -> None:
    assert is_plain_greedy(Row(SamplingParams(temperature=0)))
    assert is_plain_greedy(Row(SamplingParams(temperature=0, seed=3, top_p=0.5, top_k=2, min_p=0.1)))
    assert is_plain_greedy(Row(SamplingParams(temperature=0, min_tokens=1), out=[4]))  # ban no longer applies
    for p, out in [
        (SamplingParams(temperature=0.7), ()),
        (SamplingParams(temperature=0, logprobs=0), ()),
        (SamplingParams(temperature=0, logit_bias={3: 1.0}), ()),
        (SamplingParams(temperature=0, repetition_penalty=1.1), ()),
        (SamplingParams(temperature=0, presence_penalty=0.5), ()),
        (SamplingParams(temperature=0, frequency_penalty=0.5), ()),
        (SamplingParams(temperature=0, grammar=object()), ()),
        (SamplingParams(temperature=0, min_tokens=2), (4,)),
    ]:
        assert not is_plain_greedy(Row(p, out=out)), p


# ---- the captured step, run eagerly ----------------------------------------------------------------
def _load(tmp_path, device: str, vocab_size: int | None = None, **cfg):
    from engine.loading.loader import load_model

    path = write_tiny_model(tmp_path / "g.gguf", n_layers=1, vocab_size=vocab_size)
    return load_model(EngineConfig(model=str(path), device=device, max_model_len=64, cpu_weights="exact", **cfg))


def _prefill_then_decode(model, kv, lens: list[int], rows: int, vocab: int):
    """Prefills sequences of lens[i] - 1 tokens eagerly, then runs one decode token each through
    decode_step over a packed buffer of `rows` rows; returns (decode outputs [rows], eager hidden [B])."""
    rng = random.Random(1)
    B = len(lens)
    tables = [[i * 8 + j for j in range(-(-n // BS))] for i, n in enumerate(lens)]
    toks = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
    slot = lambda t, p: t[p // BS] * BS + p % BS  # noqa: E731
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n - 1)
    pre = StepMetadata(sum((t[:-1] for t in toks), []), sum((list(range(n - 1)) for n in lens), []),
                       [slot(t, p) for t, n in zip(tables, lens, strict=True) for p in range(n - 1)], tables,
                       [n - 1 for n in lens], cu)
    model.forward(*pre.to_device(torch.device("cpu"), BS), kv)
    step = StepMetadata([t[-1] for t in toks], [n - 1 for n in lens],
                        [slot(t, n - 1) for t, n in zip(tables, lens, strict=True)], tables, list(lens),
                        list(range(B + 1)))
    lay = PackedLayout(rows, 8)
    buf = torch.zeros(lay.words, dtype=torch.int32)
    lay.pack(buf, step)
    v = lay.views(buf)
    kv_eager = [(k.clone(), vv.clone()) for k, vv in kv]
    out = decode_step(model, v.input_ids, v.positions, v.meta(BS, 64), kv)
    eager = model.forward(*step.to_device(torch.device("cpu"), BS), kv_eager)
    return out, eager


@needs_tokenizer
def test_decode_step_matches_the_sampler_torch_backend(tmp_path) -> None:
    loaded = _load(tmp_path, "cpu")
    model, V = loaded.model, loaded.config.vocab_size
    kv = model.allocate_kv_cache(32, BS)
    out, eager_hidden = _prefill_then_decode(model, kv, [5, 9, 2], rows=4, vocab=V)  # row 3 is padding
    assert out.logits.shape == (4, V) and out.logits.dtype == torch.float32 and out.token_ids.dtype == torch.int64
    greedy = [Row(SamplingParams(temperature=0)) for _ in range(3)]
    assert out.token_ids[:3].tolist() == Sampler(V)(out.logits[:3], greedy).token_ids
    torch.testing.assert_close(out.hidden[:3], eager_hidden, atol=1e-4, rtol=1e-4)
    ref = model.compute_logits(eager_hidden)
    torch.testing.assert_close(out.logits[:3], ref, atol=1e-3, rtol=1e-4)


@needs_tokenizer
def test_decode_step_triton_backend_interpreted(tmp_path) -> None:
    """The Triton backend (interpreter on CPU) through the same step: argmax = the sampler's greedy
    pick on its logits, and logits within 1e-3 of the torch reference."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is the CPU stand-in for the captured graph")
    ref_loaded, tri_loaded = _load(tmp_path, "cpu", vocab_size=1024), _load(tmp_path, "triton", vocab_size=1024)
    V = tri_loaded.config.vocab_size
    outs = []
    for loaded in (ref_loaded, tri_loaded):
        kv = loaded.model.allocate_kv_cache(32, BS)
        outs.append(_prefill_then_decode(loaded.model, kv, [6, 3], rows=2, vocab=V)[0])
    ref, tri = outs
    greedy = [Row(SamplingParams(temperature=0)) for _ in range(2)]
    assert tri.token_ids.tolist() == Sampler(V)(tri.logits, greedy).token_ids
    assert (tri.logits - ref.logits).abs().max().item() < 1e-3


# ---- the engine driving the graph runner (step run eagerly) ----------------------------------------
@needs_tokenizer
def test_engine_through_the_graph_runner_matches_eager(tmp_path, monkeypatch) -> None:
    from engine.core.engine import LLMEngine

    loaded = _load(tmp_path, "cpu")
    V = loaded.config.vocab_size
    prompts = [[random.Random(i).randrange(100, V) for _ in range(4 + 3 * i)] for i in range(3)]

    def engine(graphs: bool) -> LLMEngine:
        cfg = EngineConfig(model=str(loaded.path), device="cpu", max_model_len=64, max_num_seqs=4,
                           cpu_weights="exact", cuda_graphs="auto")
        eng = LLMEngine(cfg, loaded, num_blocks=32)
        if graphs:
            r = eng.runner
            eng.runner.graphs = CudaGraphRunner(loaded.model, r.kv_caches, 4, r.max_blocks_per_seq, r.block_size,
                                                64, capture=False)
        return eng

    def counted(calls: dict[str, int], key: str, fn):
        def wrapped(*args, **kw):
            calls[key] += 1
            return fn(*args, **kw)

        return wrapped

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=6, logprobs=2, ignore_eos=True)
    for params, path in [(greedy, "ids"), (sampled, "sampler")]:
        want = engine(False).generate(prompts, params)
        eng = engine(True)
        assert eng.runner.graphs.buckets == [1, 2, 4]
        sampler, sampled_ids = eng.runner.sampler.__call__, eng.runner.graphs.sampled_ids
        calls = {"sampler": 0, "ids": 0}
        monkeypatch.setattr(eng.runner, "sampler", counted(calls, "sampler", sampler))
        monkeypatch.setattr(eng.runner.graphs, "sampled_ids", counted(calls, "ids", sampled_ids))
        got = eng.generate(prompts, params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        for a, b in zip(want, got, strict=True):
            for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
        # 6 tokens: the (eager) prefill step samples the first, then 5 decode steps of 3 sequences (bucket 4)
        assert calls == ({"sampler": 1, "ids": 5} if path == "ids" else {"sampler": 6, "ids": 0})
        v = eng.runner.graphs.views[4]  # the last step's padding row, written by the same packed copy
        assert v.slot_mapping[3].item() == -1 and v.seq_lens[3].item() == 0 and v.cu_seqlens_q.tolist()[-2:] == [3, 3]


@needs_tokenizer
def test_host_buffers_alternate_behind_their_copy_fences(tmp_path, monkeypatch) -> None:
    """Each step packs into the host buffer whose previous copy has finished (its fence waited),
    copies once, then fences that copy; consecutive steps use the two buffers in turn."""
    loaded = _load(tmp_path, "cpu")
    model = loaded.model
    g = CudaGraphRunner(model, model.allocate_kv_cache(8, BS), 2, 4, BS, 16, capture=False)
    events: list[tuple[str, int]] = []

    class Fence:
        def __init__(self, i: int) -> None:
            self.i = i

        def wait(self) -> None:
            events.append(("wait", self.i))

        def record(self) -> None:
            events.append(("record", self.i))

    g.fences = [Fence(0), Fence(1)]
    pack = PackedLayout.pack

    def spy(lay, buf, step):
        events.append(("pack", next(i for i, h in enumerate(g.host_bufs) if h.data_ptr() == buf.data_ptr())))
        pack(lay, buf, step)

    monkeypatch.setattr(PackedLayout, "pack", spy)
    first = g.turn
    for _ in range(3):
        g.run(StepMetadata([7], [0], [0], [[0]], [1], [0, 1]))
    a, b = first, first ^ 1
    assert events == [("wait", a), ("pack", a), ("record", a), ("wait", b), ("pack", b), ("record", b),
                      ("wait", a), ("pack", a), ("record", a)]


@needs_tokenizer
def test_engine_cuda_graphs_option(tmp_path) -> None:
    from engine.core.engine import LLMEngine

    loaded = _load(tmp_path, "cpu")
    for value in (True, False, "auto", "off"):  # CPU: eager, no error
        cfg = EngineConfig(model=str(loaded.path), device="cpu", max_model_len=64, cuda_graphs=value)
        assert LLMEngine(cfg, loaded, num_blocks=8).runner.graphs is None
    with pytest.raises(GraphCaptureError):
        LLMEngine(EngineConfig(model=str(loaded.path), device="cpu", max_model_len=64, cuda_graphs="require"),
                  loaded, num_blocks=8)
    with pytest.raises(ValueError):
        LLMEngine(EngineConfig(model=str(loaded.path), device="cpu", max_model_len=64, cuda_graphs="maybe"),
                  loaded, num_blocks=8)
