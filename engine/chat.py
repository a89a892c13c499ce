"""Chat templates: render a GGUF's `tokenizer.chat_template` (jinja) into a prompt, as llama-server does.

A template inside a model file is untrusted code, so it runs in jinja2's ImmutableSandboxedEnvironment
(no underscore attributes, no mutation of lists/dicts, no file or process access) with a few cheap
resource guards on top: bounded `range` iterations, bounded string growth from `*`, `+`, `~`,
padding/format widths and joins, and a cap on the rendered size. Anything that goes wrong surfaces
as TemplateError (the API answers 400).

Messages are normalised the way llama.cpp (common/chat.cpp) does before rendering: content is a
string ("" for null), text parts are joined with "\\n", tool-call arguments become JSON objects for
templates that read them as objects, a `developer` role becomes `system`, a system message is merged
into the next message for templates that ignore the system role. What a template supports is found
by rendering it on probe conversations whose values record whether the template touched them
(llama.cpp's jinja/caps.cpp does the same with usage statistics).
"""

from __future__ import annotations

import contextvars
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import filters as jfilters
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError

# What llama-server renders when a model has no template (llama.cpp CHATML_TEMPLATE_SRC).
CHATML_SOURCE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)

MAX_OUTPUT_CHARS = 16 * 1024 * 1024  # any prompt longer than this exceeds every context window
MAX_WIDTH = 100_000  # widths a template may pass to padding / repeat / format operations
MAX_RANGE_STEPS = 250_000  # total range() iterations in one render (nested loops multiply)
_ITEM_COST = 16  # a list element counts as this many characters (lists are slower to copy)


class TemplateError(ValueError):
    """The chat template raised (raise_exception), failed to render, or violated the sandbox."""


# ---------------------------------------------------------------------------------------------
# Resource guards
# ---------------------------------------------------------------------------------------------

_range_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_range_budget")
_probing: contextvars.ContextVar[bool] = contextvars.ContextVar("chat_probing", default=False)
_PCT_WIDE = re.compile(r"%[#0 +\-]*(?:\*|\d{6,}|\d*\.(?:\*|\d{6,}))")  # '%999999999d', '%*d'
_BRACE_WIDE = re.compile(r"\{[^{}]*:[^{}]*(?:\d{6,}|\{)")  # '{:>999999999}', '{:{}}'
_STRFTIME_WIDE = re.compile(r"%[-_0^#]*\d{4,}")


def _too_big(n: int, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template produced a value too large ({what})")


def _check_width(w: Any, what: str) -> None:
    if isinstance(w, int) and w > MAX_WIDTH:
        raise TemplateError(f"chat template asked for a width of {w} in {what} (limit {MAX_WIDTH})")


class _GuardedRange:
    """range() for templates: jinja's MAX_RANGE cap per call, and every iteration is charged to
    the current render's budget, so nested loops cannot run for hours."""

    __slots__ = ("_r",)

    def __init__(self, *args: int) -> None:
        self._r = args[0] if len(args) == 1 and isinstance(args[0], range) else range(*args)
        if len(self._r) > MAX_RANGE:
            raise TemplateError(f"range too big: {len(self._r)} items (limit {MAX_RANGE})")

    def __iter__(self) -> Any:
        budget = _range_budget.get(None)
        for v in self._r:
            if budget is not None:
                budget[0] -= 1
                if budget[0] < 0:
                    raise TemplateError(f"chat template ran more than {MAX_RANGE_STEPS} loop iterations")
            yield v

    def __reversed__(self) -> Any:
        return iter(_GuardedRange(self._r[::-1]))

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return _GuardedRange(self._r[i]) if isinstance(i, slice) else self._r[i]

    def __contains__(self, v: Any) -> bool:
        return v in self._r

    def __repr__(self) -> str:
        return repr(self._r)


def _guard_str_call(owner: str, name: str, args: tuple, kwargs: dict) -> None:
    if name in ("ljust", "rjust", "center", "zfill", "expandtabs"):
        for a in (*args, *kwargs.values()):
            _check_width(a, f"str.{name}")
    elif name in ("format", "format_map") and _BRACE_WIDE.search(owner):
        raise TemplateError("chat template used a str.format width that is too large or computed")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grow = len(args[1]) - len(args[0])
        if grow > 0:
            hits = owner.count(args[0]) if args[0] else len(owner) + 1
            _too_big(len(owner) + hits * grow, "str.replace")
    elif name == "join" and args and isinstance(args[0], list):
        _too_big(sum(len(x) for x in args[0] if isinstance(x, str)) + len(owner) * len(args[0]), "str.join")


def _check_result(value: Any, what: str) -> Any:
    """After the fact: stops doubling chains (`s % (s, s)`, `'{}{}'.format(s, s)`) at 2x the cap."""
    if isinstance(value, str):
        _too_big(len(value), what)
    elif isinstance(value, list):
        _too_big(len(value) * _ITEM_COST, what)
    return value


class _GuardedCodeGenerator(CodeGenerator):
    # `a ~ b` compiles to a join that the sandbox does not see; route it through a size check.
    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        seqs = (str, list, tuple)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, seqs) and isinstance(n, int):
                    _too_big(len(seq) * n * (1 if isinstance(seq, str) else _ITEM_COST), "repetition")
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            _too_big((len(left) + len(right)) * (1 if isinstance(left, str) else _ITEM_COST), "concatenation")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and left.bit_length() * right > 1 << 16:
                raise TemplateError("chat template computed a power that is too large")
        elif operator == "%" and isinstance(left, str) and _PCT_WIDE.search(left):
            raise TemplateError("chat template used a %-format width that is too large or computed")
        return _check_result(super().call_binop(context, operator, left, right), f"operator {operator}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        target = getattr(__obj, "__wrapped__", __obj)  # str.format arrives wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name == "join" and args:  # size the pieces before joining (a generator is read once)
                args = (list(args[0]), *args[1:])
            _guard_str_call(owner, name, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs), "call result")

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja would return a silent Undefined; a template probing internals gets a clear error
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    @staticmethod
    def guarded_concat(parts: tuple) -> str:
        strs = [str(p) for p in parts]
        _too_big(sum(map(len, strs)), "~ concatenation")
        return "".join(strs)


def _raise_exception(message: Any = "") -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    if _STRFTIME_WIDE.search(str(fmt)):
        raise TemplateError("chat template used a strftime width that is too large")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # HF/llama.cpp semantics: plain json.dumps (", " and ": " separators), no HTML escaping
    if _probing.get():
        _touch_all(value)
    _check_width(indent if isinstance(indent, int) else len(str(indent or "")), "tojson indent")
    sep = tuple(separators) if separators is not None else None
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=sep,
                      sort_keys=sort_keys, default=lambda o: None if isinstance(o, jinja2.Undefined) else str(o))


def _center(value: Any, width: int = 80) -> str:
    _check_width(width, "center")
    return jfilters.do_center(value, width)


def _indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    _check_width(width, "indent")
    w = width if isinstance(width, int) else len(str(width))
    _too_big(len(str(s)) + (str(s).count("\n") + 1) * max(w, 0), "indent")
    return jfilters.do_indent(s, width, first, blank)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    if _PCT_WIDE.search(str(value)):
        raise TemplateError("chat template used a %-format width that is too large or computed")
    return _check_result(jfilters.do_format(value, *args, **kwargs), "format")


def _bounded(f: Any, what: str) -> Any:
    """A filter whose second argument is a count that it loops or allocates over (batch, slice)."""
    def wrapper(value: Any, n: Any, *args: Any, **kwargs: Any) -> Any:
        _check_width(n, what)
        return f(value, n, *args, **kwargs)
    return wrapper


@jinja2.pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
    _guard_str_call(str(s), "replace", (str(old), str(new)), {})
    return jfilters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is None:
        _too_big(sum(len(str(x)) for x in items) + len(d) * len(items), "join")
    return jfilters.do_join(eval_ctx, items, d, attribute)


_ENV: _ChatEnvironment | None = None


def _environment() -> _ChatEnvironment:
    """One shared environment (thread-safe for rendering); HF's settings: trim/lstrip blocks."""
    global _ENV
    if _ENV is None:
        env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
                               extensions=[loopcontrols, _GenerationTag], autoescape=False)
        # ChainableUndefined: `messages[0].role` on an empty list is undefined, not an error
        # (llama-server renders an empty conversation; HF's default Undefined would raise)
        env.globals.update(range=_GuardedRange, raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.globals.pop("lipsum", None)  # lipsum(n=10**9) would loop for ages; no template needs it
        env.filters.update(tojson=_tojson, center=_center, indent=_indent, format=_format, replace=_replace,
                           join=_join, batch=_bounded(jfilters.do_batch, "batch"),
                           slice=_bounded(jfilters.do_slice, "slice"))
        _ENV = env
    return _ENV


# ---------------------------------------------------------------------------------------------
# Capability probes: values that note whether the template used them
# ---------------------------------------------------------------------------------------------

def _touch_all(value: Any) -> None:
    if isinstance(value, (_ProbeStr, _ProbeDict, _ProbeList)):
        value._log.add(value._key)
    if isinstance(value, dict):
        for v in dict.values(value):
            _touch_all(v)
    elif isinstance(value, list):
        for v in list.__iter__(value):
            _touch_all(v)


def _recording(base: type, names: tuple[str, ...], array_ops: tuple[str, ...] = ()) -> dict:
    ns: dict[str, Any] = {}
    for name in names:
        def op(self: Any, *a: Any, _n: str = name) -> Any:
            self._log.add(self._key)
            if _n in array_ops:
                self._log.add(self._key + ":array")
            if _n == "__radd__":  # str has no __radd__, but a subclass's is tried first
                return a[0] + base.__str__(self) if isinstance(a[0], str) else NotImplemented
            return getattr(base, _n)(self, *a)
        ns[name] = op

    def getattribute(self: Any, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_log").add(object.__getattribute__(self, "_key"))
        return base.__getattribute__(self, name)
    ns["__getattribute__"] = getattribute
    ns["__hash__"] = base.__hash__
    return ns


_STR_OPS = ("__str__", "__add__", "__radd__", "__mod__", "__mul__", "__eq__", "__ne__", "__lt__", "__le__",
            "__gt__", "__ge__", "__len__", "__contains__", "__format__", "__iter__", "__getitem__")
_ProbeStr = type("_ProbeStr", (str,), _recording(str, _STR_OPS, ("__iter__", "__getitem__")))
_ProbeDict = type("_ProbeDict", (dict,), _recording(dict, ("__getitem__", "__iter__", "__len__", "__contains__")))
_ProbeList = type("_ProbeList", (list,), _recording(list, ("__getitem__", "__iter__", "__len__", "__contains__")))


def _probe(cls: type, value: Any, log: set, key: str) -> Any:
    obj = cls(value)
    obj._log, obj._key = log, key
    return obj


def _probe_render(tmpl: "ChatTemplate", messages: list, tools: list) -> tuple[bool, str]:
    ctx = {"messages": messages, "tools": tools, "bos_token": "", "eos_token": "", "add_generation_prompt": True}
    token = _probing.set(True)
    try:
        return True, tmpl.render_raw(ctx)
    except TemplateError:
        return False, ""
    finally:
        _probing.reset(token)


def _tool_probe(log: set, args: Any, n_calls: int = 1) -> tuple[list, list]:
    """llama.cpp's tool-use probe conversation; `log` records touches of the name/calls/args."""
    calls = [{"id": f"call0000{i + 1}", "type": "function",
              "function": _probe(_ProbeDict, {"name": "tool1", "arguments": args(i)}, log, f"fn{i}")}
             for i in range(n_calls)]
    messages = [
        {"role": "user", "content": "User message"},
        {"role": "assistant", "content": "", "tool_calls": _probe(_ProbeList, calls, log, "calls")},
        {"role": "tool", "content": "Tool response", "tool_call_id": "call00001"},
        {"role": "assistant", "content": "The tool response was 'tool response'"},
        {"role": "user", "content": "User message"},
    ]
    params = {"type": "object", "properties": {"arg": {"type": "string", "description": "Arg description"}},
              "required": ["arg"]}
    fn = {"name": _probe(_ProbeStr, "tool1", log, "tool_name"), "description": "Tool description",
          "parameters": params}
    return messages, [{"name": "tool", "type": "function", "function": fn}]


def detect_caps(tmpl: "ChatTemplate") -> dict[str, bool]:
    """What the template does with typed content, system messages, tools and tool calls."""
    caps = dict(supports_string_content=True, supports_typed_content=False, supports_system_role=True,
                supports_tools=True, supports_tool_calls=True, supports_object_arguments=False,
                supports_parallel_tool_calls=True)
    log: set = set()
    ok, _ = _probe_render(tmpl, [{"role": "user", "content": _probe(_ProbeStr, "content", log, "c")}], [])
    caps["supports_typed_content"] = "c:array" in log  # content indexed/iterated like a parts list
    caps["supports_string_content"] = ok

    log = set()
    sys_msg = {"role": "system", "content": _probe(_ProbeStr, "System message", log, "sys")}
    _probe_render(tmpl, [sys_msg, {"role": "user", "content": "User message"}], [])
    caps["supports_system_role"] = "sys" in log

    log = set()
    ok, _ = _probe_render(tmpl, *_tool_probe(log, lambda i: _probe(_ProbeDict, {"arg": "value"}, log, "args")))
    if ok:
        caps["supports_tools"] = "tool_name" in log
        caps["supports_tool_calls"] = "calls" in log
        caps["supports_object_arguments"] = "calls" in log and "args" in log
    if not caps["supports_object_arguments"]:
        log = set()
        ok, _ = _probe_render(tmpl, *_tool_probe(log, lambda i: '{"arg": "value"}'))
        if not ok:
            caps["supports_tools"] = caps["supports_tool_calls"] = False
        else:
            caps["supports_tools"] = "tool_name" in log
            caps["supports_tool_calls"] = "calls" in log

    log = set()
    args = (lambda i: {"arg": "value"}) if caps["supports_object_arguments"] else (lambda i: '{"arg": "value"}')
    ok, _ = _probe_render(tmpl, *_tool_probe(log, args, n_calls=2))
    caps["supports_parallel_tool_calls"] = ok and "fn1" in log
    return caps


def _dump(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=indent, separators=None if indent else (",", ":"))


def normalize_tools(tools: list[dict] | None) -> list[dict] | None:
    """OpenAI tools -> the {type, function: {name, description, parameters}} llama.cpp passes."""
    if not tools:
        return None

    def fail(why: str) -> TemplateError:
        return TemplateError(f"Failed to parse tools: {why}; tools = {_dump(tools, 2)}")

    if not isinstance(tools, list):
        raise fail(f"Expected 'tools' to be an array, got {_dump(tools)}")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or "type" not in tool:
            raise fail(f"Missing tool type: {_dump(tool)}")
        if tool["type"] != "function":
            raise fail(f"Unsupported tool type: {_dump(tool)}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise fail(f"Missing tool function: {_dump(tool)}")
        if not isinstance(fn.get("name"), str):
            raise fail(f"Missing tool name: {_dump(tool)}")
        desc, params = fn.get("description"), fn.get("parameters")
        out.append({"type": "function", "function": {
            "name": fn["name"], "description": desc if desc is not None else "",
            "parameters": params if params is not None else {}}})
    return out


def _content(content: Any, mode: str) -> Any:
    """Content as the template gets it. mode: 'string' (text parts joined by newlines), 'typed'
    (always a list of parts) or 'both' (strings stay strings, parts stay parts), per the caps."""
    if content is None or content == "" or content == []:
        return [{"type": "text", "text": ""}] if mode == "typed" else ""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if mode == "typed" else content
    if not isinstance(content, list):
        raise TemplateError("Expected 'content' to be a string or an array")
    texts = []
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise TemplateError(f"Missing content part type: {_dump(part)}")
        if part["type"] != "text":
            continue  # the API rejects media parts before this; llama.cpp skips unknown parts here
        if not isinstance(part.get("text"), str):
            raise TemplateError(f"Content part text must be a string: {_dump(part)}")
        texts.append(part["text"])
    if mode != "string":
        return [{"type": "text", "text": t} for t in texts]
    joined = ""
    for t in texts:  # llama.cpp adds the separator only once text is non-empty
        joined = joined + "\n" + t if joined else t
    return joined


def _tool_call(tc: Any, object_args: bool) -> dict:
    if not isinstance(tc, dict) or "type" not in tc:
        raise TemplateError(f"Missing tool call type: {_dump(tc)}")
    fn = tc.get("function")
    if tc["type"] != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise TemplateError(f"Tool call needs type 'function' and a function name: {_dump(tc)}")
    if "arguments" not in fn:
        raise TemplateError(f"Missing tool call arguments: {_dump(tc)}")
    args = fn["arguments"]
    args = args if isinstance(args, str) else _dump(args)  # llama.cpp keeps arguments as a JSON string...
    if object_args:  # ...and parses it back for templates that read arguments as an object
        try:
            args = json.loads(args)
        except ValueError as e:
            raise TemplateError(f"Failed to parse tool call arguments as JSON: {e}") from e
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if tc.get("id"):
        out["id"] = tc["id"]
    return out


def normalize_messages(tmpl: "ChatTemplate", messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the dicts llama.cpp hands to the template (common_chat_msg::to_json_oaicompat)."""
    if not isinstance(messages, list):
        raise TemplateError("Expected 'messages' to be an array")
    typed, string = tmpl.supports_typed_content, tmpl.supports_string_content
    mode = "string" if string and not typed else "typed" if typed and not string else "both"
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TemplateError(f"Expected 'message' to be an object, got {_dump(m)}")
        if not isinstance(m.get("role"), str):
            raise TemplateError(f"Missing 'role' in message: {_dump(m)}")
        role = m["role"]
        if role == "developer" and "<|channel|>" not in tmpl.source:
            role = "system"
        msg: dict[str, Any] = {"role": role, "content": _content(m.get("content"), mode)}
        for key in ("reasoning_content", "name", "tool_call_id"):
            if m.get(key):
                msg[key] = m[key]
        if m.get("tool_calls"):
            msg["tool_calls"] = [_tool_call(tc, tmpl.supports_object_arguments) for tc in m["tool_calls"]]
        out.append(msg)
    if not tmpl.supports_system_role and out and out[0]["role"] == "system":
        # the template ignores or rejects a system turn: fold it into the next message (llama.cpp)
        if len(out) == 1:
            out.pop(0)
        elif isinstance(out[0]["content"], str) and isinstance(out[1]["content"], str):
            out[1]["content"] = out[0]["content"] + "\n" + out[1]["content"]
            out.pop(0)
    return out


class ChatTemplate:
    """A compiled chat template plus what it supports. `source=None` means llama-server's ChatML."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", *,
                 add_bos: bool = False, add_eos: bool = False) -> None:
        self.is_fallback = source is None or not source.strip() or source.strip() == "chatml"
        self.source: str = CHATML_SOURCE if self.is_fallback else source  # type: ignore[assignment]
        self.bos_token, self.eos_token = bos_token, eos_token
        # the tokenizer adds BOS/EOS itself: drop the template's copy (llama.cpp does the same)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.tool_use: ChatTemplate | None = None  # GGUF `tokenizer.chat_template.tool_use`
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template could not be compiled: {e}") from e
        caps = detect_caps(self)
        self.supports_string_content: bool = caps["supports_string_content"]
        self.supports_typed_content: bool = caps["supports_typed_content"]
        self.supports_system_role: bool = caps["supports_system_role"]
        self.supports_tools: bool = caps["supports_tools"]
        self.supports_tool_calls: bool = caps["supports_tool_calls"]
        self.supports_object_arguments: bool = caps["supports_object_arguments"]
        self.supports_parallel_tool_calls: bool = caps["supports_parallel_tool_calls"]

    @classmethod
    def from_gguf_metadata(cls, meta: dict, override_path: str | None = None) -> "ChatTemplate":
        """The model's template (or the file at `override_path`, like --chat-template-file), with
        bos/eos token strings looked up in the vocabulary."""
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token(key: str) -> str:
            tid = meta.get(key)
            return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

        spm = meta.get("tokenizer.ggml.model") == "llama"
        kw = dict(bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
                  add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
                  add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
        tool_src = meta.get("tokenizer.chat_template.tool_use") if override_path is None else None
        if override_path is not None:
            try:
                source = Path(override_path).expanduser().read_text(encoding="utf-8")
            except OSError as e:
                raise TemplateError(f"cannot read chat template file {override_path}: {e}") from e
        else:
            source = meta.get("tokenizer.chat_template") or tool_src
        tmpl = cls(source, **kw)
        if tool_src and tool_src != source:
            tmpl.tool_use = cls(tool_src, **kw)
        return tmpl

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **extra: Any) -> str:
        """The prompt for `messages` (OpenAI shape). `extra` are chat_template_kwargs."""
        norm_tools = normalize_tools(tools)
        if norm_tools and self.tool_use is not None:
            return self.tool_use.render(messages, add_generation_prompt, tools, **extra)
        ctx: dict[str, Any] = {"messages": normalize_messages(self, messages), "bos_token": self.bos_token,
                               "eos_token": self.eos_token, "enable_thinking": True}
        if norm_tools:
            ctx["tools"] = norm_tools
        now = datetime.now()
        ctx["datetime"], ctx["date_string"] = now.strftime("%b %d %Y"), now.strftime("%d %b %Y")
        ctx.update(extra)
        ctx["add_generation_prompt"] = bool(add_generation_prompt)
        out = self.render_raw(ctx)
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token):]
        if self.add_eos and self.eos_token and out.endswith(self.eos_token):
            out = out[: -len(self.eos_token)]
        return out

    def render_raw(self, context: dict[str, Any]) -> str:
        """Render with exactly `context` (no normalisation); every failure becomes TemplateError."""
        token = _range_budget.set([MAX_RANGE_STEPS])
        try:
            parts, n = [], 0
            for chunk in self._template.generate(context):
                n += len(chunk)
                _too_big(n, "rendered prompt")
                parts.append(chunk)
            return "".join(parts)
        except TemplateError:
            raise
        except SecurityError as e:
            raise TemplateError(f"chat template violated the sandbox: {e}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template error: {e}") from e
        except RecursionError as e:
            raise TemplateError("chat template recursed too deeply") from e
        except MemoryError as e:
            raise TemplateError("chat template ran out of memory") from e
        except Exception as e:  # a template can raise anything Python can (TypeError, KeyError, ...)
            raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e
        finally:
            _range_budget.reset(token)
