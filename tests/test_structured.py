"""Grammar-constrained decoding (engine/constrained/structured.py): every grammar enforces what it says.

A GrammarState is driven by random allowed tokens of the real smollm2 tokenizer (tests/grammar_walk);
the text that comes out must parse / validate / match, whatever the walk picked.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import jsonschema
import numpy as np
import pytest
import torch

from engine.constrained import structured as S
from hostile_inputs import gbnf_chain, nested_schema
from engine.constrained.grammar_mask import fill_masks
from grammar_walk import load, walk

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["ok", "score"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"const": 3}},
     "required": ["color", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                                      "id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}},
     "required": ["tags", "id"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
     "required": ["a", "b"], "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}}},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                "required": ["kind", "lives"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                "required": ["kind", "good"], "additionalProperties": False}]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}, "note": {"type": ["string", "null"]}},
     "required": ["when", "note"], "additionalProperties": False},
    {"type": "string", "minLength": 2, "maxLength": 8},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 5}, "qty": {"type": "integer", "minimum": 1}},
        "required": ["sku", "qty"], "additionalProperties": False}, "maxItems": 2}}, "required": ["items"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load(str(smollm2_path))


def test_token_bytes_agree_with_tokenizer(smol):
    tok, so = smol
    ll = so.ll_tokenizer
    assert ll.vocab_size == tok.vocab_size and set(ll.eos_tokens) == set(tok.eog_ids)
    for i in range(tok.vocab_size):
        if not tok.is_special(i):
            assert ll.decode_bytes([i]) == tok.token_bytes(i), i
        assert ll.is_special_token(i) == tok.is_special(i), i


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(smol, k):
    tok, so = smol
    schema = SCHEMAS[k]
    compiled = so.compile(S.json_schema(schema, strict=True))
    rng = random.Random(k)
    for _ in range(4):
        text, ended = walk(tok, compiled.new_state(), rng)
        assert ended, text
        jsonschema.validate(json.loads(text), schema)
        assert "\n" not in text and ": " not in text  # compact by default


def test_json_object_always_parses(smol):
    tok, so = smol
    compiled = so.compile(S.response_format({"type": "json_object"}))
    rng = random.Random(7)
    for _ in range(6):
        text, ended = walk(tok, compiled.new_state(), rng)
        assert ended and isinstance(json.loads(text), dict), text


def test_regex_gbnf_lark(smol):
    tok, so = smol
    rng = random.Random(3)
    cases = [
        (S.regex(r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (S.gbnf('root ::= "yes" | "no" | "maybe " [0-9]'), lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t)),
        (S.gbnf('root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]{1,2} | "(" expr ")"'),
         _is_expr),
        (S.lark('start: "say " WORD ("," WORD){0,2} "."\nWORD: /[a-z]{1,5}/'),
         lambda t: re.fullmatch(r"say [a-z]{1,5}(,[a-z]{1,5}){0,2}\.", t)),
    ]
    for spec, ok in cases:
        compiled = so.compile(spec)
        for _ in range(5):
            text, ended = walk(tok, compiled.new_state(), rng, patience=6)
            assert ended and ok(text), (spec.kind, text)


def _is_expr(t: str) -> bool:
    """expr ::= term ("+" term)*; term ::= [0-9]{1,2} | "(" expr ")" (recursive descent)."""
    def expr(i: int) -> int:
        i = term(i)
        while i >= 0 and t[i:i + 1] == "+":
            i = term(i + 1)
        return i

    def term(i: int) -> int:
        if t[i:i + 1] == "(":
            i = expr(i + 1)
            return i + 1 if i >= 0 and t[i:i + 1] == ")" else -1
        m = re.match(r"[0-9]{1,2}", t[i:])
        return i + m.end() if m else -1

    return expr(0) == len(t)


@pytest.mark.parametrize("build,param", [
    (lambda: S.json_schema({"type": "strin"}), "response_format"),
    (lambda: S.json_schema({"type": "object", "required": "x"}), "response_format"),
    (lambda: S.json_schema({"type": "array", "uniqueItems": True}, param="json_schema"), "json_schema"),
    (lambda: S.json_schema({"not": {"type": "string"}}), "response_format"),
    (lambda: S.json_schema({"$ref": "#/$defs/missing"}), "response_format"),
    (lambda: S.json_schema("{not json"), "response_format"),
    (lambda: S.json_schema([1, 2]), "response_format"),
    (lambda: S.regex("[a-z"), "regex"),
    (lambda: S.gbnf("root ::= undefined_rule"), "grammar"),
    (lambda: S.gbnf(""), "grammar"),
    (lambda: S.lark("start: nothing_here"), "grammar"),
    (lambda: S.response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
     "response_format"),
    (lambda: S.response_format({"type": "xml"}), "response_format"),
])
def test_bad_constraints_are_grammar_errors(smol, build, param):
    _, so = smol
    with pytest.raises(S.GrammarError) as e:
        so.compile(build())
    assert e.value.param == param and str(e.value)


def test_response_format_variants():
    assert S.response_format(None) is None and S.response_format({"type": "text"}) is None
    a = S.response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS[0], "strict": True}})
    assert a == S.json_schema(SCHEMAS[0])
    b = S.response_format({"type": "json_object", "schema": SCHEMAS[1]})  # llama-server's form
    assert b == S.json_schema(SCHEMAS[1])


def test_cache_and_independent_states(smol):
    tok, so = smol
    spec = S.json_schema(SCHEMAS[3])
    c1, c2 = so.compile(spec), asyncio.run(so.compile_async(S.json_schema(json.loads(json.dumps(SCHEMAS[3])))))
    assert c1 is c2
    s1, s2 = c1.new_state(), c1.new_state()
    for t in tok.encode('{"color":"red"', add_special=False):
        s1.accept(t)
    row1, row2 = torch.zeros(tok.vocab_size), torch.zeros(tok.vocab_size)
    s1.fill_mask(row1), s2.fill_mask(row2)
    allowed2 = torch.isfinite(row2).nonzero().flatten().tolist()
    assert tok.decode(allowed2[:1]).startswith("{") and not torch.equal(row1, row2)


def test_terminates_and_rejects(smol):
    tok, so = smol
    st = so.compile(S.json_schema({"const": {"a": 1}})).new_state()
    assert tok.decode(st.forced_tokens()) == '{"a":1}'
    with pytest.raises(RuntimeError):
        st.accept(tok.encode("[", add_special=False)[0])
    st = so.compile(S.json_schema({"type": "boolean"})).new_state()
    for t in tok.encode("true", add_special=False):
        assert not st.is_terminated()
        st.accept(t)
    assert st.is_terminated()


def test_batched_fill_matches_per_row(smol):
    tok, so = smol
    states = []
    for k, prefix in [(0, '{"name":"'), (2, "[1,"), (3, ""), (4, '{"tags":["ab"'), (6, '{"kind":"')]:
        st = so.compile(S.json_schema(SCHEMAS[k])).new_state()
        for t in tok.encode(prefix, add_special=False):
            st.accept(t)
        states.append(st)
    V = tok.vocab_size + 32
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    expect = logits.clone()
    rows = [(0, states[0]), (2, states[1]), (3, states[2]), (6, states[3]), (7, states[4])]
    for i, st in rows:
        st.fill_mask(expect[i])
    errors = fill_masks(logits, rows)
    assert errors == [None] * len(rows) and torch.equal(logits, expect)
    assert torch.isfinite(logits[1]).all() and torch.isfinite(logits[4]).all()  # unconstrained rows untouched
    contiguous = torch.randn(3, V)
    exp2 = contiguous.clone()
    for i, st in enumerate(states[:3]):
        st.fill_mask(exp2[i])
    fill_masks(contiguous, list(enumerate(states[:3])))
    assert torch.equal(contiguous, exp2)
    bits = states[0].bitmask
    assert bits.dtype == np.int32 and bits.shape == (1, (tok.vocab_size + 31) // 32)


@pytest.mark.big
def test_qwen_tool_call_token_is_text(qwen_path):
    """qwen's `<tool_call>` is a user-defined (non-special) token: a grammar asking for the text
    "<tool_call>" must allow that single token (llguidance's tokenizer.json reader would not)."""
    tok, so = load(str(qwen_path))
    (tc,) = tok.encode("<tool_call>", add_special=False)
    st = so.compile(S.lark('start: "<tool_call>" "\\n" /[a-z]+/')).new_state()
    row = torch.zeros(tok.vocab_size)
    st.fill_mask(row)
    assert torch.isfinite(row[tc])
    st.accept(tc)
    assert not st.is_terminated()


def test_apply_paths_agree():
    """The numpy path (CPU float32) and the torch path (accelerators, other dtypes) ban the same
    columns, including the padded tail past the vocabulary."""
    from engine.constrained.grammar_mask import apply_bitmask

    rng = np.random.default_rng(0)
    bits = rng.integers(-2**31, 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    for vocab in (150, 160, 171):  # shorter than, equal to and longer than 32 * 5 bits
        a = torch.zeros(3, vocab)
        b = torch.zeros(3, vocab, dtype=torch.float64)
        apply_bitmask(a, bits)
        apply_bitmask(b, bits)
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        expect = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
        got = torch.isinf(a).numpy()
        assert (got[:, :160] == expect[:, :160]).all() and got[:, 160:].all()


def test_close_objects():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                               "b": {"type": "array", "items": {"properties": {"y": {}}}},
                                               "c": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"d": {"properties": {"z": {}}}},
              "allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    closed = S.close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["items"]["additionalProperties"] is False
    assert closed["properties"]["c"]["additionalProperties"] is True  # the schema's own word wins
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert all("additionalProperties" not in s for s in closed["allOf"])  # would exclude each other
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["properties"]["a"]


def test_open_schema_gets_no_invented_keys(smol):
    tok, so = smol
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    st = so.compile(S.json_schema(schema)).new_state()
    ids = tok.encode('{"n":1,"', add_special=False)
    assert st.matcher.try_consume_tokens(ids) < len(ids)
    opened = so.compile(S.json_schema(schema, closed=False)).new_state()
    ids = tok.encode('{"n":1,"extra":2}', add_special=False)
    assert opened.matcher.try_consume_tokens(ids) == len(ids)


@pytest.mark.parametrize("build,param", [
    # each of these took seconds to minutes (GBNF conversion and draft-04 enum checks are quadratic)
    # or raised RecursionError (a 500) before the limits; now a GrammarError before the work
    (lambda: S.gbnf(gbnf_chain(1500)), "grammar"),
    (lambda: S.gbnf("root ::= " + " ".join(['"a"'] * 40_000)), "grammar"),
    (lambda: S.json_schema({"$schema": "http://json-schema.org/draft-04/schema#",
                            "enum": [[i, str(i), {"k": i}][i % 3] for i in range(1500)]}), "response_format"),
    (lambda: S.json_schema(nested_schema(200), param="json_schema"), "json_schema"),
    (lambda: S.json_schema("[" * 50_000 + "]" * 50_000, param="json_schema"), "json_schema"),
    (lambda: S.json_schema("[" * 5_000 + "]" * 5_000, param="json_schema"), "json_schema"),
    (lambda: S.json_schema({"type": "object", "description": "x" * 70_000}), "response_format"),
])
def test_grammar_limits_fail_fast(build, param) -> None:
    t0 = time.monotonic()
    with pytest.raises(S.GrammarError) as e:
        build()
    assert e.value.param == param and time.monotonic() - t0 < 0.5


def test_grammar_limits_admit_real_grammars() -> None:
    S.gbnf(gbnf_chain(900))
    S.json_schema(nested_schema(30))
    S.json_schema({"enum": list(range(1000))})


def test_a_grammar_that_admits_nothing_is_rejected_at_compile(smol) -> None:
    _, so = smol
    with pytest.raises(S.GrammarError, match="admits no output") as e:
        so.compile(S.json_schema({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))
    assert e.value.param == "response_format"


def test_compile_deadline(smol) -> None:
    _, so = smol
    with pytest.raises(S.GrammarError, match="time budget"):
        so.compile(S.json_schema({"type": "object", "properties": {"zz": {"type": "integer"}}}),
                   deadline=time.monotonic() - 1)
