"""Incremental JSON pieces for the tool-call parser (engine/constrained/tool_parser.py).

`CallScanner` reads one call object (`{"name": ..., "arguments": ...}`) a character at a time and
tracks only its top level: the keys, the name string, and the raw text of the arguments value
(which it hands back as it arrives, so arguments can be streamed before the object closes).
"""

from __future__ import annotations

import json


class CallScanner:
    """Consumes one JSON call object char by char; tracks its top-level keys."""

    def __init__(self, arg_keys: tuple[str, ...]) -> None:
        self.arg_keys = arg_keys
        self.raw: list[str] = []
        self.depth = 0
        self.in_str = self.esc = False
        self.key: str | None = None  # the last completed top-level key
        self.expect = "key"  # at depth 1: "key" | "colon" | "value"
        self.tok: list[str] = []  # current top-level key / name string (raw, still JSON-escaped)
        self.capture: str | None = None  # "key" | "name" | "args" while inside such a token
        self.name: str | None = None
        self.args: list[str] = []
        self.args_done = False
        self.args_is_str = False
        self.done = False

    def feed(self, c: str) -> list[str]:
        """Returns the argument characters this char adds (the raw JSON of the value)."""
        self.raw.append(c)
        out: list[str] = []
        if self.capture == "args":
            self.args.append(c)
            out.append(c)
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                if self.depth == 1:
                    self._string_closed()
            if self.capture in ("key", "name") and (self.in_str or c != '"'):
                self.tok.append(c)
            return out
        if c == '"':
            self.in_str = True
            if self.depth == 1:
                if self.expect == "key":
                    self.capture, self.tok = "key", []
                elif self.expect == "value":
                    self._value_start(c, out, is_str=True)
            return out
        if c in "{[":
            if self.depth == 1 and self.expect == "value":
                self._value_start(c, out)
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
            if self.depth == 1 and self.capture == "args":
                self._value_end()
            elif self.depth == 0:
                if self.capture == "args":  # a primitive value ends at the object's brace
                    self.args.pop(), out.pop()
                    self._value_end()
                self.done = True
        elif self.depth == 1:
            if c == ":" and self.expect == "colon":
                self.expect = "value"
            elif c == ",":
                if self.capture == "args":
                    self.args.pop(), out.pop()
                    self._value_end()
                self.expect, self.capture = "key", None
            elif not c.isspace() and self.expect == "value":
                self._value_start(c, out)  # number / true / false / null
        return out

    def _value_start(self, c: str, out: list[str], is_str: bool = False) -> None:
        self.expect = "in_value"
        if self.key == "name" and is_str:
            self.capture, self.tok = "name", []
        elif self.key in self.arg_keys and not self.args_done:
            self.capture, self.args, self.args_is_str = "args", [c], is_str
            out.append(c)

    def _string_closed(self) -> None:
        if self.capture == "key":
            self.key, self.expect, self.capture = unescape(self.tok), "colon", None
        elif self.capture == "name":
            self.name, self.capture = unescape(self.tok), None
        elif self.capture == "args" and self.args_is_str:
            self._value_end()

    def _value_end(self) -> None:
        self.capture, self.args_done = None, True

    def arguments(self) -> str:
        text = "".join(self.args).strip()
        if self.args_is_str and self.args_done:  # "arguments": "{...}" -> the decoded string
            return unescape(text[1:-1])
        return text


def unescape(raw: str | list[str]) -> str:
    raw = "".join(raw)
    try:
        return json.loads('"' + raw + '"')
    except ValueError:
        return raw


def escaped(buf: list[str]) -> bool:
    """Whether the next char follows an odd run of backslashes."""
    n = 0
    for ch in reversed(buf):
        if ch != "\\":
            break
        n += 1
    return n % 2 == 1
