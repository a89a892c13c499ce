"""Request constraints -> llguidance grammar text (`GrammarSpec`); no tokenizer needed.

Builders for each way a request can constrain its output: `json_object`, `json_schema`, `gbnf`
(llama.cpp grammars), `lark`, `regex`, and `response_format` (OpenAI's object). Input that is not
even well formed raises `GrammarError` (a ValueError with `.param`, the request parameter to name
in the 400); the rest is validated when engine/constrained/structured.py compiles the spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance as llg

__all__ = ["GrammarError", "GrammarSpec", "json_object", "json_schema", "gbnf", "lark", "regex",
           "response_format", "close_objects"]

# compact JSON unless a schema's own "x-guidance" says otherwise: free whitespace lets small
# models ramble (newlines and indentation until max_tokens)
COMPACT = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A constraint that cannot be enforced: the API answers 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    grammar: str  # llguidance grammar text (Lark, or its JSON grammar list)
    param: str  # request parameter it came from, for error messages
    kind: str = "lark"


# ---- builders (no tokenizer needed) ----------------------------------------------------------
def json_object(param: str = "response_format") -> GrammarSpec:
    return json_schema({"type": "object"}, param=param)


def json_schema(schema: Any, strict: bool = False, param: str = "response_format",
                compact: bool = True, closed: bool = True) -> GrammarSpec:
    """Any JSON matching `schema`. `strict` is accepted for OpenAI compatibility; enforcement is
    the same either way (every keyword we accept is enforced; unsupported ones are a 400).
    `closed`: objects that list `properties` get no others unless the schema says otherwise (see
    `close_objects`); `compact`: no optional whitespace."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("schema must be a JSON object", param)
    if isinstance(schema, dict):
        _check_schema(schema, param)
        if closed:
            schema = close_objects(schema)
    try:
        text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT if compact else None)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}", param) from None
    return GrammarSpec(text, param, "json_schema")


_SUB_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


def close_objects(schema: Any, _in_all_of: bool = False) -> Any:
    """A copy of `schema` where every object schema with `properties` but no word on other keys
    gets `additionalProperties: false`. Everything it admits still validates against the original;
    without it, small models invent extra keys until max_tokens cuts the JSON off. Branches of
    `allOf` are left open (closing each would make them exclude one another)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if ("properties" in out and not _in_all_of and not {"additionalProperties", "patternProperties",
                                                         "unevaluatedProperties"} & out.keys()):
        out["additionalProperties"] = False
    for key in _SUB_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUB_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in _SUB_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(v, _in_all_of=True) for v in out["allOf"]]
    return out


def _check_schema(schema: dict, param: str) -> None:
    """Reject schemas that are malformed by the JSON Schema meta-schema (llguidance checks the
    keywords it implements; this catches e.g. `"required": "x"`)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"invalid JSON schema at '{where}': {e.message}", param) from None


def gbnf(text: str, param: str = "grammar") -> GrammarSpec:
    """llama.cpp GBNF (or a Lark grammar starting with %llguidance, as llama.cpp accepts)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar must be a non-empty string", param)
    try:
        return GrammarSpec(llg.grammar_from("gbnf", text), param, "gbnf")
    except ValueError as e:
        raise GrammarError(f"invalid grammar: {e}", param) from None


def lark(text: str, param: str = "grammar") -> GrammarSpec:
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar must be a non-empty string", param)
    return GrammarSpec(llg.LLMatcher.grammar_from_lark(text), param, "lark")


def regex(pattern: str, param: str = "regex") -> GrammarSpec:
    if not isinstance(pattern, str):
        raise GrammarError("regex must be a string", param)
    return GrammarSpec(llg.LLMatcher.grammar_from_regex(pattern), param, "regex")


def response_format(rf: Any, param: str = "response_format") -> GrammarSpec | None:
    """OpenAI `response_format` -> spec (None for {"type": "text"}). Also llama-server's
    {"type": "json_object", "schema": {...}}."""
    if rf is None:
        return None
    if hasattr(rf, "model_dump"):  # a pydantic model from api/schemas.py
        rf = rf.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(rf, dict):
        raise GrammarError("response_format must be an object", param)
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_schema(rf["schema"], param=param) if "schema" in rf else json_object(param)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js and "name" not in js:
            raise GrammarError("response_format.json_schema must be an object with a 'schema'", param)
        schema = js.get("schema", {"type": "object"})
        return json_schema(schema, strict=bool(js.get("strict")), param=param)
    raise GrammarError(f"unsupported response_format type {kind!r}", param)
