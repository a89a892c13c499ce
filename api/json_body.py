"""Decoding a request body's JSON (strict: NaN and Infinity are not JSON), with a 400 that says why."""

from __future__ import annotations

import json
from typing import Any

from .errors import invalid


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes | bytearray) -> Any:
    if not raw or raw.isspace():
        raise invalid("The request body is empty; expected a JSON object.")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise invalid(f"The request body is not valid JSON: {e}") from None
