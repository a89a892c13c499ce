"""Tool calling (engine/constrained/tools.py, engine/constrained/tool_parser.py): formats, plans, grammars and the parser.

Parser tests feed crafted model outputs split at every character boundary: the content and the
calls must not depend on the split, markup must never reach content, and the streamed deltas
must assemble (as the OpenAI SDK does) into exactly the non-streamed calls.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engine.constrained import tools as T
from engine.text.chat import ChatTemplate
from engine.loading.gguf import read_metadata
from engine.constrained.structured import GrammarError
from engine.constrained.tool_parser import ContentDelta, ToolCallDelta, ToolCallParser
from grammar_walk import load, walk

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/small"}, "b": {"$ref": "#/$defs/small"}},
                                  "required": ["a", "b"], "additionalProperties": False,
                                  "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 99}}}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

C1 = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
C2 = '{"name": "add", "arguments": {"a": 1, "b": {"nested": ["}", "\\"]"]}}}'
C3 = '{"name": "get_weather", "arguments": {"city": "Zürich \\u00e9\\n", "unit": "fahrenheit"}}'
CASES = [  # (format, output, expected content, expected [(name, arguments)])
    (T.HERMES, f"<tool_call>\n{C1}\n</tool_call>", None, [C1]),
    (T.HERMES, f"Let me check.\n<tool_call>\n{C1}\n</tool_call>\n<tool_call>\n{C2}\n</tool_call>\n<tool_call>\n{C3}\n</tool_call>",
     "Let me check.", [C1, C2, C3]),
    (T.HERMES, C1, None, [C1]),
    (T.HERMES, f"{C1}\n{C2}", None, [C1, C2]),
    (T.HERMES, "Hello! <tool is not a call, and {json} inside text is fine.\n",
     "Hello! <tool is not a call, and {json} inside text is fine.\n", []),
    (T.HERMES, "Partial marker at the end <tool_ca", "Partial marker at the end <tool_ca", []),
    (T.HERMES, f"```json\n{C1}\n```", None, [C1]),
    (T.HERMES, '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Oslo"}\n}\n```', None,
     ['{"name": "get_weather", "arguments": {"city": "Oslo"}}']),
    (T.HERMES, '{"name": "hello", "arguments": {"message": "Hi!"}}', '{"name": "hello", "arguments": {"message": "Hi!"}}', []),
    (T.HERMES, '```json\n{"name": "hello"}\n```', '```json\n{"name": "hello"}\n```', []),
    (T.HERMES, "```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    (T.LLAMA3, '  {"name": "nope", "parameters": {}} and more', '  {"name": "nope", "parameters": {}} and more', []),
    (T.LLAMA3, C1.replace('"arguments"', '"parameters"'), None, [C1]),
    (T.LLAMA3, "<|python_tag|>" + C1.replace('"arguments"', '"parameters"') + "; " + C2, None, [C1, C2]),
    (T.LLAMA3, "The weather is nice.", "The weather is nice.", []),
    (T.MISTRAL, f"[TOOL_CALLS][{C1}, {C2}, {C3}]", None, [C1, C2, C3]),
    (T.MISTRAL, f'Sure [TOOL_CALLS] [{C1[:-1]}, "id": "a1b2c3d4e"}}]', "Sure", [C1]),
    (T.GENERIC, f'{{"tool_calls": [{C1}, {C2}, {C3}]}}', None, [C1, C2, C3]),
    (T.GENERIC, f'{{"tool_call": {C2}}}', None, [C2]),
    (T.GENERIC, '{"response": "Hi \\"you\\" \\u00e9\\ud83d\\ude00 <tool_call> \\\\n\\n"}', 'Hi "you" é😀 <tool_call> \\n\n', []),
    (T.GENERIC, "plain text, not JSON", "plain text, not JSON", []),
]


def _expected_calls(calls: list[str]) -> list[tuple[str, str]]:
    out = []
    for c in calls:
        obj = json.loads(c)
        raw = c[c.index('"arguments": ') + len('"arguments": '): -1]
        out.append((obj["name"], raw))
    return out


NAMES = ["get_weather", "add"]


def _run(fmt: T.ToolFormat, pieces: list[str]) -> tuple[ToolCallParser, list]:
    p = ToolCallParser(fmt.syntax, NAMES)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    return p, events + p.finish()


def _assemble(events: list) -> tuple[str | None, list[dict]]:
    """What a streaming client (the OpenAI SDK's accumulate logic) builds from the deltas."""
    content, calls = "", {}
    for e in events:
        if isinstance(e, ContentDelta):
            content += e.text
            continue
        d = e.to_openai()
        slot = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in d:
            assert slot["id"] is None and d["type"] == "function" and d["id"].startswith("call_")
            slot["id"], slot["name"] = d["id"], d["function"]["name"]
        else:
            assert "name" not in d["function"] and slot["id"] is not None  # name comes once, first
        slot["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("k", range(len(CASES)))
def test_parser_every_split(k):
    fmt, text, content, calls = CASES[k]
    expect = _expected_calls(calls)
    splits = [[text]] + [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]
    for pieces in splits:
        p, events = _run(fmt, pieces)
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in p.tool_calls]
        assert p.content == content and got == expect, pieces
        s_content, s_calls = _assemble(events)
        assert s_content == content
        assert [(c["name"], c["arguments"]) for c in s_calls] == expect
        assert [c["id"] for c in s_calls] == [c["id"] for c in p.tool_calls]
        for _, args in got:
            json.loads(args)


def test_truncated_call_is_kept():
    p, events = _run(T.HERMES, ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'])
    assert p.content is None and [c["function"]["name"] for c in p.tool_calls] == ["get_weather"]
    assert p.tool_calls[0]["function"]["arguments"] == '{"city": "Par'
    assert _assemble(events)[1][0]["arguments"] == '{"city": "Par'


def test_to_openai_shapes():
    first = ToolCallDelta(0, "call_x", "f", "").to_openai()
    assert first == {"index": 0, "id": "call_x", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert ToolCallDelta(1, arguments='{"a"').to_openai() == {"index": 1, "function": {"arguments": '{"a"'}}


def test_detect_format():
    hermes = "{% if tools %}{{ tools | tojson }}<tool_call>{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    mistral = "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{% endif %}" \
              "{{ m.content }}{% endfor %}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}"
    llama3 = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}<|start_header_id|>" \
             "{{ m.role }}<|end_header_id|>{{ m.content }}{% endfor %}"
    assert T.detect_format(hermes) is T.HERMES and T.detect_format(ChatTemplate(hermes)) is T.HERMES
    assert T.detect_format(ChatTemplate(mistral)) is T.MISTRAL
    assert T.detect_format(ChatTemplate(llama3)) is T.LLAMA3
    assert T.detect_format(ChatTemplate(None)) is T.GENERIC  # ChatML fallback: no tool support
    assert T.detect_format("{{ messages[0].content }} <tool_call>") is T.GENERIC  # never reads tools


@pytest.mark.parametrize("tools,choice,param", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}], "auto", "tools"),
    ([{"type": "retrieval"}], "auto", "tools"),
    ([WEATHER, WEATHER], "auto", "tools"),
])
def test_plan_rejects(tools, choice, param):
    with pytest.raises(GrammarError) as e:
        T.plan_tools(T.HERMES, [{"role": "user", "content": "hi"}], tools, choice)
    assert e.value.param == param


def test_unsupported_schema_keyword_fails_compile(smollm2_path):
    _, so = load(str(smollm2_path))
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {"required": ["a"]}}}}
    plan = T.plan_tools(T.HERMES, [{"role": "user", "content": "hi"}], [bad], "required")
    with pytest.raises(GrammarError) as e:
        so.compile(plan.grammar)
    assert e.value.param == "tools"


@pytest.mark.parametrize("fmt", [T.HERMES, T.LLAMA3, T.MISTRAL, T.GENERIC])
def test_none_keeps_the_tools_in_view(fmt):
    """OpenAI's tool_choice "none": the prompt of "auto", but no call comes out (issue 18: the
    tools used to vanish from the prompt)."""
    msgs = [{"role": "user", "content": "hi"}]
    auto, none = T.plan_tools(fmt, msgs, TOOLS, "auto"), T.plan_tools(fmt, msgs, TOOLS, "none")
    assert (none.messages, none.template_tools) == (auto.messages, auto.template_tools)
    if fmt.native:
        assert none.grammar is None and none.new_parser() is None
    else:  # only the {"response": ...} answer; the parser unwraps it
        parser = none.new_parser()
        events = parser.feed('{"response": "Hello"}') + parser.finish()
        assert none.grammar is not None and parser.content == "Hello"
        assert not [e for e in events if isinstance(e, ToolCallDelta)]


def test_generic_prompt_and_history_render(smollm2_path):
    tmpl = ChatTemplate.from_gguf_metadata(read_metadata(smollm2_path))
    fmt = T.detect_format(tmpl)
    assert fmt is T.GENERIC
    history = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C cloudy"},
    ]
    plan = T.plan_tools(fmt, history, TOOLS, "auto")
    assert plan.template_tools is None and plan.messages[0]["role"] == "system"
    prompt = tmpl.render(plan.messages)
    assert '"name": "get_weather"' in prompt and '{"response": "<your answer>"}' in prompt
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "21C sunny" in prompt and "25C cloudy" in prompt and "<|im_start|>tool" not in prompt


FORCED_AUTO = {  # prefixes that make the auto grammar commit to a call (the rest is random)
    "hermes": ["I will call a tool.\n<tool_call>\n", '{"name": "get_weather"', '```json\n{\n  "name": "add"'],
    "llama3": ['{"name": "get_weather"', '{"name": "add"', '{"name": "add"'],
    "mistral": ["[TOOL_CALLS]"] * 3,
    "generic": ['{"tool_calls": ['] * 3,
}


@pytest.mark.parametrize("fmt", [T.HERMES, T.LLAMA3, T.MISTRAL, T.GENERIC], ids=lambda f: f.name)
@pytest.mark.parametrize("choice", ["required", "named", "auto", "auto-text"])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_then_parse(smollm2_path, fmt, choice, parallel):
    """Random walks under the tool grammar always parse into valid calls of the right tools."""
    tok, so = load(str(smollm2_path))
    tool_choice = {"type": "function", "function": {"name": "add"}} if choice == "named" else choice.split("-")[0]
    plan = T.plan_tools(fmt, [{"role": "user", "content": "hi"}], TOOLS, tool_choice, parallel)
    compiled = so.compile(plan.grammar)
    rng = random.Random(hash((fmt.name, choice, parallel)) & 0xFFFF)
    n_calls = []
    for k in range(3):
        prefix = FORCED_AUTO[fmt.name][k] if choice == "auto" else ""
        text, ended = walk(tok, compiled.new_state(), rng, prefix=prefix, patience=30)
        assert ended, text
        parser = plan.new_parser()
        parser.feed(text)
        parser.finish()
        calls = parser.tool_calls
        n_calls.append(len(calls))
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        if choice == "named":
            assert [c["function"]["name"] for c in calls] == ["add"]
        if choice in ("required", "auto"):
            assert calls, text
        if choice == "auto-text" and not calls:
            assert parser.content is None or "<tool_call>" not in parser.content
        if not parallel:
            assert len(calls) <= 1
    if choice == "auto" and fmt is T.GENERIC:  # the reply alternative stays possible
        st = compiled.new_state()
        text, _ = walk(tok, st, rng, prefix='{"response": "', patience=30)
        p = plan.new_parser()
        p.feed(text), p.finish()
        assert not p.tool_calls and json.loads(text)["response"] == (p.content or "")


def test_parallel_grammar_accepts_three_calls(smollm2_path):
    tok, so = load(str(smollm2_path))
    outputs = {
        T.HERMES: "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in (C1, C1.replace("Paris", "Rome"), C1)),
        T.GENERIC: '{"tool_calls": [' + ", ".join([C1, C1, C1]) + "]}",
        T.MISTRAL: "[TOOL_CALLS][" + ", ".join([C1, C1, C1]) + "]",
        T.LLAMA3: "\n".join([C1.replace('"arguments"', '"parameters"')] * 3),
    }
    for fmt, text in outputs.items():
        for parallel in (True, False):
            st = so.compile(T.plan_tools(fmt, [], TOOLS, "required", parallel).grammar).new_state()
            ids = tok.encode(text, add_special=False)
            consumed = st.matcher.try_consume_tokens(ids)
            assert (consumed == len(ids)) == parallel, (fmt.name, parallel, tok.decode(ids[:consumed]))
        p = ToolCallParser(fmt.syntax)
        p.feed(text), p.finish()
        assert len(p.tool_calls) == 3


@pytest.mark.parametrize("fmt,free,bad", [
    (T.HERMES, "Hello there! {not a call}", ["Hi <tool_call>\nnot json", '<tool_call>\n{"name": "nope"',
                                             '{"name": "get_weather", "arguments": {"town"',
                                             '```json\n{"name": "add", "arguments": {"a": "x"']),
    (T.LLAMA3, '{"name": "other"} is not a call', ['{"name": "get_weather", "parameters": {"town"',
                                                   '{"name": "add", "arguments"']),
    (T.MISTRAL, "Plain answer.", ["ok [TOOL_CALLS] hello", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"town"']),
    (T.GENERIC, '{"response": "fine"}', ["plain text", '{"tool_calls": [{"name": "nope"', '{"other": 1}']),
])
def test_auto_enforces_once_triggered(smollm2_path, fmt, free, bad):
    tok, so = load(str(smollm2_path))
    compiled = so.compile(T.plan_tools(fmt, [], TOOLS, "auto").grammar)
    ids = tok.encode(free, add_special=False)
    st = compiled.new_state()
    assert st.matcher.try_consume_tokens(ids) == len(ids) and st.is_accepting()
    for text in bad:
        ids = tok.encode(text, add_special=False)
        assert compiled.new_state().matcher.try_consume_tokens(ids) < len(ids), text


@pytest.mark.big
def test_qwen_template_is_hermes_and_trigger_token_works(qwen_path):
    tmpl = ChatTemplate.from_gguf_metadata(read_metadata(qwen_path))
    fmt = T.detect_format(tmpl)
    assert fmt is T.HERMES
    plan = T.plan_tools(fmt, [{"role": "user", "content": "Weather in Paris?"}], TOOLS, "auto")
    prompt = tmpl.render(plan.messages, tools=plan.template_tools)
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    tok, so = load(str(qwen_path))
    st = so.compile(plan.grammar).new_state()
    ids = tok.encode(f"Sure.\n<tool_call>\n{C1}\n</tool_call>", add_special=False)
    assert 151657 in ids  # the single <tool_call> token
    assert st.matcher.try_consume_tokens(ids) == len(ids) and st.is_accepting()


def test_string_and_missing_arguments():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call><tool_call>\n{"name": "g"}\n</tool_call>'
    for pieces in ([text], list(text)):
        p, events = _run(T.HERMES, pieces)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in p.tool_calls] == [("f", '{"a": 1}'), ("g", "{}")]
        assert [(c["name"], c["arguments"]) for c in _assemble(events)[1]] == [("f", '{"a": 1}'), ("g", "{}")]
