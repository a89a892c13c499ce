"""Which model a request names: the top-level `model` field of its JSON body, else `?model=`.

The body is not decoded to find it: a regex scan (C speed) walks the top level of the JSON text
for the `"model"` key, so a large body costs the router no full parse on the event loop; the
worker decodes and validates the whole body as the single-model server does. Only when no name
is found is the body decoded, to answer an invalid body with the JSON error a client expects.
"""

from __future__ import annotations

import json
import re

from ..errors import APIError
from ..json_body import decode_json
from .manager import ManagedModel, ModelManager

# a JSON string, or one structural character
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]')
_COLON_STRING = re.compile(rb'\s*:\s*("(?:[^"\\]|\\.)*")')
LIST_AT_MOST = 20


def top_level_model(raw: bytes | bytearray) -> str | None:
    """The value of the top-level "model" key when it is a string (the last one, as JSON decoders
    take it), without decoding the body."""
    depth, found = 0, None
    for m in _TOKEN.finditer(raw):
        t = m.group()
        if t in (b"{", b"["):
            depth += 1
        elif t in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and t == b'"model"':
            v = _COLON_STRING.match(raw, m.end())
            if v is not None:  # a key (a value would be followed by ',' or '}', not ':')
                try:
                    found = json.loads(v.group(1))
                except ValueError:
                    return None
    return found if isinstance(found, str) else None


def known(manager: ModelManager) -> str:
    names = list(manager.models)
    shown = ", ".join(f"'{n}'" for n in names[:LIST_AT_MOST])
    return shown + (f" and {len(names) - LIST_AT_MOST} more" if len(names) > LIST_AT_MOST else "") or "none"


def pick(manager: ModelManager, name: str | None) -> ManagedModel:
    """The model `name` routes to; with no name, the only model when there is one."""
    if not name:
        if len(manager.models) == 1:
            return next(iter(manager.models.values()))
        raise APIError(400, f"This server serves several models: name one in the 'model' field (or with "
                            f"?model=). Known models: {known(manager)}.", param="model", code="model_required")
    m = manager.lookup(name)
    if m is None:
        raise APIError(404, f"The model '{name}' does not exist. Known models: {known(manager)}.", param="model",
                       code="model_not_found", type="invalid_request_error")
    return m


def body_model(raw: bytes | bytearray) -> str | None:
    """The body's model name; a 400 when the body is not JSON at all or its `model` is no string."""
    name = top_level_model(raw)
    if name is not None:
        return name
    data = decode_json(raw)  # no name found: an invalid body gets its JSON error here
    if isinstance(data, dict) and data.get("model") is not None and not isinstance(data["model"], str):
        raise APIError(400, "Invalid value for 'model': must be a string", param="model")
    return None
