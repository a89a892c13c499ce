"""The shipped GGUF models converted to Hugging Face folders (`llamatron convert`, bf16) and served
from safetensors: the same greedy tokens, the same tokenizer on every llama.cpp tokenize fixture,
the same chat templates, a checkpoint `transformers` loads with the same logits, and a load whose
resident memory stays within 1.3x the checkpoint's size.

Teacher-forced comparison: both paths on the same backend and weight format (the fp32 torch
reference, `--cpu-weights exact`), so what differs is only the bf16 rounding of the converted
weights. Measured (2 cores, 2026-12-07): top-1 agreement 1.000 for smollm2 (452 positions) and
gemma3 (509); against llama.cpp's own tokens the folders score as the GGUF files do on that path
(smollm2 0.971, gemma3 0.984; tests/test_greedy.py). Run with -s to see the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA
from engine.config import EngineConfig
from engine.loading.gguf import read_metadata
from engine.loading.loader import load_model
from greedy_eval import evaluate, logprobs_for

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3-270m": "gemma-3-270m"}
TOKENIZE = {**MODELS, "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct"}


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """fixture dir -> (GGUF file, converted bf16 folder), each converted once per session."""
    from conftest import model_file
    from engine.loading.convert import convert

    root = tmp_path_factory.mktemp("converted")
    out = {}
    for fixture, name in MODELS.items():
        gguf = model_file(name)
        out[fixture] = (gguf, convert(gguf, root / name, dtype="bf16"))
    return out


def _exact(path: Path):
    return load_model(EngineConfig(model=str(path), device="cpu", cpu_weights="exact", max_model_len=2048))


_EXACT: dict[Path, object] = {}


def _exact_cached(path: Path):
    """Each exact (fp32) load once per session: the teacher-forced and the served test share it."""
    if path not in _EXACT:
        _EXACT[path] = _exact(path)
    return _EXACT[path]


@pytest.mark.parametrize("fixture", list(MODELS))
def test_teacher_forced_top1_agrees_with_the_gguf(converted, fixture) -> None:
    gguf_path, folder = converted[fixture]
    a, b = _exact_cached(gguf_path), _exact_cached(folder)
    assert b.format == "safetensors" and b.config.rope_neox
    agree = total = 0
    for rec in json.loads((DATA / fixture / "greedy.json").read_text())["records"]:
        prompt = a.tokenizer.encode(rec["request"]["prompt"], add_special=True, parse_special=True)
        ids = prompt + list(rec["tokens"])
        top_a = logprobs_for(a.model, ids)[len(prompt) - 1: -1].argmax(-1)
        top_b = logprobs_for(b.model, ids)[len(prompt) - 1: -1].argmax(-1)
        agree += int((top_a == top_b).sum())
        total += len(top_a)
    print(f"{fixture}: GGUF vs converted safetensors, teacher-forced top-1 agreement {agree / total:.4f} "
          f"over {total} positions")
    assert agree / total >= 0.99
    fig = evaluate(b.model, b.tokenizer, DATA / fixture / "greedy.json")  # and against llama.cpp itself
    print(f"{fixture} folder vs llama.cpp:", fig.summary())
    assert fig.prompt_len_mismatches == 0 and fig.top1 >= 0.93


def test_served_folder_answers_as_its_gguf(converted) -> None:
    """`llamatron serve FOLDER` through the real server and the openai SDK: the same greedy chat
    answer as the GGUF file (both on the fp32 path), the format in /v1/models."""
    import httpx
    from openai import OpenAI

    from server_fixture import start_server

    answers, formats = [], []
    for path in converted["smollm2"]:
        srv = start_server(_exact_cached(path), alias="", cpu_weights="exact")
        try:
            client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(model=srv.settings.model_id(), temperature=0, max_tokens=16,
                                               messages=[{"role": "user", "content": "Name three colors."}])
            answers.append(r.choices[0].message.content)
            formats.append(httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"][0]["meta"]["format"])
        finally:
            srv.stop()
    assert formats == ["gguf", "safetensors"]
    assert answers[0] == answers[1] and len(answers[0]) > 10


def _hf_tokenizer(name: str, tmp: Path):
    """The HF-folder tokenizer and template of a GGUF model, from the files `convert` writes."""
    from engine.loading.convert import tokenizer_files
    from engine.loading.hf_folder import chat_template
    from engine.text.hf_tokenizer import from_hf_files
    from engine.text.tokenizer import Tokenizer
    from conftest import model_file

    meta = read_metadata(model_file(name))
    gguf_tok = Tokenizer.from_gguf_metadata(meta)
    tj, tc, gen = tokenizer_files(gguf_tok, meta, 2048)
    tc, gen = json.loads(json.dumps(tc)), json.loads(json.dumps(gen))  # as read back from disk
    tok = from_hf_files(tj, tc, gen)
    return tok, chat_template(tmp, tc, tok, None), gguf_tok, meta


@pytest.mark.parametrize("fixture", list(TOKENIZE))
def test_tokenizer_and_template_identical_through_the_folder(fixture, tmp_path) -> None:
    tok, template, gguf_tok, meta = _hf_tokenizer(TOKENIZE[fixture], tmp_path)
    data = json.loads((DATA / fixture / "tokenize.json").read_text(encoding="utf-8"))
    for rec in data["records"]:
        ids = tok.encode(rec["text"], add_special=rec["add_special"], parse_special=rec["parse_special"] is not False)
        assert ids == [t["id"] for t in rec["response"]["tokens"]], rec["text"]
        assert [tok.token_piece(i) for i in ids] == [t["piece"] for t in rec["response"]["tokens"]]
    for rec in data["plain_ids_form"]:
        assert tok.encode(rec["text"], add_special=False) == rec["response"]["tokens"]
    for rec in data["detokenize_roundtrips"]:
        assert tok.decode(rec["tokens"]) == rec["detokenize_response"]["content"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.eog_ids, tok.vocab_size) == (
        gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.add_bos, gguf_tok.eog_ids, gguf_tok.vocab_size)
    assert [tok.is_special(i) for i in range(tok.vocab_size)] == [gguf_tok.is_special(i) for i in range(tok.vocab_size)]
    assert template.source == (meta.get("tokenizer.chat_template") or template.source) and (
        template.is_fallback == (not meta.get("tokenizer.chat_template")))
    for conv in json.loads((DATA / fixture / "templates.json").read_text())["conversations"]:
        req = conv["request"]
        assert template.render(req["messages"], tools=req.get("tools")) == conv["prompt"], conv["name"]


@pytest.mark.parametrize("fixture", list(MODELS))
def test_transformers_loads_the_converted_folder(converted, fixture) -> None:
    """The strongest check that `convert` writes a real checkpoint: transformers' own model class
    gives our logits (its fp32 forward of the bf16 weights vs our exact path)."""
    transformers = pytest.importorskip("transformers")
    _, folder = converted[fixture]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ours = _exact(folder)
    ids = ours.tokenizer.encode("The capital of France is Paris. The capital of Italy is", add_special=True)
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    got = logprobs_for(ours.model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (got.exp() - want.exp()).abs().max() < 0.01


_RSS_SCRIPT = """
import sys
from engine.config import EngineConfig
from engine.loading.loader import load_model

def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

before = kb("VmRSS:")
import resource, time
t = time.monotonic()
load_model(EngineConfig(model=sys.argv[1], device="cpu", max_model_len=2048))
print(before, kb("VmHWM:"), kb("VmRSS:"), time.monotonic() - t)
"""


def test_peak_rss_while_loading_stays_within_1_3x_the_file(converted) -> None:
    """Loading maps the checkpoint and drops its pages as it goes (CPU default: Q8_0 planes), so
    the resident set grows by less than 1.3x the safetensors size. torch, the C kernels and the
    tokenizer are loaded before the measurement starts (their pages are not the checkpoint's)."""
    _, folder = converted["smollm2"]
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    warm = "from kernels import backend; backend('cpu'); import engine.loading.loader\n"
    r = subprocess.run([sys.executable, "-c", warm + _RSS_SCRIPT, str(folder)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    before, peak, after, secs = (float(v) for v in r.stdout.split())
    grown = (peak - before) * 1024
    print(f"smollm2 bf16 folder ({size / 1e6:.0f} MB): RSS {before / 1024:.0f} MB before, peak {peak / 1024:.0f} MB "
          f"(+{grown / size:.2f}x the file), {after / 1024:.0f} MB after; load {secs:.1f} s")
    assert grown <= 1.3 * size
