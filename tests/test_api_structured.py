"""Structured output and tool calls through a real server (smollm2, CPU): every accepted
constraint is enforced; a constraint that cannot be is a 400 naming its parameter."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_fixture import api_server  # noqa: F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oai(api_server):  # noqa: F811
    return openai.OpenAI(base_url=api_server.base_url + "/v1", api_key="x", timeout=300)


def test_json_schema_enforced_stream_and_not(oai):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    msgs = [{"role": "user", "content": "Invent a person and describe them."}]
    r = oai.chat.completions.create(model="smollm2", messages=msgs, response_format=rf, max_tokens=80, seed=1)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="smollm2", messages=msgs, response_format=rf, max_tokens=80, seed=2, stream=True) if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object(oai):
    r = oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hi"}],
                                    response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_generic_format(oai, choice):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = oai.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER, TIME], tool_choice=choice,
                                    max_tokens=80, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_stream_assembles_same_calls_and_tool_loop(oai):
    msgs = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
    kw = dict(model="smollm2", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=120, seed=5)
    full = oai.chat.completions.create(**kw).choices[0].message
    with oai.beta.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0].message
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in full.tool_calls]
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in full.tool_calls]}]
    history += [{"role": "tool", "tool_call_id": c.id, "content": "21 C, sunny"} for c in full.tool_calls]
    final = oai.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=40, seed=1)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_parallel_false_at_most_one(oai):
    msgs = [{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}]
    for seed in range(3):
        r = oai.chat.completions.create(model="smollm2", messages=msgs, tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=120, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"grammar": "root ::= undefined"}, "grammar"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_constraints_are_400(api_server, body, param):  # noqa: F811
    with api_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_gbnf_on_native_completion(api_server):  # noqa: F811
    with api_server.client() as c:
        r = c.post("/completion", json={"prompt": "Is the sky blue? Answer:", "grammar": 'root ::= " yes" | " no"',
                                        "n_predict": 8})
    assert r.status_code == 200 and r.json()["content"] in (" yes", " no")
