"""Fill in the middle on qwen2.5-coder (big): its GGUF has no fim_* keys, so the tokens are found by
text (<|fim_prefix|> 151659, <|fim_middle|> 151660, <|fim_suffix|> 151661, <|fim_pad|> 151662,
<|repo_name|> 151663, <|file_sep|> 151664); the layout equals llama-server's token for token
(ids written out below), and a real server completes a function body between prefix and suffix."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.text.fim import ExtraChunk, FimTokens, fim_layout, find_fim_tokens

pytestmark = pytest.mark.big

PRE, MID, SUF, PAD, REP, SEP = 151659, 151660, 151661, 151662, 151663, 151664
PREFIX = "def add(a, b):\n    "
PREFIX_IDS = [750, 912, 2877, 11, 293, 982, 257]  # def| add|(a|,| b|):\n|    
SUFFIX = "\n\nprint(add(1,2))\n"
SUFFIX_IDS = [271, 1350, 25906, 7, 16, 11, 17, 1171]
MYPROJECT = [2408, 4987, 198]  # "myproject\n"
FILENAME = [8404, 198]  # "filename\n"
LLAMA_SERVER = dict(n_batch=2048, n_predict=-1, n_ctx=8192)  # llama-server -c 8192, defaults otherwise


@pytest.fixture(scope="module")
def qwen_tok(qwen_path: Any) -> Any:
    from engine.loading.gguf import read_metadata
    from engine.text.tokenizer import Tokenizer

    meta = read_metadata(qwen_path)
    assert not [k for k in meta if "fim" in k or k.endswith(("prefix_token_id", "middle_token_id"))]
    return Tokenizer.from_gguf_metadata(meta), meta


def test_qwen_fim_tokens_found_by_text(qwen_tok: Any) -> None:
    tok, meta = qwen_tok
    fim = find_fim_tokens(tok, meta)
    assert fim == FimTokens(pre=PRE, suf=SUF, mid=MID, pad=PAD, rep=REP, sep=SEP)
    assert {PAD, REP, SEP, 151643} <= tok.eog_ids  # <|endoftext|> and the FIM end tokens stop generation


def test_qwen_layout_equals_llama_server(qwen_tok: Any) -> None:
    tok, meta = qwen_tok
    fim = find_fim_tokens(tok, meta)
    assert tok.encode(PREFIX, add_special=False, parse_special=False) == PREFIX_IDS
    # the bare FIM triple: [PRE] prefix [SUF] suffix [MID] (no BOS: qwen2 adds none)
    bare = FimTokens(pre=PRE, suf=SUF, mid=MID)
    assert fim_layout(tok, bare, PREFIX, SUFFIX, **LLAMA_SERVER).token_ids == [PRE, *PREFIX_IDS, SUF, *SUFFIX_IDS, MID]
    # what llama-server sends for /infill {input_prefix, input_suffix}: the repo-level header first
    plain = fim_layout(tok, fim, PREFIX, SUFFIX, **LLAMA_SERVER)
    assert plain.token_ids == [REP, *MYPROJECT, SEP, *FILENAME, PRE, *PREFIX_IDS, SUF, *SUFFIX_IDS, MID]
    # with input_extra: one [SEP]filename\ntext per chunk, then the current file's [SEP]
    extra = [ExtraChunk("x = 1\n", "a.py"), ExtraChunk("y\n")]
    repo = fim_layout(tok, fim, PREFIX, SUFFIX, extra, prompt_ids=[87], **LLAMA_SERVER)
    assert repo.token_ids == [REP, *MYPROJECT, SEP, 64, 7197, 198, 87, 284, 220, 16, 198,  # a.py\n x = 1\n
                              SEP, 5173, 198, 88, 198,  # tmp\n y\n
                              SEP, *FILENAME, PRE, *PREFIX_IDS, 87, SUF, *SUFFIX_IDS, MID]
    assert tok.decode(repo.token_ids) == ("<|repo_name|>myproject\n<|file_sep|>a.py\nx = 1\n<|file_sep|>tmp\ny\n"
                                          f"<|file_sep|>filename\n<|fim_prefix|>{PREFIX}x<|fim_suffix|>{SUFFIX}"
                                          "<|fim_middle|>")


# ---- a real server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_server() -> Any:
    from server_fixture import loaded_model, start_server

    srv = start_server(loaded_model("qwen2.5-coder-0.5b-instruct"), alias="qwen")
    yield srv
    srv.stop()


FN_PREFIX = "def square(x):\n    "
FN_SUFFIX = "\n\n\nassert square(3) == 9\n"


def _infill(c: Any, **kw: Any) -> dict:
    body = {"input_prefix": FN_PREFIX, "input_suffix": FN_SUFFIX, "n_predict": 32, "temperature": 0, **kw}
    r = c.post("/infill", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_infill_completes_a_function_body(qwen_server: Any) -> None:
    with qwen_server.client() as c:
        out = _infill(c)
    body = out["content"].split("\n\n")[0]  # the function body (a 0.5B model may add a test after it)
    assert body.startswith("return") and "x" in body, out["content"]
    namespace: dict = {}
    exec(FN_PREFIX + body + FN_SUFFIX, namespace)  # the filled-in file runs and its assert holds
    assert namespace["square"](12) == 144
    assert out["stop"] is True and out["stop_type"] == "eos"  # ended by an end-of-generation token
    assert out["prompt"].startswith("<|repo_name|>myproject\n<|file_sep|>filename\n<|fim_prefix|>def square")
    assert out["prompt"].endswith(FN_SUFFIX + "<|fim_middle|>") and out["truncated"] is False
    # the server's prompt is the layout under its budget (ctx 2048 -> n_predict 256, n_batch 1024)
    tok = qwen_server.engine.tokenizer
    fim = find_fim_tokens(tok)
    expected = fim_layout(tok, fim, FN_PREFIX, FN_SUFFIX, n_batch=1024, n_predict=256, n_ctx=2048).token_ids
    assert out["tokens_evaluated"] == len(expected) and out["prompt"] == tok.decode(expected)


def test_infill_stream_equals_non_stream(qwen_server: Any) -> None:
    with qwen_server.client() as c:
        full = _infill(c, return_tokens=True)
        body = {"input_prefix": FN_PREFIX, "input_suffix": FN_SUFFIX, "n_predict": 32, "temperature": 0,
                "stream": True}
        with c.stream("POST", "/infill", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and "data: [DONE]" not in lines
    events = [json.loads(ln[6:]) for ln in lines]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert len(events) > 2
    assert "".join(e["content"] for e in events) == full["content"]
    assert [t for e in events for t in e["tokens"]] == full["tokens"]
    assert events[-1]["stop_type"] == full["stop_type"] and events[-1]["prompt"] == full["prompt"]


def test_infill_repo_level_with_extra_and_prompt(qwen_server: Any) -> None:
    extra = [{"filename": "mathutil.py", "text": "def cube(x):\n    return x * x * x\n"}]
    with qwen_server.client() as c:
        out = _infill(c, input_extra=extra, prompt="return")
    assert out["prompt"].startswith("<|repo_name|>myproject\n<|file_sep|>mathutil.py\ndef cube(x):")
    assert "<|file_sep|>filename\n<|fim_prefix|>" in out["prompt"]
    assert f"{FN_PREFIX}return<|fim_suffix|>" in out["prompt"]  # the prompt continues the prefix
    namespace: dict = {}
    exec(FN_PREFIX + "return" + out["content"].split("\n")[0] + FN_SUFFIX, namespace)  # the line it completes
    assert namespace["square"](5) == 25


def test_completions_suffix_equals_infill(qwen_server: Any) -> None:
    from openai import OpenAI

    with qwen_server.client() as c:
        infill = _infill(c)
        r = c.post("/v1/completions", json={"prompt": FN_PREFIX, "suffix": FN_SUFFIX, "max_tokens": 32,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == infill["content"] and choice["finish_reason"] == "stop"
    assert r.json()["usage"]["prompt_tokens"] == infill["tokens_evaluated"]
    client = OpenAI(base_url=qwen_server.base_url + "/v1", api_key="unused")
    sdk = client.completions.create(model="qwen", prompt=FN_PREFIX, suffix=FN_SUFFIX, max_tokens=32, temperature=0)
    assert sdk.choices[0].text == infill["content"]
    parts = client.completions.create(model="qwen", prompt=FN_PREFIX, suffix=FN_SUFFIX, max_tokens=32,
                                      temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in parts if p.choices) == infill["content"]


@pytest.mark.parametrize("end", [PAD, REP, SEP])
def test_generation_stops_at_fim_end_tokens(qwen_server: Any, end: int) -> None:
    with qwen_server.client() as c:
        out = _infill(c, logit_bias=[[end, 100]], return_tokens=True)
    assert out["stop_type"] == "eos" and out["tokens_predicted"] == 1 and out["content"] == ""


def test_whole_files_are_trimmed_to_fit(qwen_server: Any) -> None:
    """An editor sends the whole file: the prefix keeps its end, the suffix its start, and the
    prompt leaves room for n_predict tokens in the 2048-token context."""
    head = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(600))
    tail = "".join(f"\n\ndef g{i}(x):\n    return x * {i}\n" for i in range(600))
    extra = [{"filename": f"m{i}.py", "text": f"V{i} = {i}\n" * 50} for i in range(20)]
    with qwen_server.client() as c:
        out = _infill(c, input_prefix=head + FN_PREFIX, input_suffix=FN_SUFFIX + tail, input_extra=extra)
    assert out["truncated"] is True
    assert out["tokens_evaluated"] + 32 <= 2048
    assert FN_PREFIX + "<|fim_suffix|>" + FN_SUFFIX in out["prompt"]  # the text around the cursor survives
    assert "def f0(x)" not in out["prompt"] and "def g599(x)" not in out["prompt"]
    assert "return" in out["content"]


def test_n_predict_zero_only_warms_the_cache(qwen_server: Any) -> None:
    """llama.vim / llama.vscode send n_predict 0 to prefill the prefix cache with the extra context."""
    extra = [{"filename": "big.py", "text": "".join(f"K{i} = {i}\n" for i in range(100))}]
    with qwen_server.client() as c:
        warm = _infill(c, input_extra=extra, n_predict=0)
        assert warm["content"] == "" and warm["tokens_predicted"] == 0 and warm["stop_type"] == "limit"
        r = c.post("/infill", json={"input_prefix": FN_PREFIX, "input_suffix": FN_SUFFIX, "input_extra": extra,
                                    "n_predict": 0, "stream": True})
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln]
        assert len(events) == 1 and events[0]["stop"] and events[0]["tokens_predicted"] == 0
        out = _infill(c, input_extra=extra)
    assert warm["tokens_evaluated"] > 300 and out["tokens_evaluated"] == warm["tokens_evaluated"]
    assert out["timings"]["cache_n"] >= warm["tokens_evaluated"] - 16  # all full KV blocks came from the cache
