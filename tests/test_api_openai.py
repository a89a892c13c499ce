"""The official openai SDK (sync and async) against a real uvicorn server with the real smollm2."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import openai
import pytest

from server_fixture import api_server  # noqa: F401  (module-scoped server)

DATA = Path(__file__).parent / "data" / "smollm2"
COLORS = [{"role": "user", "content": "Name three primary colors."}]


@pytest.fixture(scope="module")
def client(api_server):  # noqa: F811
    return openai.OpenAI(base_url=api_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_basic_usage_matches_llama_server_prompt(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=COLORS, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "smollm2" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # llama-server counted 35 prompt tokens for this conversation (chat.json, record "basic")
    assert r.usage.prompt_tokens == 35
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_include_usage_equals_non_stream(client) -> None:
    kw = dict(model="smollm2", messages=COLORS, max_tokens=6, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens == 35
    assert len({c.id for c in chunks}) == 1


def test_seeded_sampling_is_reproducible_and_stream_matches(client) -> None:
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6,
              temperature=1.0, seed=42)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kw, stream=True) if c.choices)
    assert a == b == streamed


def test_n2_choices_use_seed_plus_index(client) -> None:
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=5,
              temperature=1.0)
    r = client.chat.completions.create(**kw, n=2, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    single = [client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (7, 8)]
    assert [c.message.content for c in r.choices] == single
    assert r.usage.prompt_tokens == 35 and r.usage.completion_tokens <= 10
    streamed = {0: "", 1: ""}
    for c in client.chat.completions.create(**kw, n=2, seed=7, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert [streamed[0], streamed[1]] == single


def test_chat_logprobs(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=COLORS, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode() == t.token
    # llama-server's first three candidates for this prompt (chat.json, record "logprobs_top3")
    assert [x.token for x in content[0].top_logprobs[:2]] == ["The", "There"]


def test_stop_sequence(client) -> None:
    r = client.chat.completions.create(model="smollm2", messages=COLORS, max_tokens=12, temperature=0,
                                       stop=[" colors"])
    assert r.choices[0].finish_reason == "stop"
    assert " colors" not in r.choices[0].message.content


def test_completions_forms(client) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == 5  # as llama-server counted
    assert r.choices[0].text and r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    ids = client.post("/../tokenize", body={"content": "The capital of France is"}, cast_to=object)["tokens"]
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    multi = client.completions.create(model="smollm2", prompt=["Hello", "Goodbye"], max_tokens=2, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1]
    n_prompt = sum(len(client.post("/../tokenize", body={"content": p}, cast_to=object)["tokens"])
                   for p in ("Hello", "Goodbye"))
    assert multi.usage.prompt_tokens == n_prompt and multi.usage.completion_tokens == 4
    lists = client.completions.create(model="smollm2", prompt=[[19556], [19556]], max_tokens=2, temperature=0)
    assert lists.choices[0].text == lists.choices[1].text == multi.choices[0].text  # "Hello" is token 19556


def test_completions_echo_logprobs_give_prompt_logprobs(client) -> None:
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2,
                                  temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("The capital of France is")
    assert len(lp.tokens) == 5 + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.tokens[:5] == ["The", " capital", " of", " France", " is"]
    assert lp.text_offset[:5] == [0, 3, 11, 14, 21]
    # scoring only (max_tokens 0 + echo), as evaluation harnesses ask for it
    s = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=0,
                                  temperature=0, echo=True, logprobs=1)
    assert s.choices[0].text == "The capital of France is" and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:5], abs=1e-4)


def test_completions_stream_with_usage(client) -> None:
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_context_length_exceeded(client) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello " * 2100}],
                                       max_tokens=8)
    err = ei.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert err["n_ctx"] == 2048 and err["n_prompt_tokens"] > 2048
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=5000)


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=COLORS, max_tokens=2)
    assert ei.value.body["code"] == "model_not_found"


def test_async_client(api_server) -> None:  # noqa: F811
    async def go() -> tuple[str, str, int]:
        c = openai.AsyncOpenAI(base_url=api_server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        kw = dict(model="smollm2", messages=COLORS, max_tokens=4, temperature=0)
        full, stream = await asyncio.gather(
            c.chat.completions.create(**kw),
            c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text, usage = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            elif chunk.usage:
                usage = chunk.usage.completion_tokens
        await c.close()
        return full.choices[0].message.content, text, usage

    full, text, usage = asyncio.run(go())
    assert full == text and usage >= 1


def test_keep_alive_survives_a_stream(api_server) -> None:  # noqa: F811
    host, port = api_server.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"messages": COLORS, "max_tokens": 2, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode()
    assert resp.status == 200 and data.rstrip().endswith("data: [DONE]") and not resp.will_close
    sock = conn.sock
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    assert conn.sock is sock  # same TCP connection
    conn.close()
