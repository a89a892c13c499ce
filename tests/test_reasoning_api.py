"""Reasoning output against a real server (smollm2 under a chat template that opens `<think>`):
reasoning_content split from content, stream == non-stream, the thinking budget, and a json_schema
enforced only after the thinking (the same code paths a real thinking model takes)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from server_fixture import start_server

TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if reasoning_effort is defined %}{{ 'effort=' + reasoning_effort + '\\n' }}{%- endif %}"
    "{%- if enable_thinking %}{{ '<think>\\n' }}{%- else %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}, "unit": {"type": "string", "maxLength": 8}},
          "required": ["answer", "unit"], "additionalProperties": False}
MSG = [{"role": "user", "content": "How many legs does a spider have? Think step by step."}]


def thinking_server(**settings):  # noqa: ANN003, ANN201
    """A test server whose engine renders with TEMPLATE (the model itself stays shared, unchanged)."""
    from engine.text.chat import ChatTemplate

    s = start_server(**settings)
    base = s.engine.chat_template
    s.engine.chat_template = ChatTemplate(TEMPLATE, base.bos_token, base.eos_token)
    return s


@pytest.fixture(scope="module")
def srv():  # noqa: ANN201
    s = thinking_server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):  # noqa: ANN001, ANN201
    from openai import OpenAI

    return OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)


def _stream(client, **kw):  # noqa: ANN001, ANN003, ANN202
    thought, content, usage, finish = [], [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            d = c.delta.model_dump()
            thought.append(d.get("reasoning_content") or "")
            content.append(d.get("content") or "")
            finish = c.finish_reason or finish
    return "".join(thought), "".join(content), usage, finish


def test_split_and_stream_agree(client) -> None:  # noqa: ANN001
    kw = dict(model="smollm2", messages=MSG, temperature=0, max_tokens=40, extra_body={"reasoning_budget": 12})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message.model_dump()
    thought, content = msg.get("reasoning_content"), msg["content"]
    assert thought and "<think>" not in thought and "</think>" not in thought
    assert "<think>" not in content and "</think>" not in content and "</" not in content
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    s_thought, s_content, s_usage, s_finish = _stream(client, **kw)
    assert (s_thought, s_content, s_finish) == (thought, content, r.choices[0].finish_reason)
    assert s_usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens


def test_budget_cuts_thinking_at_n_tokens(client, srv) -> None:  # noqa: ANN001
    tok = srv.engine.tokenizer
    n_end = len(tok.encode("</think>", add_special=False, parse_special=True))
    for n in (1, 5, 16):
        r = client.chat.completions.create(model="smollm2", messages=MSG, temperature=0, max_tokens=60,
                                           extra_body={"reasoning_budget": n})
        msg = r.choices[0].message.model_dump()
        # n thinking tokens, then the forced end tag
        assert r.usage.completion_tokens_details.reasoning_tokens == n + n_end, n
        thought = msg.get("reasoning_content") or ""  # the first token is the block's own newline, stripped
        assert len(tok.encode(thought, add_special=False)) <= n and "</" not in thought
        assert msg["content"] is not None and not msg["content"].startswith("</think>")


def test_server_budget_and_unlimited() -> None:
    from openai import OpenAI

    s = thinking_server(reasoning_budget=4)
    try:
        c = OpenAI(base_url=s.base_url + "/v1", api_key="x", max_retries=0)
        n_end = len(s.engine.tokenizer.encode("</think>", add_special=False, parse_special=True))
        r = c.chat.completions.create(model="smollm2", messages=MSG, temperature=0, max_tokens=30)
        assert r.usage.completion_tokens_details.reasoning_tokens == 4 + n_end
        # -1 per request: unlimited (smollm2 never closes the block itself: all of it is thinking)
        r = c.chat.completions.create(model="smollm2", messages=MSG, temperature=0, max_tokens=30,
                                      extra_body={"reasoning_budget": -1})
        assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens
        assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    finally:
        s.stop()


def test_json_schema_applies_after_thinking(client) -> None:  # noqa: ANN001
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    thoughts = set()
    for seed in range(6):
        kw = dict(model="smollm2", messages=MSG, temperature=1.0, seed=seed, max_tokens=80, response_format=rf,
                  extra_body={"reasoning_budget": 16})
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message.model_dump()
        assert r.choices[0].finish_reason == "stop", msg
        jsonschema.validate(json.loads(msg["content"]), SCHEMA)
        thoughts.add(msg["reasoning_content"])
        if seed < 2:
            s_thought, s_content, _, _ = _stream(client, **kw)
            assert (s_thought, s_content) == (msg["reasoning_content"], msg["content"])
    # the thinking is free text, not JSON, and differs from sample to sample
    assert len(thoughts) > 1
    assert any(not t.lstrip().startswith("{") for t in thoughts)


def test_format_none_and_enable_thinking_off(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model="smollm2", messages=MSG, temperature=0, max_tokens=20,
                                       extra_body={"reasoning_format": "none", "reasoning_budget": 3})
    msg = r.choices[0].message.model_dump()
    assert not msg.get("reasoning_content") and msg["content"]
    assert r.usage.completion_tokens_details is None or not r.usage.completion_tokens_details.reasoning_tokens
    # the template closes the block itself: everything is content
    r = client.chat.completions.create(model="smollm2", messages=MSG, temperature=0, max_tokens=20,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message.model_dump()
    assert not msg.get("reasoning_content") and msg["content"]
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_reasoning_effort_reaches_template(client, srv) -> None:  # noqa: ANN001
    import httpx

    body = {"model": "smollm2", "messages": MSG, "temperature": 0, "max_tokens": 8, "reasoning_budget": 2,
            "reasoning_effort": "low"}
    a = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    b = httpx.post(srv.base_url + "/v1/chat/completions", json={**body, "reasoning_effort": None}, timeout=60).json()
    assert a["usage"]["prompt_tokens"] > b["usage"]["prompt_tokens"]  # "effort=low\n" rendered
