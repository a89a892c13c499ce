"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) with the official anthropic
SDK against a real uvicorn server serving the real smollm2 (issue 12, part 2).

The SDK no longer has sampling arguments, so greedy decoding is asked for in `extra_body`.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from server_fixture import api_server, metric, settle, start_server  # noqa: F401  (module-scoped server)

COLORS = [{"role": "user", "content": "Name three primary colors."}]
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                             "unit": {"type": "string", "enum": ["C", "F"]}},
                            "required": ["city", "unit"]}}
TIME = {"name": "get_time", "description": "Get the local time in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(api_server):  # noqa: F811
    return anthropic.Anthropic(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120)


def _same(a: anthropic.types.Message, b: anthropic.types.Message) -> None:
    """Equal but for the message id, tool_use ids and the prefix-cache hits."""
    da, db = a.model_dump(), b.model_dump()
    for d in (da, db):
        d.pop("id")
        d["usage"].pop("cache_read_input_tokens")
        for block in d["content"]:
            block.pop("id", None)
    assert da == db


def _sse(body: dict, base_url: str) -> list[tuple[str, dict]]:
    with httpx.Client(base_url=base_url, timeout=120) as c, \
            c.stream("POST", "/v1/messages", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for frame in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append((lines["event"], data))
    return events


def test_create_text(client) -> None:
    r = client.messages.create(model="smollm2", max_tokens=8, messages=COLORS, extra_body=GREEDY)
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant" and r.model == "smollm2"
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    assert r.usage.input_tokens == 35  # the chat endpoint's count for this conversation
    assert 1 <= r.usage.output_tokens <= 8 and r.usage.cache_read_input_tokens is not None
    assert client.messages.count_tokens(model="smollm2", messages=COLORS).input_tokens == 35


def test_stream_equals_create_and_event_order(client, api_server) -> None:  # noqa: F811
    kw = dict(model="smollm2", max_tokens=8, messages=COLORS, extra_body=GREEDY)
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    _same(full, final)
    assert "".join(texts) == full.content[0].text
    events = _sse({**kw["extra_body"], "model": "smollm2", "max_tokens": 8, "messages": COLORS}, api_server.base_url)
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == 35
    assert delta["delta"]["stop_reason"] == full.stop_reason
    assert delta["usage"]["output_tokens"] == full.usage.output_tokens
    assert "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta") == full.content[0].text


def test_system_string_and_blocks(client) -> None:
    as_text = client.messages.count_tokens(model="smollm2", system="You are terse.", messages=COLORS)
    as_blocks = client.messages.count_tokens(model="smollm2", messages=COLORS, system=[
        {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}])
    assert as_text.input_tokens == as_blocks.input_tokens
    r = client.messages.create(model="smollm2", max_tokens=3, system=[{"type": "text", "text": "You are terse."}],
                               messages=COLORS, metadata={"user_id": "u1"}, extra_body=GREEDY,
                               extra_headers={"anthropic-version": "2099-01-01"})
    assert r.usage.input_tokens == as_text.input_tokens


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_weather"}])
def test_forced_tool_is_grammar_enforced(client, choice) -> None:
    kw = dict(model="smollm2", max_tokens=60, tools=[TIME, WEATHER], tool_choice=choice, messages=ASK,
              extra_body=GREEDY)
    r = client.messages.create(**kw)
    assert r.stop_reason == "tool_use", r
    calls = [b for b in r.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].id.startswith("toolu_")
    schema = {"get_weather": WEATHER, "get_time": TIME}[calls[0].name]["input_schema"]
    if choice["type"] == "tool":
        assert calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, schema)
    with client.messages.stream(**kw) as s:
        final = s.get_final_message()
    _same(r, final)


def test_tool_round_trip(client) -> None:
    first = client.messages.create(model="smollm2", max_tokens=60, tools=[WEATHER], messages=ASK,
                                   tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    call = first.content[-1]
    assert call.type == "tool_use" and first.stop_reason == "tool_use"
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]}]
    results = [
        {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 degrees"},
        {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "Sunny, 24 degrees"}]},
        {"type": "tool_result", "tool_use_id": call.id, "content": "city not found", "is_error": True},
    ]
    before = client.messages.count_tokens(model="smollm2", tools=[WEATHER], messages=ASK).input_tokens
    for result in results:
        messages = [*history, {"role": "user", "content": [result, {"type": "text", "text": "Answer briefly."}]}]
        n = client.messages.count_tokens(model="smollm2", tools=[WEATHER], messages=messages).input_tokens
        assert n > before + 10  # the call and its result are in the prompt
        r = client.messages.create(model="smollm2", max_tokens=16, tools=[WEATHER], tool_choice={"type": "none"},
                                   messages=messages, extra_body=GREEDY)
        assert r.usage.input_tokens == n
        assert [b.type for b in r.content] == ["text"] and r.content[0].text.strip()
        assert r.stop_reason in ("end_turn", "max_tokens")


def test_stop_sequences(client) -> None:
    kw = dict(model="smollm2", max_tokens=12, messages=COLORS, extra_body=GREEDY)
    text = client.messages.create(**kw).content[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    r = client.messages.create(**kw, stop_sequences=["zzzz-never", stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == text[:text.index(stop)]


def test_structured_output_format(client) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue", "yellow"]}},
              "required": ["color"], "additionalProperties": False}
    r = client.messages.create(model="smollm2", max_tokens=20, messages=COLORS, extra_body=GREEDY,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(r.content[0].text), schema)


def test_max_tokens_is_a_ceiling(client) -> None:
    """Claude Code asks for 32000 tokens whatever the context: lowered to what the context leaves."""
    r = client.messages.create(model="smollm2", max_tokens=32000, tools=[WEATHER], messages=ASK,
                               tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert r.stop_reason == "tool_use"


def _malformed() -> list[tuple[str, object, int]]:
    ok = {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    user = lambda *blocks: {**ok, "messages": [{"role": "user", "content": list(blocks)}]}  # noqa: E731
    tool = {"name": "f", "input_schema": {"type": "object"}}
    return [
        ("missing max_tokens", {k: v for k, v in ok.items() if k != "max_tokens"}, 400),
        ("negative max_tokens", {**ok, "max_tokens": -1}, 400),
        ("zero max_tokens", {**ok, "max_tokens": 0}, 400),
        ("string max_tokens", {**ok, "max_tokens": "4"}, 400),
        ("no messages", {**ok, "messages": []}, 400),
        ("body is an array", [ok], 400),
        ("unknown block type", user({"type": "video", "text": "x"}), 400),
        ("text block without text", user({"type": "text"}), 400),
        ("image block", user({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                          "data": "iVBORw0KGgo="}}), 400),
        ("image in a tool_result", {**ok, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "image", "source": {}}]}]}]}, 400),
        ("tool_use in a user message", user({"type": "tool_use", "id": "t", "name": "f", "input": {}}), 400),
        ("tool_use input not an object", {**ok, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}]},
            {"role": "user", "content": "go"}]}, 400),
        ("unknown role", {**ok, "messages": [{"role": "system", "content": "hi"}]}, 400),
        ("final assistant message", {**ok, "messages": [*ok["messages"], {"role": "assistant", "content": "Hi"}]},
         400),
        ("unknown tool_choice", {**ok, "tools": [tool], "tool_choice": {"type": "required"}}, 400),
        ("tool_choice names no tool", {**ok, "tools": [tool], "tool_choice": {"type": "tool", "name": "g"}}, 400),
        ("tool_choice tool without name", {**ok, "tools": [tool], "tool_choice": {"type": "tool"}}, 400),
        ("tool_choice any without tools", {**ok, "tool_choice": {"type": "any"}}, 400),
        ("input_schema missing", {**ok, "tools": [{"name": "f"}]}, 400),
        ("input_schema not an object schema", {**ok, "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
         400),
        ("invalid input_schema", {**ok, "tools": [{"name": "f", "input_schema": {
            "type": "object", "properties": {"a": {"type": "bogus"}}}}]}, 400),
        ("bad tool name", {**ok, "tools": [{"name": "a b", "input_schema": {"type": "object"}}]}, 400),
        ("server tool", {**ok, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400),
        ("temperature above 1", {**ok, "temperature": 1.5}, 400),
        ("stop_sequences a string", {**ok, "stop_sequences": "x"}, 400),
        ("system a number", {**ok, "system": 5}, 400),
        ("unknown model", {**ok, "model": "claude-opus-4-1"}, 404),
        ("prompt longer than the context", {**ok, "messages": [{"role": "user", "content": "hello " * 3000}]}, 400),
        ("not JSON", b"{not json", 400),
        ("empty body", b"", 400),
    ]


def test_malformed_bodies_are_4xx_in_anthropic_shape(api_server, client) -> None:  # noqa: F811
    with httpx.Client(base_url=api_server.base_url, timeout=60) as c:
        for name, body, status in _malformed():
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                if path.endswith("count_tokens") and any(k in name for k in ("max_tokens", "temperature", "stop_")):
                    continue  # count_tokens takes no sampling settings (ignored, as Anthropic does)
                r = c.post(path, content=content, headers={"content-type": "application/json"})
                if path.endswith("count_tokens") and name == "prompt longer than the context":
                    assert r.status_code == 200  # counting a long prompt is fine
                    continue
                assert r.status_code == status, (name, path, r.text)
                err = r.json()
                assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, (name, err)
                assert err["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
            assert c.post("/v1/messages/count_tokens", json={"messages": COLORS}).json() == {"input_tokens": 35}
        for method, path, status, kind in [("GET", "/v1/messages", 405, "invalid_request_error"),
                                           ("POST", "/v1/messages/batches", 404, "not_found_error")]:
            r = c.request(method, path, json={})
            assert r.status_code == status and r.json()["error"]["type"] == kind
        r = c.post("/v1/messages", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="smollm2", max_tokens=-1, messages=COLORS)
    assert e.value.body["error"]["type"] == "invalid_request_error"
    r = client.messages.create(model="smollm2", max_tokens=2, messages=COLORS)  # still serving
    assert r.content and r.usage.output_tokens >= 1


def test_metrics_count_messages(api_server, client) -> None:  # noqa: F811
    srv = api_server
    settle(srv)
    with srv.client() as c:
        before = c.get("/metrics").text
    r = client.messages.create(model="smollm2", max_tokens=3, messages=COLORS, extra_body=GREEDY)
    with client.messages.stream(model="smollm2", max_tokens=3, messages=COLORS, extra_body=GREEDY) as s:
        s.get_final_message()
    with srv.client() as c:
        after = c.get("/metrics").text
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    assert delta("llamatron:prompt_tokens_total") == 2 * r.usage.input_tokens
    assert delta("llamatron:generation_tokens_total") == 2 * r.usage.output_tokens
    assert delta("llamatron:e2e_request_latency_seconds_count") == 2


def test_keepalive_pings_and_disconnect_aborts(api_server, monkeypatch) -> None:  # noqa: F811
    from api import messages_stream

    srv = api_server
    monkeypatch.setattr(messages_stream.MessagesSSE, "keepalive_s", 0.001)
    events = _sse({"model": "smollm2", "max_tokens": 4, "messages": COLORS, **GREEDY}, srv.base_url)
    kinds = [k for k, _ in events]
    assert kinds.count("ping") > 1 and kinds[0] == "message_start" and kinds[-1] == "message_stop"
    monkeypatch.setattr(messages_stream.MessagesSSE, "keepalive_s", messages_stream.KEEPALIVE_S)
    aborted = 'llamatron:requests_total{finish_reason="abort"}'
    settle(srv)
    with srv.client() as c:
        before = metric(c.get("/metrics").text, aborted)
    body = {"model": "smollm2", "max_tokens": 400, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
    with httpx.Client(base_url=srv.base_url, timeout=120) as c, c.stream("POST", "/v1/messages", json=body) as r:
        for line in r.iter_lines():
            if "text_delta" in line:
                break  # hang up mid-generation
    settle(srv)
    st = srv.engine.stats()
    assert st.num_running == 0 and st.free_blocks == st.total_blocks and not srv.ctx.active, st
    with srv.client() as c:
        assert metric(c.get("/metrics").text, aborted) == before + 1


def test_x_api_key_and_anthropic_errors_outside_handlers() -> None:
    srv = start_server(api_key=["sekrit"])
    try:
        good = anthropic.Anthropic(base_url=srv.base_url, api_key="sekrit", max_retries=0, timeout=60)
        assert good.messages.count_tokens(model="smollm2", messages=COLORS).input_tokens == 35
        bearer = anthropic.Anthropic(base_url=srv.base_url, auth_token="sekrit", max_retries=0, timeout=60)
        assert bearer.messages.create(model="smollm2", max_tokens=2, messages=COLORS).content
        bad = anthropic.Anthropic(base_url=srv.base_url, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model="smollm2", max_tokens=2, messages=COLORS)
        assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
        assert "x-api-key" in e.value.body["error"]["message"]
        srv.ctx.draining = True  # what a draining or overloaded server answers: 529 overloaded_error
        with pytest.raises(anthropic.APIStatusError) as e2:
            good.messages.create(model="smollm2", max_tokens=2, messages=COLORS)
        assert e2.value.status_code == 529 and e2.value.body["error"]["type"] == "overloaded_error"
        assert e2.value.response.headers.get("retry-after") == "5"
        srv.ctx.draining = False
        with httpx.Client(base_url=srv.base_url) as c:  # the chat endpoints keep OpenAI's shape
            r = c.post("/v1/chat/completions", json={"messages": COLORS})
            assert r.status_code == 401 and "type" not in r.json() and r.json()["error"]["code"] == "invalid_api_key"
    finally:
        srv.stop()
