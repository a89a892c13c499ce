"""POST /v1/responses and /v1/responses/input_tokens with the official openai SDK against a real
server (smollm2 on CPU; qwen2.5 for the system-message merge, marked big): text, stream == create
for greedy requests with the SDK's own stream helper, text.format json_schema and tool_choice
enforced by grammar, a tool round trip, token counts, malformed bodies as 4xx in OpenAI's shape."""

from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest
from server_fixture import api_server  # noqa: F401  (module-scoped server)

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
VOLATILE = ("id", "created_at")


@pytest.fixture(scope="module")
def client(api_server):  # noqa: F811
    return openai.OpenAI(base_url=api_server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)


def _same(a: dict) -> dict:
    """A response dict without its fresh ids and time (and the SDK helper's `parsed` extras)."""
    out = {k: v for k, v in a.items() if k not in VOLATILE}
    out["output"] = [{k: v for k, v in it.items() if k not in ("id", "parsed_arguments")} for it in a["output"]]
    out["usage"] = {**a["usage"], "input_tokens_details": None}  # cached_tokens: the 2nd run hits the cache
    for it in out["output"]:
        it["content"] = [{k: v for k, v in p.items() if k != "parsed"} for p in it.get("content", [])]
    return out


def test_text_create_and_echoed_settings(client) -> None:
    r = client.responses.create(model="smollm2", input="Say hi.", instructions="Be brief.", max_output_tokens=40,
                                temperature=0, metadata={"k": "v"}, store=True, include=["reasoning.encrypted_content"],
                                truncation="disabled", prompt_cache_key="p", user="u", service_tier="auto",
                                reasoning={"effort": "low"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "smollm2"
    assert r.status == "completed" and r.error is None and r.incomplete_details is None
    (msg,) = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.role == "assistant"
    assert msg.status == "completed" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text and r.output_text.strip()
    assert r.instructions == "Be brief." and r.metadata == {"k": "v"} and r.temperature == 0 and r.store is True
    assert r.tool_choice == "auto" and r.tools == [] and r.parallel_tool_calls is True
    assert r.text.format.type == "text" and r.reasoning.effort == "low"
    u = r.usage
    assert u.input_tokens > 0 and 1 <= u.output_tokens <= 40 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0


def test_stream_equals_create_and_event_order(client) -> None:
    kw = dict(model="smollm2", input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}],
              max_output_tokens=40, temperature=0)
    full = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n >= 1 and kinds == (["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"] + ["response.output_text.delta"] * n
                                + ["response.output_text.done", "response.content_part.done",
                                   "response.output_item.done", "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert _same(final.model_dump(mode="json")) == _same(full.model_dump(mode="json"))
    item_id = final.output[0].id
    assert all(getattr(e, "item_id", item_id) == item_id for e in events)
    assert events[0].response.id == events[-1].response.id == final.id


def test_incomplete_stream_and_create(client, api_server) -> None:  # noqa: F811
    kw = dict(model="smollm2", input="Count from one to fifty in words.", max_output_tokens=4, temperature=0)
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 4
    with httpx.stream("POST", api_server.base_url + "/v1/responses", json={**kw, "stream": True}, timeout=120) as s:
        raw = s.read().decode()
    assert "[DONE]" not in raw
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    names = [re.match(r"event: (\S+)\ndata: ", b).group(1) for b in blocks]
    datas = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    assert names == [d["type"] for d in datas] and names[-1] == "response.incomplete"
    last = datas[-1]["response"]
    assert last["output_text"] == r.output_text and last["incomplete_details"] == {"reason": "max_output_tokens"}


def test_keepalive_comments(api_server, monkeypatch) -> None:  # noqa: F811
    import api.responses_stream as rs

    monkeypatch.setattr(rs, "KEEPALIVE_S", 0.001)  # the server runs in this process
    body = {"model": "smollm2", "input": "Say hi.", "max_output_tokens": 8, "stream": True}
    with httpx.stream("POST", api_server.base_url + "/v1/responses", json=body, timeout=120) as s:
        raw = s.read().decode()
    assert ": keep-alive\n\n" in raw and raw.rstrip().endswith("}")


def test_json_schema_text_format(client) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = client.responses.create(model="smollm2", input="Invent a person.", text={"format": fmt},
                                max_output_tokens=60, extra_body={"seed": 1})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    r = client.responses.create(model="smollm2", input="Say hi", text={"format": {"type": "json_object"}},
                                max_output_tokens=40, temperature=0)
    assert isinstance(json.loads(r.output_text), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}])
def test_tool_choice_enforced(client, choice) -> None:
    r = client.responses.create(model="smollm2", input="What's the weather in Paris?", tools=[WEATHER, TIME],
                                tool_choice=choice, max_output_tokens=60, temperature=0, parallel_tool_calls=False)
    (call,) = r.output
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.status == "completed" and r.status == "completed" and r.output_text == ""
    if isinstance(choice, dict):
        assert call.name == "get_time"
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.name]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    assert [t.name for t in r.tools] == ["get_weather", "get_time"]


def test_tool_call_stream_and_round_trip(client) -> None:
    kw = dict(model="smollm2", input=[{"role": "user", "content": "What's the weather in Paris?"}], tools=[WEATHER],
              tool_choice="required", max_output_tokens=60, temperature=0)
    with client.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    (call,) = final.output
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"] and "response.function_call_arguments.delta" in kinds
    full = client.responses.create(**kw)
    assert (full.output[0].name, full.output[0].arguments) == (call.name, call.arguments)
    # the round trip: the SDK's own output items go back as input, with the tool's result
    history = kw["input"] + [call.model_dump(exclude_none=True)] + [
        {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}]
    count = client.responses.input_tokens.count(model="smollm2", input=history, tools=[WEATHER])
    r = client.responses.create(model="smollm2", input=history, tools=[WEATHER], max_output_tokens=30,
                                temperature=0)
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens == count.input_tokens
    assert count.input_tokens > full.usage.input_tokens  # the call and its output are in the prompt


def test_input_tokens_counts_what_create_prefills(client) -> None:
    kw = dict(model="smollm2", instructions="Be brief.", tools=[WEATHER],
              input=[{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])
    count = client.responses.input_tokens.count(**kw)
    assert count.object == "response.input_tokens"
    r = client.responses.create(**kw, max_output_tokens=5, temperature=0)
    assert count.input_tokens == r.usage.input_tokens > 0


BAD = [
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "local_shell_call"}]}, "input[0].type"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}, {"type": "local_shell"}]}, "tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "not": {}}}],
      "tool_choice": "required"}, "tools"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}},
     "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": 3}}}, "text.format.schema"),
    ({"input": "x", "previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "max_output_tokens": -1}, "max_output_tokens"),
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "model": "gpt-5"}, "model"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_bodies_are_4xx_and_server_keeps_serving(api_server, body, param) -> None:  # noqa: F811
    with api_server.client() as c:
        r = c.post("/v1/responses", json=body)
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["param"] == param, err
        if param in ("previous_response_id", "conversation"):
            assert err["code"] == "previous_response_not_found"
        if param == "tools" and "tools" in body and body["tools"][0]["type"] != "function":
            assert "web_search" in err["message"] and "local_shell" in err["message"]
        r2 = c.post("/v1/responses/input_tokens", json=body)  # counts without compiling grammars
        assert r2.status_code < 500 and ("error" in r2.json() or r2.json()["input_tokens"] > 0), r2.text
        ok = c.post("/v1/responses/input_tokens", json={"input": "hi"})
        assert ok.status_code == 200 and ok.json()["input_tokens"] > 0


def test_non_json_and_wrong_content_type(api_server) -> None:  # noqa: F811
    with api_server.client() as c:
        for content, ctype in ((b"{nope", "application/json"), (b"", "application/json"), (b"[1]", "application/json"),
                               (b'{"input": "x"}', "text/plain")):
            r = c.post("/v1/responses", content=content, headers={"content-type": ctype})
            assert 400 <= r.status_code < 500 and "message" in r.json()["error"]


def test_disconnect_aborts_and_metrics_count(api_server) -> None:  # noqa: F811
    def finished() -> float:
        text = httpx.get(api_server.base_url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("llamatron:requests_total{"))

    before = finished()
    body = {"model": "smollm2", "input": "Write a long story about a dragon.", "max_output_tokens": 1500,
            "stream": True}
    with httpx.stream("POST", api_server.base_url + "/v1/responses", json=body, timeout=120) as s:
        for line in s.iter_lines():
            if "response.output_text.delta" in line:
                break
    t0 = time.monotonic()
    st = api_server.wait_idle(timeout=20)
    assert st.num_running == 0 and st.num_waiting == 0 and time.monotonic() - t0 < 20
    deadline = time.monotonic() + 5
    while finished() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished() >= before + 1  # counted like chat (an aborted request)


@pytest.fixture(scope="module")
def qwen(qwen_path):
    from server_fixture import start_server

    from engine.config import EngineConfig
    from engine.loading.loader import load_model

    srv = start_server(loaded=load_model(EngineConfig(model=str(qwen_path), device="cpu", max_model_len=2048)),
                       alias="qwen")
    yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=600)
    srv.stop()


@pytest.mark.big
def test_qwen_instructions_and_developer_message_merge(qwen) -> None:
    """Qwen's template takes one system message, first: instructions + developer merge into it."""
    kw = dict(model="qwen", instructions="You are a calculator.",
              input=[{"role": "user", "content": "What is 2+2?"},
                     {"role": "developer", "content": "Reply with the number only."}])
    r = qwen.responses.create(**kw, max_output_tokens=8, temperature=0)
    assert r.status == "completed" and "4" in r.output_text and r.instructions == "You are a calculator."
    merged = qwen.responses.input_tokens.count(
        model="qwen", input=[{"role": "system", "content": "You are a calculator.\n\nReply with the number only."},
                             {"role": "user", "content": "What is 2+2?"}])
    assert r.usage.input_tokens == merged.input_tokens


def test_max_output_tokens_is_a_ceiling_and_reasoning_items_dropped(client) -> None:
    r = client.responses.create(model="smollm2", input="Say hi.", max_output_tokens=100_000, temperature=0)
    assert r.status in ("completed", "incomplete") and r.max_output_tokens == 100_000
    turns = [{"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
             {"role": "user", "content": "Bye"}]
    with_reasoning = turns[:1] + [{"type": "reasoning", "id": "rs_1", "summary": []}] + turns[1:]
    a = client.responses.input_tokens.count(model="smollm2", input=turns)
    b = client.responses.input_tokens.count(model="smollm2", input=with_reasoning)
    assert a.input_tokens == b.input_tokens > 0
