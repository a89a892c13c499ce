"""Number literals end (issue 18): what the compiled grammars accept, checked with llguidance's
matcher on the real smollm2 tokenizer (no model run). Integral parts stop at 16 digits, fractions
at 10, unless the schema bounds the value itself; json_object, tool arguments and open slots
(`{}`) get the same caps; minimum/maximum/maxLength of the schema are what is enforced."""

from __future__ import annotations

import llguidance as llg
import pytest

from engine.constrained import structured as S
from engine.constrained import tools as T
from engine.constrained.schema_caps import cap_literals
from grammar_walk import load


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load(str(smollm2_path))


def accepts(smol, grammar: str, text: str) -> bool:
    tok, so = smol
    m = llg.LLMatcher(so.ll_tokenizer, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return all(m.consume_token(t) for t in tok.encode(text, add_special=False)) and m.is_accepting()


CITY = {"type": "object", "properties": {"pop": {"type": "integer"}, "area": {"type": "number"}, "extra": {},
                                         "tags": {"type": "array", "items": {"type": ["integer", "null"]}}},
        "required": ["pop", "area", "extra", "tags"]}


@pytest.mark.parametrize("text,ok", [
    ('{"pop":2100000,"area":105.4,"extra":"x","tags":[1,null]}', True),
    ('{"pop":-1234567890123456,"area":-0.1234567891,"extra":[1.5],"tags":[]}', True),
    ('{"pop":12345678901234567,"area":1,"extra":1,"tags":[]}', False),  # 17 digits
    ('{"pop":1,"area":1.12345678901,"extra":1,"tags":[]}', False),  # 11 fraction digits
    ('{"pop":1,"area":1.50000000000,"extra":1,"tags":[]}', False),  # no zero loop either
    ('{"pop":1,"area":12345678901234567.5,"extra":1,"tags":[]}', False),
    ('{"pop":1,"area":1,"extra":{"a":123456789012345678},"tags":[]}', False),  # an open slot
    ('{"pop":1,"area":1,"extra":1,"tags":[12345678901234567]}', False),
])
def test_json_schema_literals_capped(smol, text, ok):
    assert accepts(smol, S.json_schema(CITY).grammar, text) is ok


@pytest.mark.parametrize("text,ok", [('{"a":1,"b":[1.5,{"c":null}],"d":"x"}', True), ("{}", True),
                                     ('{"a":123456789012345678}', False), ('{"a":[1.123456789012]}', False)])
def test_json_object_capped(smol, text, ok):
    assert accepts(smol, S.json_object().grammar, text) is ok
    assert accepts(smol, S.response_format({"type": "json_object"}).grammar, text) is ok


def test_own_bounds_kept(smol):
    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 10}, "x": {"type": "number", "exclusiveMinimum": 0.5},
        "big": {"type": "integer", "minimum": 10**17}, "s": {"type": "string", "maxLength": 3}},
        "required": ["n", "x", "big", "s"]}
    g = S.json_schema(schema).grammar
    assert accepts(smol, g, '{"n":10,"x":0.75,"big":100000000000000000000,"s":"abc"}')  # big: its own bound
    assert not accepts(smol, g, '{"n":11,"x":0.75,"big":100000000000000000,"s":"abc"}')
    assert not accepts(smol, g, '{"n":1,"x":0.5,"big":100000000000000000,"s":"abc"}')
    assert not accepts(smol, g, '{"n":1,"x":0.75,"big":100000000000000000,"s":"abcd"}')
    assert accepts(smol, g, '{"n":1,"x":12345678901234567890,"big":100000000000000000,"s":""}') is False
    capped = cap_literals(schema)["properties"]
    assert capped["n"] == schema["properties"]["n"] and capped["big"].get("maximum") is None


def test_caps_leave_negations_alone():
    """Inside `not` a cap would widen what the schema admits: left as written."""
    schema = {"not": {"type": "integer"}, "anyOf": [{"type": "integer"}, True]}
    out = cap_literals(schema)
    assert out["not"] == {"type": "integer"}
    assert out["anyOf"][0]["maximum"] == 10**16 - 1 and out["anyOf"][1] == {"$ref": "#/$defs/llamatron_any"}


def test_forced_tool_arguments_capped(smol):
    fn = {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}
    plan = T.plan_tools(T.GENERIC, [{"role": "user", "content": "hi"}], [{"type": "function", "function": fn}],
                        {"type": "function", "function": {"name": "f"}})
    head = '{"tool_calls": [{"name": "f", "arguments": '
    assert accepts(smol, plan.grammar.grammar, head + '{"n": 1234567890123456}}]}')
    assert not accepts(smol, plan.grammar.grammar, head + '{"n": 12345678901234567}}]}')
