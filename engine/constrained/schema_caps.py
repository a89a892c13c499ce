"""Caps on JSON number literals, written into a schema before llguidance compiles it.

llguidance's grammar for `{"type": "integer"}` is `-?(0|[1-9][0-9]*)`: nothing ever forces the
digits to end, and small models run away (`"population": 11122000000000000000...` until
max_tokens). llama.cpp caps every JSON literal (integral part at most 16 digits, fraction at most
16); we do the same by rewriting the schema, since llguidance has no option for it:

- integers without a bound get `minimum`/`maximum` of -/+ (10^16 - 1): at most 16 digits;
- numbers without a bound get -/+ 1e16, and `multipleOf: 1e-10` when they have no `multipleOf`
  of their own: at most 10 fraction digits (llguidance reads `multipleOf` into a u32 numerator by
  multiplying the float by ten until it is whole, which for 10^-11 and smaller never happens
  exactly; trailing zeros past the tenth digit are refused too, so no `1.5000000...` loop);
- schemas that admit any value (`{}`, `true`, and json_object's objects) get an "any JSON" schema
  whose numbers are capped the same way.

A bound the schema gives itself is kept as it is (only the missing side is added, and not when
it would contradict the given one). Everything the rewritten schema admits is valid against the
original, so clients validating against their own schema never see the difference.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cap_literals", "INT_CAP", "NUM_CAP", "FRACTION", "SUB_MAPS", "SUB_LISTS", "SUB_ONE"]

INT_CAP = 10**16 - 1
NUM_CAP = 1e16
FRACTION = 1e-10
_ANY_REF = "#/$defs/llamatron_any"
_ANY_DEF = {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string"},
                      {"type": "number", "minimum": -NUM_CAP, "maximum": NUM_CAP, "multipleOf": FRACTION},
                      {"type": "array", "items": {"$ref": _ANY_REF}},
                      {"type": "object", "additionalProperties": {"$ref": _ANY_REF}}]}
# the keywords whose values are subschemas (engine/constrained/grammars.py walks the same ones)
SUB_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
SUB_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
# positions where `{}`/`true` means "any value the model likes" (elsewhere, e.g. in `not` or
# `allOf`, an empty schema constrains nothing and must stay empty)
_VALUE_SLOTS = {"properties", "$defs", "definitions", "patternProperties", "items", "additionalProperties",
                "prefixItems", "anyOf", "oneOf"}


def cap_literals(schema: Any) -> Any:
    """A copy of `schema` with capped number literals (see the module doc). The root may be any
    schema; `{"$defs": {"llamatron_any": ...}}` is added to a dict root that needs it."""
    if not isinstance(schema, dict):
        return schema
    walk = _Walk(fill="$id" not in schema)
    out = walk.node(schema, cap=True, fill=walk.fill)
    if walk.uses_any:
        out["$defs"] = {**out.get("$defs", {}), "llamatron_any": _ANY_DEF}
    return out


_NOTES = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
# subschemas where a narrower schema would widen or shift what the whole admits: left as written
_KEEP = ("not", "if", "contains", "propertyNames", "dependentSchemas")


class _Walk:
    """One rewrite: `cap` adds number bounds, `fill` also turns open slots (`{}`, `true`, an
    object without `properties`, an array without `items`) into capped "any JSON". `$id` at the
    root moves where `#/$defs/...` resolves in nested `$id`s, so such schemas are not filled;
    `allOf` branches are not filled either (an open branch must stay open for the others)."""

    def __init__(self, fill: bool) -> None:
        self.fill, self.uses_any = fill, False

    def any_ref(self) -> dict:
        self.uses_any = True
        return {"$ref": _ANY_REF}

    def node(self, node: Any, cap: bool, fill: bool) -> Any:
        if node is True or isinstance(node, dict) and node.keys() <= _NOTES:
            return self.any_ref() if fill else node
        if not isinstance(node, dict):
            return node
        out = dict(node)
        if cap and not {"enum", "const"} & out.keys():
            _cap_numbers(out)
        if fill:
            self._fill_open(out)
        for key in SUB_MAPS + SUB_LISTS + SUB_ONE:
            keep = key in _KEEP
            c, f = cap and not keep, fill and not keep and key != "allOf" and key in _VALUE_SLOTS
            if key in SUB_MAPS and isinstance(out.get(key), dict):
                out[key] = {k: self.node(v, c, f) for k, v in out[key].items()}
            elif key in SUB_LISTS and isinstance(out.get(key), list):
                out[key] = [self.node(v, c, f) for v in out[key]]
            elif key in SUB_ONE and key in out:
                out[key] = self.node(out[key], c, f)
        return out

    def _fill_open(self, out: dict) -> None:
        types = _types(out)
        if types == {"object"} and not {"properties", "additionalProperties", "patternProperties",
                                        "unevaluatedProperties"} & out.keys():
            out["additionalProperties"] = self.any_ref()
        if types == {"array"} and not {"items", "prefixItems", "unevaluatedItems"} & out.keys():
            out["items"] = self.any_ref()


def _types(node: dict) -> set[str]:
    t = node.get("type")
    return {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()


def _bound(node: dict, key: str) -> float | None:
    """The schema's own bound on one side (`minimum`, or a numeric `exclusiveMinimum`)."""
    vals = [node.get(key), node.get("exclusive" + key[0].upper() + key[1:])]
    nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return (max(nums) if key == "minimum" else min(nums)) if nums else None


def _cap_numbers(node: dict) -> None:
    types = _types(node)
    if not types & {"integer", "number"}:
        return
    cap = NUM_CAP if "number" in types else INT_CAP
    lo, hi = _bound(node, "minimum"), _bound(node, "maximum")
    if lo is None and (hi is None or hi >= -cap):
        node["minimum"] = -cap
    if hi is None and (lo is None or lo <= cap):
        node["maximum"] = cap
    if "number" in types and "multipleOf" not in node:
        node["multipleOf"] = FRACTION
