"""Fill in the middle without the big model: token discovery and llama-server's layout on a
synthetic byte-level vocabulary (every byte is one token, so the expected ids are written by
hand), and the real server on smollm2, which has no FIM tokens (400 naming them; malformed
bodies are 4xx before that). qwen2.5-coder's real layout and completions: test_fim_qwen.py."""

from __future__ import annotations

from typing import Any

import pytest

from engine.text.fim import ExtraChunk, FimTokens, FimUnsupported, extra_context, fim_layout, find_fim_tokens
from engine.text.tokenizer import Tokenizer
from engine.text.tokenizer_rules import BYTE_DECODER

_BYTE_CHAR = {b: c for c, b in BYTE_DECODER.items()}
SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>", "<PRE>", "<s>"]
EOT, PRE, MID, SUF, PAD, REP, SEP, PRE2, BOS = range(256, 256 + len(SPECIALS))


def byte_vocab(specials: list[str] = SPECIALS, **meta: Any) -> Tokenizer:
    """Ids 0..255 are the bytes (no merges); specials from 256 on, CONTROL typed."""
    tokens = [_BYTE_CHAR[b] for b in range(256)] + specials
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 256 + [3] * len(specials), "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.bos_token_id": 256, **meta})


def b(text: str) -> list[int]:
    return list(text.encode())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return byte_vocab()


# ---- token discovery -------------------------------------------------------------------------

def test_tokens_found_by_text_as_llama_cpp(tok: Tokenizer) -> None:
    fim = find_fim_tokens(tok)
    assert fim == FimTokens(pre=PRE, suf=SUF, mid=MID, pad=PAD, rep=REP, sep=SEP)
    assert fim.end_ids == {PAD, REP, SEP} and fim.end_ids <= tok.eog_ids  # generation stops there


def test_metadata_ids_win_over_text(tok: Tokenizer) -> None:
    meta = {"tokenizer.ggml.fim_pre_token_id": PRE2, "tokenizer.ggml.fim_sep_token_id": 999999}  # 2nd: out of range
    fim = find_fim_tokens(tok, meta)
    assert fim.pre == PRE2 and fim.sep == SEP
    # the deprecated prefix/suffix/middle keys are read after fim_* by llama.cpp, so they win
    assert find_fim_tokens(tok, {**meta, "tokenizer.ggml.prefix_token_id": BOS}).pre == BOS


def test_other_spellings_and_missing_tokens() -> None:
    t = byte_vocab(["<|endoftext|>", "<PRE>", "<SUF>", "<MID>", "<reponame>"])
    fim = find_fim_tokens(t)
    assert (fim.pre, fim.suf, fim.mid, fim.pad, fim.rep, fim.sep) == (257, 258, 259, None, 260, None)
    none = find_fim_tokens(byte_vocab(["<|endoftext|>", "<|fim_prefix|>"]))
    assert none.missing == ["fim_suf", "fim_mid"]
    with pytest.raises(FimUnsupported) as e:
        none.require()
    assert e.value.missing == ["fim_suf", "fim_mid"]
    msg = str(e.value)
    assert "suffix token is missing. middle token is missing." in msg and "prefix token" not in msg
    assert "<|fim_suffix|>" in msg and "<|fim_middle|>" in msg


# ---- layout (llama-server's format_prompt_infill) --------------------------------------------

BIG = dict(n_batch=2048, n_predict=-1, n_ctx=8192)  # llama-server's defaults at -c 8192


def test_plain_layout(tok: Tokenizer) -> None:
    fim = find_fim_tokens(tok)
    p = fim_layout(tok, fim, "def f(x):\n    ", "\n\nprint(f(2))\n", **BIG)
    assert p.token_ids == [REP, *b("myproject\n"), SEP, *b("filename\n"),
                           PRE, *b("def f(x):\n    "), SUF, *b("\n\nprint(f(2))\n"), MID]
    assert not p.truncated
    # without rep/sep tokens the plain case is exactly PRE prefix SUF suffix MID
    plain = FimTokens(pre=PRE, suf=SUF, mid=MID)
    assert fim_layout(tok, plain, "ab", "cd", **BIG).token_ids == [PRE, 97, 98, SUF, 99, 100, MID]


def test_prompt_goes_after_the_prefix_and_is_parsed(tok: Tokenizer) -> None:
    plain = FimTokens(pre=PRE, suf=SUF, mid=MID)
    prompt_ids = tok.encode("x<|fim_pad|>", add_special=False, parse_special=True)
    assert prompt_ids == [120, PAD]
    p = fim_layout(tok, plain, "a", "b", prompt_ids=prompt_ids, **BIG)
    assert p.token_ids == [PRE, 97, 120, PAD, SUF, 98, MID]


def test_inputs_are_plain_text_and_mixed_lists(tok: Tokenizer) -> None:
    plain = FimTokens(pre=PRE, suf=SUF, mid=MID)
    p = fim_layout(tok, plain, ["a<|fim_pad|>", 7], "b", **BIG)  # control-token text in code stays text
    assert p.token_ids == [PRE, 97, *b("<|fim_pad|>"), 7, SUF, 98, MID]


def test_repo_level_layout_with_extra(tok: Tokenizer) -> None:
    fim = find_fim_tokens(tok)
    extra = [ExtraChunk("x = 1\n", "a.py"), ExtraChunk("y\n")]  # default filename: tmp
    p = fim_layout(tok, fim, "P", "S", extra, **BIG)
    assert p.token_ids == [REP, *b("myproject\n"), SEP, *b("a.py\n"), *b("x = 1\n"), SEP, *b("tmp\n"), *b("y\n"),
                           SEP, *b("filename\n"), PRE, 80, SUF, 83, MID]


def test_extra_without_file_separator_uses_snippet_lines(tok: Tokenizer) -> None:
    fim = FimTokens(pre=PRE, suf=SUF, mid=MID)
    assert extra_context(tok, fim, [ExtraChunk("q", "n.py")]) == [*b("\n\n--- snippet ---\n\n"), 113]


def test_trimming_budget(tok: Tokenizer) -> None:
    """n_batch 16: prefix keeps its last 12 tokens, the suffix its first 4 - 2 - len(prompt), the
    extra context its last n_ctx - n_batch - 2 n_predict tokens."""
    fim = find_fim_tokens(tok)
    prefix, suffix = "0123456789abcdefghij", "ABCDEFGHIJ"
    extra = [ExtraChunk("klmnop", "f")]
    p = fim_layout(tok, fim, prefix, suffix, extra, n_batch=16, n_predict=4, n_ctx=34)
    full_extra = extra_context(tok, fim, extra)
    assert p.token_ids == [*full_extra[-10:], PRE, *b(prefix[-12:]), SUF, *b("AB"), MID]
    assert (p.n_prefix, p.n_suffix, p.n_extra) == (12, 2, 10) and p.truncated
    # the prompt eats into the suffix's quarter
    q = fim_layout(tok, fim, prefix, suffix, (), [120], n_batch=16, n_predict=4, n_ctx=24)
    assert q.token_ids == [PRE, *b(prefix[-12:]), 120, SUF, 65, MID]
    # no room for extra context at all: none of it (llama-server's max(0, ...))
    assert fim_layout(tok, fim, "a", "b", extra, n_batch=16, n_predict=100, n_ctx=34).n_extra == 0


def test_bos_after_extra_and_spm_order() -> None:
    t = byte_vocab(**{"tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.add_bos_token": True})
    fim = find_fim_tokens(t)
    p = fim_layout(t, fim, "a", "b", **BIG)
    assert p.token_ids == [REP, *b("myproject\n"), SEP, *b("filename\n"), BOS, PRE, 97, SUF, 98, MID]
    s = fim_layout(t, FimTokens(pre=PRE, suf=SUF, mid=MID), "a", "b", prompt_ids=[120], **BIG, spm=True)
    assert s.token_ids == [BOS, SUF, 98, PRE, 97, 120, MID]


def test_layout_refuses_a_vocabulary_without_fim(tok: Tokenizer) -> None:
    with pytest.raises(FimUnsupported):
        fim_layout(tok, FimTokens(pre=PRE), "a", "b", **BIG)


# ---- the server on smollm2 (no FIM tokens) ---------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> Any:
    from server_fixture import start_server

    srv = start_server()
    yield srv
    srv.stop()


def _is_fim_refusal(r: Any) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "infill_not_supported"
    msg = err["message"]
    assert "Infill is not supported by this model" in msg
    for name in ("fim_pre", "fim_suf", "fim_mid", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
        assert name in msg, msg


def test_smollm2_infill_is_a_400_naming_the_tokens(smol: Any) -> None:
    with smol.client() as c:
        _is_fim_refusal(c.post("/infill", json={"input_prefix": "def f():\n    ", "input_suffix": "\n"}))
        _is_fim_refusal(c.post("/infill", json={"input_prefix": "a", "input_suffix": "b", "stream": True}))


def test_smollm2_completions_suffix_is_a_400_naming_the_tokens(smol: Any) -> None:
    with smol.client() as c:
        _is_fim_refusal(c.post("/v1/completions", json={"prompt": "def f():\n    ", "suffix": "\n", "max_tokens": 4}))
        # an empty suffix is OpenAI's neutral value: an ordinary completion
        r = c.post("/v1/completions", json={"prompt": "Hello", "suffix": "", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        r = c.post("/v1/completions", json={"prompt": "Hello", "suffix": None, "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"input_suffix": "b"}, "input_prefix"),
    ({"input_prefix": "a"}, "input_suffix"),
    ({"input_prefix": 3, "input_suffix": "b"}, "input_prefix"),
    ({"input_prefix": "a", "input_suffix": [True]}, "input_suffix"),
    ({"input_prefix": "a", "input_suffix": "b", "prompt": ["x"]}, "prompt"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": "x"}, "input_extra"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": [{"filename": "x"}]}, "input_extra[0].text"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": [{"text": "t", "filename": 1}]},
     "input_extra[0].filename"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": ["t"]}, "input_extra[0]"),
    ({"input_prefix": [10**9], "input_suffix": "b"}, "input_prefix"),
    ({"input_prefix": "a", "input_suffix": "b", "n_predict": -2}, "n_predict"),
    ({"input_prefix": "a", "input_suffix": "b", "temperature": "hot"}, "temperature"),
    ({"input_prefix": "a", "input_suffix": "b", "stream": "yes"}, "stream"),
    ({"input_prefix": "a", "input_suffix": "b", "grammar": "root ::= ("}, "grammar"),
])
def test_malformed_infill_bodies_are_400_naming_the_param(smol: Any, body: dict, param: str) -> None:
    with smol.client() as c:
        r = c.post("/infill", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"].get("param") == param, r.json()


def test_infill_non_json_bodies_are_4xx(smol: Any) -> None:
    with smol.client() as c:
        for raw, ctype in ((b"{", "application/json"), (b"[]", "application/json"), (b"", "application/json"),
                           (b'{"input_prefix": "a", "input_suffix": "b"}', "text/plain")):
            r = c.post("/infill", content=raw, headers={"content-type": ctype})
            assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        assert c.get("/infill").status_code == 405


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a", "suffix": 5}, "suffix"),
    ({"prompt": "a", "suffix": "b", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "b", "max_tokens": 0}, "max_tokens"),
    ({"prompt": [[10**9]], "suffix": "b"}, "prompt"),
    ({"prompt": "a", "suffix": "b", "model": "nope"}, "model"),
])
def test_malformed_suffix_completions_are_4xx(smol: Any, body: dict, param: str) -> None:
    with smol.client() as c:
        r = c.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"].get("param") == param, r.json()
