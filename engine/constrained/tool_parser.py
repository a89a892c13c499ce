"""Streaming parser that splits generated text into content and OpenAI tool-call deltas.

`ToolCallParser(syntax).feed(text_delta) -> [ContentDelta | ToolCallDelta]`; `finish()` flushes.
It works one character at a time, so any split of the text into deltas gives the same events
(modulo coalescing). Markup (`<tool_call>`, `[TOOL_CALLS]`, the generic JSON wrapper) never
reaches content: text that could be the start of a marker is held back until it is decided.

A call object is streamed as OpenAI does: the first delta of call i carries index, id, type and
the function name (once `"name": "..."` is complete); later deltas carry pieces of the raw JSON
text of the arguments value, so the pieces concatenate to the final `arguments` string.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

from .tool_json import CallScanner, escaped, unescape

_FENCE_OPEN = re.compile(r"```(json)?\s*\{")  # a fenced bare call starts
_FENCE_PART = re.compile(r"`{1,3}|```(j|js|jso|json)?\s*")  # ...or might still

_ALNUM = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set (with name) on the first delta of a call only
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        fn: dict = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        d: dict = {"index": self.index}
        if self.id is not None:
            d["id"], d["type"] = self.id, "function"
        d["function"] = fn
        return d


Event = ContentDelta | ToolCallDelta


@dataclass(frozen=True)
class ParserSyntax:
    """Where calls sit in the text. `markers`: opening marker -> container ("object": one call
    object, then `close`; "array": a JSON array of call objects; "objects": call objects separated
    by whitespace/`;`/`,`). `bare`: container for output that starts with `{` (or None)."""

    markers: dict[str, str] = field(default_factory=dict)
    close: str | None = None
    bare: str | None = None
    fence: bool = False  # a bare call may come in a ```json fence (Qwen does that)
    arg_keys: tuple[str, ...] = ("arguments", "parameters")
    generic: bool = False  # whole output is {"tool_calls": [...]} or {"response": "..."}


class ToolCallParser:
    """Feed generated text; get content and tool-call deltas. See module docstring."""

    def __init__(self, syntax: ParserSyntax, names: Iterable[str] | None = None) -> None:
        """`names`: the tools of the request. A bare JSON object (no marker) naming anything else
        is content, as the grammar lets it be."""
        self.syntax = syntax
        self._names = frozenset(names) if names is not None else None
        self._tentative = False  # the current call has no marker: undone if its name is unknown
        self._prefix = ""  # text before a tentative call (whitespace, a ```json fence)
        self._close_marker: str | None = None
        self.tool_calls: list[dict] = []  # completed (and, after finish, truncated) calls
        self._content: list[str] = []
        self._events: list[Event] = []
        self._state = "g_start" if syntax.generic else "text"
        self._hold = ""  # text held back (a possible marker start, trailing whitespace)
        self._after_call = False
        self._container: str | None = None
        self._scan: CallScanner | None = None
        self._call: dict | None = None  # {"index", "id", "announced", "sent"}
        self._n_started = 0
        self._gbuf: list[str] = []  # generic: key being read / string escape state
        self._gkey = ""
        self._maxlen = max((len(m) for m in syntax.markers), default=0)

    # ---- public ---------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        for c in text:
            self._char(c)
        return self._take()

    def finish(self) -> list[Event]:
        if self._state == "call" and self._scan is not None:
            self._end_call(truncated=True)
        elif self._state == "text" and self._hold:
            if self._hold.strip() or not self._n_started:
                self._emit(self._hold)
            self._hold = ""
        self._state = "done"
        return self._take()

    @property
    def content(self) -> str | None:
        text = "".join(self._content)
        return text if text else None

    # ---- events -----------------------------------------------------------------------------
    def _take(self) -> list[Event]:
        out: list[Event] = []
        for e in self._events:  # coalesce neighbours of the same kind (fewer SSE chunks)
            last = out[-1] if out else None
            if isinstance(e, ContentDelta) and isinstance(last, ContentDelta):
                last.text += e.text
            elif (isinstance(e, ToolCallDelta) and isinstance(last, ToolCallDelta)
                  and e.index == last.index and e.id is None):
                last.arguments += e.arguments
            else:
                out.append(e)
        self._events = []
        return out

    def _emit(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        if text:
            self._content.append(text)
            self._events.append(ContentDelta(text))

    # ---- the state machine ------------------------------------------------------------------
    def _char(self, c: str) -> None:
        st = self._state
        if st == "text":
            self._text(c)
        elif st == "call":
            self._call_char(c)
        elif st == "open":
            if c.isspace():
                return
            if c == "{" and self._container in ("object", "objects"):
                self._start_call(c)
            elif c == "[" and self._container == "array":
                self._state = "between"
            else:
                self._state = "text"
                self._text(c)
        elif st == "between":
            self._between(c)
        elif st == "close":
            self._close(c)
        elif st.startswith("g_"):
            self._generic(c)

    def _text(self, c: str) -> None:
        hold = self._hold = self._hold + c
        sx = self.syntax
        if sx.bare and not self._content and not self._n_started:
            lead = hold.lstrip()
            fenced = sx.fence and _FENCE_OPEN.fullmatch(lead) is not None
            if lead == "{" or fenced:
                self._prefix, self._hold, self._tentative = hold[:-1], "", True
                self._container, self._close_marker = ("object", "```") if fenced else (sx.bare, None)
                self._start_call(c)
                return
            if sx.fence and _FENCE_PART.fullmatch(lead):
                return  # could still open a fenced call: hold it
        for marker, container in sx.markers.items():
            if hold.endswith(marker):
                pre = hold[: -len(marker)].rstrip()
                self._hold, self._tentative, self._close_marker = "", False, sx.close
                if pre:
                    self._emit(pre)
                self._state, self._container = "open", container
                return
        keep = 0
        for n in range(min(len(hold), self._maxlen - 1), 0, -1):
            tail = hold[-n:]
            if any(m.startswith(tail) for m in sx.markers):
                keep = n
                break
        cut = len(hold) - keep
        while cut > 0 and hold[cut - 1].isspace():
            cut -= 1
        if cut:
            self._emit(hold[:cut])
            self._hold = hold[cut:]

    def _start_call(self, c: str) -> None:
        self._scan = CallScanner(self.syntax.arg_keys)
        self._call = {"index": self._n_started, "id": new_call_id(), "announced": False, "sent": 0}
        self._n_started += 1
        self._state = "call"
        self._call_char(c)

    def _call_char(self, c: str) -> None:
        scan, call = self._scan, self._call
        assert scan is not None and call is not None
        scan.feed(c)
        if not call["announced"] and scan.name is not None:
            if self._tentative and self._names is not None and scan.name not in self._names:
                self._undo_call()
                return
            call["announced"] = True
            self._events.append(ToolCallDelta(call["index"], call["id"], scan.name, ""))
        streamable = scan.args and scan.args[0] in "{["
        if call["announced"] and streamable and len(scan.args) > call["sent"]:
            self._events.append(ToolCallDelta(call["index"], arguments="".join(scan.args[call["sent"]:])))
            call["sent"] = len(scan.args)
        if scan.done:
            self._end_call()

    def _end_call(self, truncated: bool = False) -> None:
        scan, call = self._scan, self._call
        assert scan is not None and call is not None
        self._scan = self._call = None
        if scan.name is None:  # not a call after all: it is content
            self._scan, self._call = scan, call
            self._undo_call()
            if self.syntax.generic:
                self._state = "g_rest"
            return
        args = scan.arguments() if (scan.args or truncated) else "{}"
        if not call["announced"]:
            self._events.append(ToolCallDelta(call["index"], call["id"], scan.name, ""))
        if call["sent"] == 0 and args:
            self._events.append(ToolCallDelta(call["index"], arguments=args))
        self.tool_calls.append({"id": call["id"], "type": "function",
                                "function": {"name": scan.name, "arguments": args}})
        self._after_call = True
        if truncated:
            return
        if self._container in ("array", "objects"):
            self._state = "between"
        elif self._close_marker:
            self._state, self._hold = "close", ""
        else:
            self._state = "g_rest" if self.syntax.generic else "text"

    def _between(self, c: str) -> None:
        if c.isspace() or c == "," or (c == ";" and self._container == "objects"):
            return
        if c == "{":
            self._start_call(c)
        elif c == "]" and self._container == "array":
            self._state = "g_rest" if self.syntax.generic else ("close" if self._close_marker else "text")
        else:
            self._state = "g_rest" if self.syntax.generic else "text"
            if not self.syntax.generic:
                self._text(c)

    def _undo_call(self) -> None:
        """The object being scanned is not a call: its text (and what preceded it) is content."""
        scan = self._scan
        assert scan is not None
        raw = self._prefix + "".join(scan.raw)
        self._scan = self._call = None
        self._n_started -= 1
        self._state, self._tentative, self._prefix = "text", False, ""
        self._emit(raw)

    def _close(self, c: str) -> None:
        close = self._close_marker or ""
        if not self._hold and c.isspace():
            return
        self._hold += c
        if close == self._hold:
            self._state, self._hold = "text", ""
        elif not close.startswith(self._hold):
            text, self._hold, self._state = self._hold, "", "text"
            for ch in text:
                self._text(ch)

    # ---- generic format: {"tool_calls": [...]} | {"tool_call": {...}} | {"response": "..."} --
    def _generic(self, c: str) -> None:
        st = self._state
        if st == "g_rest":
            return
        if st == "g_start":
            if c.isspace():
                return
            if c != "{":  # not the generic wrapper: pass the text through as content
                self._state = "text"
                self._text(c)
            else:
                self._state = "g_key_wait"
        elif st == "g_key_wait":
            if c == '"':
                self._state, self._gbuf = "g_key", []
            elif not c.isspace():
                self._state = "g_rest"
        elif st == "g_key":
            if c == '"' and not escaped(self._gbuf):
                self._gkey, self._state = unescape(self._gbuf), "g_colon"
            else:
                self._gbuf.append(c)
        elif st == "g_colon":
            if c == ":":
                self._state = "g_value"
        elif st == "g_value":
            if c.isspace():
                return
            if self._gkey == "response" and c == '"':
                self._state, self._gbuf = "g_str", []
            elif self._gkey == "tool_calls" and c == "[":
                self._state, self._container = "between", "array"
            elif self._gkey == "tool_call" and c == "{":
                self._container = "single"
                self._start_call(c)
            else:
                self._state = "g_rest"
        elif st == "g_str":
            self._string_char(c)

    def _string_char(self, c: str) -> None:
        """Decode a JSON string incrementally; complete characters go out as content."""
        buf = self._gbuf
        if not buf:
            if c == '"':
                self._state = "g_rest"
            elif c == "\\":
                buf.append(c)
            else:
                self._emit(c)
            return
        buf.append(c)
        seq = "".join(buf)
        if len(seq) == 2 and seq[1] != "u":
            self._gbuf = []
            self._emit(unescape(seq))
        elif len(seq) == 6:
            cp = int(seq[2:], 16) if all(h in string.hexdigits for h in seq[2:]) else 0xFFFD
            if 0xD800 <= cp < 0xDC00:
                return  # a high surrogate: wait for its low half
            self._gbuf = []
            self._emit(chr(cp) if not 0xDC00 <= cp < 0xE000 else "\ufffd")
        elif len(seq) == 12:
            self._gbuf = []
            self._emit(unescape(seq))
        elif len(seq) == 7 and c != "\\":  # a lone high surrogate followed by something else
            self._gbuf = []
            self._emit("\ufffd")
            self._string_char(c)
