"""Request constraints -> llguidance grammar text (`GrammarSpec`); no tokenizer needed.

Builders for each way a request can constrain its output: `json_object`, `json_schema`, `gbnf`
(llama.cpp grammars), `lark`, `regex`, and `response_format` (OpenAI's object). Input that is not
even well formed raises `GrammarError` (a ValueError with `.param`, the request parameter to name
in the 400); the rest is validated when engine/constrained/structured.py compiles the spec.

Every builder checks `GrammarLimits` before any work that grows faster than its input: llguidance's
GBNF converter is quadratic in the number of rules, jsonschema's draft-04 `uniqueItems` check of an
`enum` is quadratic in its values, and the schema walkers recurse once per nesting level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance as llg

from .schema_caps import SUB_LISTS, SUB_MAPS, SUB_ONE, cap_literals

__all__ = ["GrammarError", "GrammarLimits", "GrammarSpec", "DEFAULT_LIMITS", "json_object", "json_schema", "gbnf",
           "lark", "regex", "response_format", "close_objects", "check_schema_shape"]

# compact JSON unless a schema's own "x-guidance" says otherwise: free whitespace lets small
# models ramble (newlines and indentation until max_tokens)
COMPACT = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A constraint that cannot be enforced: the API answers 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarLimits:
    """Caps on what a request may ask the grammar machinery to build (each exceeded: a 400)."""

    max_chars: int = 65_536  # grammar text, or a schema serialized as JSON
    max_rules: int = 1_000  # GBNF rules (~0.3 s to convert at the cap, 2,500 rules take seconds)
    max_depth: int = 64  # JSON nesting of a schema (objects and arrays)
    max_enum_values: int = 1_000  # enum/const values across one schema (OpenAI's limit too)
    max_tools: int = 128  # functions in one request (OpenAI's limit)
    timeout_s: float = 5.0  # building + compiling one grammar


DEFAULT_LIMITS = GrammarLimits()


@dataclass(frozen=True)
class GrammarSpec:
    grammar: str  # llguidance grammar text (Lark, or its JSON grammar list)
    param: str  # request parameter it came from, for error messages
    kind: str = "lark"


# ---- builders (no tokenizer needed) ----------------------------------------------------------
def json_object(param: str = "response_format") -> GrammarSpec:
    return json_schema({"type": "object"}, param=param)


def json_schema(schema: Any, strict: bool = False, param: str = "response_format",
                compact: bool = True, closed: bool = True, limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarSpec:
    """Any JSON matching `schema`. `strict` is accepted for OpenAI compatibility; enforcement is
    the same either way (every keyword we accept is enforced; unsupported ones are a 400).
    `closed`: objects that list `properties` get no others unless the schema says otherwise (see
    `close_objects`); `compact`: no optional whitespace. Number literals are capped in length
    unless the schema bounds them itself (`cap_literals`)."""
    if isinstance(schema, str):
        if len(schema) > limits.max_chars:
            raise GrammarError(f"schema is longer than {limits.max_chars} characters", param)
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise GrammarError(f"schema is nested more than {limits.max_depth} levels deep", param) from None
        except ValueError as e:
            raise GrammarError(f"schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("schema must be a JSON object", param)
    if isinstance(schema, dict):
        check_schema_shape(schema, param, limits)
        _check_schema(schema, param)
        if closed:
            schema = close_objects(schema)
        schema = cap_literals(schema)  # number literals end (engine/constrained/schema_caps.py)
    try:
        text = llg.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT if compact else None)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}", param) from None
    return GrammarSpec(text, param, "json_schema")


_SUB_LISTS = tuple(k for k in SUB_LISTS if k != "allOf")  # allOf branches are walked apart (left open)


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
    for key in SUB_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUB_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in SUB_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(v, _in_all_of=True) for v in out["allOf"]]
    return out


def check_schema_shape(schema: Any, param: str, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
    """Depth, enum values and size of a decoded schema, walked without recursion (a schema
    nested 10,000 deep must fail here, not as a RecursionError further on)."""
    stack, enums = [(schema, 1)], 0
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise GrammarError(f"schema is nested more than {limits.max_depth} levels deep", param)
        if isinstance(node, dict):
            enum = node.get("enum")
            enums += len(enum) if isinstance(enum, list) else 0
            enums += "const" in node
            stack += [(v, depth + 1) for v in node.values() if isinstance(v, (dict, list))]
        else:
            stack += [(v, depth + 1) for v in node if isinstance(v, (dict, list))]
        if enums > limits.max_enum_values:
            raise GrammarError(f"schema has more than {limits.max_enum_values} enum values", param)
    if len(json.dumps(schema)) > limits.max_chars:
        raise GrammarError(f"schema is larger than {limits.max_chars} characters as JSON", param)


def _check_schema(schema: dict, param: str) -> None:
    """Reject schemas that are malformed by the JSON Schema meta-schema (llguidance checks the
    keywords it implements; this catches e.g. `"required": "x"`)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(f"invalid JSON schema at '{where}': {e.message}", param) from None


def _check_text(text: Any, param: str, limits: GrammarLimits) -> None:
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar must be a non-empty string", param)
    if len(text) > limits.max_chars:
        raise GrammarError(f"grammar is longer than {limits.max_chars} characters", param)


def gbnf(text: str, param: str = "grammar", limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarSpec:
    """llama.cpp GBNF (or a Lark grammar starting with %llguidance, as llama.cpp accepts)."""
    _check_text(text, param, limits)
    if text.count("::=") > limits.max_rules:
        raise GrammarError(f"grammar has more than {limits.max_rules} rules", param)
    try:
        return GrammarSpec(llg.grammar_from("gbnf", text), param, "gbnf")
    except ValueError as e:
        raise GrammarError(f"invalid grammar: {e}", param) from None


def lark(text: str, param: str = "grammar", limits: GrammarLimits | None = None) -> GrammarSpec:
    """A Lark grammar; `limits` None for grammars we built ourselves (tools: their schemas were
    checked one by one)."""
    if limits is not None:
        _check_text(text, param, limits)
    elif not isinstance(text, str) or not text.strip():
        raise GrammarError("grammar must be a non-empty string", param)
    return GrammarSpec(llg.LLMatcher.grammar_from_lark(text), param, "lark")


def regex(pattern: str, param: str = "regex") -> GrammarSpec:
    if not isinstance(pattern, str):
        raise GrammarError("regex must be a string", param)
    return GrammarSpec(llg.LLMatcher.grammar_from_regex(pattern), param, "regex")


def response_format(rf: Any, param: str = "response_format",
                    limits: GrammarLimits = DEFAULT_LIMITS) -> GrammarSpec | None:
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
        return json_schema(rf["schema"], param=param, limits=limits) if "schema" in rf else json_object(param)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js and "name" not in js:
            raise GrammarError("response_format.json_schema must be an object with a 'schema'", param)
        schema = js.get("schema", {"type": "object"})
        return json_schema(schema, strict=bool(js.get("strict")), param=param, limits=limits)
    raise GrammarError(f"unsupported response_format type {kind!r}", param)
