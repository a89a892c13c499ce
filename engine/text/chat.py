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

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SecurityError

from .chat_sandbox import (MAX_OUTPUT_CHARS, RENDER_TIMEOUT_S, RenderTimeout, TemplateError, _too_big,
                           check_deadline, end_render_budget, environment, render_budget, tojson_hook)

__all__ = ["CHATML_SOURCE", "MAX_OUTPUT_CHARS", "ChatTemplate", "RenderTimeout", "TemplateError", "detect_caps",
           "normalize_messages", "normalize_tools"]

# What llama-server renders when a model has no template (llama.cpp CHATML_TEMPLATE_SRC).
CHATML_SOURCE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)


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


PROBE_TIMEOUT_S = 0.5  # per capability probe: a tiny conversation renders in well under 1 ms


def _probe_render(tmpl: "ChatTemplate", messages: list, tools: list) -> tuple[bool, str]:
    ctx = {"messages": messages, "tools": tools, "bos_token": "", "eos_token": "", "add_generation_prompt": True}
    token = tojson_hook.set(_touch_all)
    try:
        return True, tmpl.render_raw(ctx, PROBE_TIMEOUT_S)
    except TemplateError:
        return False, ""
    finally:
        tojson_hook.reset(token)


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
            self._template = environment().from_string(self.source)
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
               template_kwargs: dict[str, Any] | None = None, timeout_s: float = RENDER_TIMEOUT_S) -> str:
        """The prompt for `messages` (OpenAI shape). `template_kwargs` are chat_template_kwargs; the
        render fails with RenderTimeout after `timeout_s` seconds."""
        norm_tools = normalize_tools(tools)
        if norm_tools and self.tool_use is not None:
            return self.tool_use.render(messages, add_generation_prompt, tools, template_kwargs, timeout_s)
        ctx: dict[str, Any] = {"messages": normalize_messages(self, messages), "bos_token": self.bos_token,
                               "eos_token": self.eos_token, "enable_thinking": True}
        if norm_tools:
            ctx["tools"] = norm_tools
        now = datetime.now()
        ctx["datetime"], ctx["date_string"] = now.strftime("%b %d %Y"), now.strftime("%d %b %Y")
        ctx.update(template_kwargs or {})
        ctx["add_generation_prompt"] = bool(add_generation_prompt)
        out = self.render_raw(ctx, timeout_s)
        if self.add_bos and self.bos_token and out.startswith(self.bos_token):
            out = out[len(self.bos_token):]
        if self.add_eos and self.eos_token and out.endswith(self.eos_token):
            out = out[: -len(self.eos_token)]
        return out

    def render_raw(self, context: dict[str, Any], timeout_s: float = RENDER_TIMEOUT_S) -> str:
        """Render with exactly `context` (no normalisation); every failure becomes TemplateError."""
        budget = render_budget(timeout_s)
        try:
            parts, n = [], 0
            for chunk in self._template.generate(context):
                n += len(chunk)
                _too_big(n, "rendered prompt")
                check_deadline()
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
            end_render_budget(budget)
