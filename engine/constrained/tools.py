"""Tool calling: the output format a chat template implies, prompts, grammars and parsers.

Formats (`detect_format(template)`):
- hermes   `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5, Hermes);
           small Qwen models also answer with the bare JSON object, or pretty-printed in a
           ```json fence: both count as calls when they name one of the request's tools (a
           made-up name stays text, as llama.cpp's triggers do)
- llama3   `{"name": ..., "parameters": {...}}` as the whole reply (Llama 3.x JSON tool calling)
- mistral  `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`
- generic  templates without tool support: a system message describes the tools and the reply
           is JSON, `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`

`plan_tools(...)` turns an OpenAI request (tools, tool_choice, parallel_tool_calls) into a
`ToolPlan`: the messages and tools to render, the grammar that enforces the choice (required /
named: always a valid call whose arguments match the function's schema; auto: text, or a call
that is enforced from its trigger on), and a parser for the output. Call JSON is written with
", " / ": " separators, as templates render it (`tojson`) and as models were trained.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .grammars import DEFAULT_LIMITS, GrammarLimits, check_schema_shape
from .schema_caps import cap_literals
from .structured import GrammarError, GrammarSpec, close_objects, lark
from .tool_parser import ParserSyntax, ToolCallParser

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SEPS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_WS_RUN = r"[ \t\n]{0,24}"  # pretty-printed JSON: a newline and indentation, but bounded


@dataclass(frozen=True, eq=False)  # singletons: identity equality and hashing
class ToolFormat:
    name: str  # "hermes" | "llama3" | "mistral" | "generic"
    native: bool  # the template renders `tools` itself
    syntax: ParserSyntax
    arg_key: str = "arguments"
    keep_special_tokens: bool = False  # the markers are special tokens: detokenize them


HERMES = ToolFormat("hermes", True, ParserSyntax(markers={"<tool_call>": "object"}, close="</tool_call>",
                                                  bare="objects", fence=True))
LLAMA3 = ToolFormat("llama3", True, ParserSyntax(markers={"<|python_tag|>": "objects"}, bare="objects"),
                    arg_key="parameters")
MISTRAL = ToolFormat("mistral", True, ParserSyntax(markers={"[TOOL_CALLS]": "array"}), keep_special_tokens=True)
GENERIC = ToolFormat("generic", False, ParserSyntax(generic=True))
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, GENERIC)}


def detect_format(template: Any) -> ToolFormat:
    """The tool format for a ChatTemplate (engine/text/chat.py) or a template source string."""
    if isinstance(template, str) or template is None:
        src = template or ""
        supports = bool(re.search(r"\btools\b", src))
    else:
        tmpl = getattr(template, "tool_use", None) or template
        src, supports = tmpl.source, bool(tmpl.supports_tools)
    if not supports:
        return GENERIC
    if "<tool_call>" in src:
        return HERMES
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<|start_header_id|>" in src or "<|python_tag|>" in src:
        return LLAMA3
    return GENERIC  # a tool syntax we do not know: describe the tools ourselves


@dataclass
class ToolPlan:
    format: ToolFormat
    messages: list[dict]  # what to render (generic: tools described in a system message)
    template_tools: list[dict] | None  # pass as `tools=` to ChatTemplate.render
    grammar: GrammarSpec | None  # compile with StructuredOutputs (param "tools"); None: free text
    tools: list[dict] = field(default_factory=list)
    choice: str | dict = "auto"  # tool_choice as checked: "none" | "auto" | "required" | {"name": ...}

    @property
    def parses_calls(self) -> bool:
        return self.grammar is not None

    def new_parser(self) -> ToolCallParser | None:
        """One per choice; None when tool calls are off (tool_choice "none")."""
        if self.grammar is None:
            return None
        names = [] if self.choice == "none" else [f["name"] for f in self.tools]
        return ToolCallParser(self.format.syntax, names)


def plan_tools(fmt: ToolFormat, messages: list[dict], tools: list[dict] | None, tool_choice: Any = None,
               parallel_tool_calls: bool | None = True,
               token_id: Callable[[str], int | None] | None = None,
               limits: GrammarLimits = DEFAULT_LIMITS) -> ToolPlan:
    """Raises GrammarError(param="tools" | "tool_choice") for requests that cannot be enforced.
    `token_id(text)` looks up a single special token (for the Mistral marker); optional."""
    fns = _check_tools(tools, limits)
    choice = _check_choice(tool_choice, fns)
    parallel = parallel_tool_calls is not False
    if not fns:
        msgs = _native_history(fmt, messages) if fmt.native else _generic_history(messages)
        return ToolPlan(fmt, msgs, None, None, fns, choice)
    if choice == "none":  # OpenAI: the tools stay in view, only calls are forbidden
        return _plan_none(fmt, messages, tools, fns, parallel)
    if isinstance(choice, dict):  # named function: exactly that one call
        fns_g, mode, parallel = [f for f in fns if f["name"] == choice["name"]], "required", False
    else:
        fns_g, mode = fns, choice
    grammar = lark(_grammar(fmt, fns_g, mode, parallel, token_id), param="tools")
    if fmt.native:
        msgs = _native_history(fmt, messages)
        return ToolPlan(fmt, msgs, tools, grammar, fns, choice)
    msgs = _generic_history(messages)
    return ToolPlan(fmt, _inject_system(msgs, _generic_prompt(fns, choice, parallel)), None, grammar, fns, choice)


def _native_history(fmt: ToolFormat, messages: list[dict]) -> list[dict]:
    """The history as a template with its own tool support takes it (Mistral's needs call ids mended)."""
    return _mistral_history(messages) if fmt is MISTRAL else list(messages)


def _plan_none(fmt: ToolFormat, messages: list[dict], tools: list[dict] | None, fns: list[dict],
               parallel: bool) -> ToolPlan:
    """tool_choice "none": the prompt of "auto" (same tools, same instructions), no call out.
    Native formats: no parser, so whatever the model writes is content. Generic: the grammar
    allows only the `{"response": ...}` answer the prompt offers, which the parser unwraps."""
    if fmt.native:
        msgs = _native_history(fmt, messages)
        return ToolPlan(fmt, msgs, tools, None, fns, "none")
    msgs = _inject_system(_generic_history(messages), _generic_prompt(fns, "auto", parallel))
    g = '%llguidance {}\nstart: "{\\"response\\": " reply "}"\nreply: %json {"type": "string"}\n'
    return ToolPlan(fmt, msgs, None, lark(g, param="tools"), fns, "none")


def _check_tools(tools: Any, limits: GrammarLimits) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise GrammarError("tools must be an array", "tools")
    if len(tools) > limits.max_tools:
        raise GrammarError(f"at most {limits.max_tools} tools may be given", "tools")
    out, seen = [], set()
    for t in tools:
        if hasattr(t, "model_dump"):
            t = t.model_dump(exclude_none=True)
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise GrammarError("each tool must be {\"type\": \"function\", \"function\": {...}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise GrammarError(f"invalid function name {name!r} (letters, digits, _ . -; at most 64)", "tools")
        if name in seen:
            raise GrammarError(f"duplicate function name {name!r}", "tools")
        seen.add(name)
        params = fn.get("parameters")
        params = dict(params) if isinstance(params, dict) else {} if params is None else params
        if not isinstance(params, dict):
            raise GrammarError(f"parameters of {name!r} must be a JSON schema object", "tools")
        params.setdefault("type", "object")  # arguments are always a JSON object
        check_schema_shape(params, "tools", limits)
        _check_schema(params, name)
        out.append({"name": name, "description": fn.get("description") or "", "parameters": params})
    return out


def _check_schema(schema: dict, name: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise GrammarError(f"invalid parameters schema for {name!r}: {e.message}", "tools") from None


def _check_choice(choice: Any, fns: list[dict]) -> str | dict:
    if hasattr(choice, "model_dump"):
        choice = choice.model_dump(exclude_none=True)
    if choice is None:
        return "auto" if fns else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise GrammarError(f"invalid tool_choice {choice!r}", "tool_choice")
        if choice == "required" and not fns:
            raise GrammarError("tool_choice 'required' needs tools", "tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
        raise GrammarError("tool_choice must be none, auto, required or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in {f["name"] for f in fns}:
        raise GrammarError(f"tool_choice names unknown function {name!r}", "tool_choice")
    return {"name": name}


# ---- grammars ----------------------------------------------------------------------------------
def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _call_rules(fns: list[dict], arg_key: str, flexible: bool = False) -> str:
    """fn: one alternative per tool; the wrapper is literal text, arguments a %json schema (so
    `$ref`s inside the parameters resolve against the parameters, as the client wrote them).
    `flexible` adds `fenced`: one call in a ```json fence, pretty-printed. Its head, from the fence
    to the arguments key, is a single lexeme so that it outlives the free-text lexeme it shares a
    prefix with (a lexeme boundary inside that prefix would be decided for the text)."""
    alts, rules = [], []
    for i, f in enumerate(fns):
        params = cap_literals(close_objects(f["parameters"]))  # arguments that end, as for response_format
        head = _lit(f'{{"name": {_lit(f["name"])}, "{arg_key}": ')
        rules.append(f'fn_{i}: {head} args_{i} "}}"')
        rules.append(f"args_{i}: %json {json.dumps({**params, 'x-guidance': _SEPS})}")
        alts.append(f"fn_{i}")
        if flexible:  # head (fence through the arguments key) as one lexeme: see _grammar
            ws = _WS_RUN
            head_re = (rf'/```(json)?{ws}\{{{ws}"name"{ws}:{ws}"' + re.escape(f["name"])
                       + rf'"{ws},{ws}"{arg_key}"{ws}:{ws}/')
            rules.append(f"fx_{i}: {head_re} argsx_{i} /{ws}\\}}{ws}```/")
            pretty = {"whitespace_flexible": True, "whitespace_pattern": _WS_RUN}
            rules.append(f"argsx_{i}: %json {json.dumps({**params, 'x-guidance': pretty})}")
    out = "fn: " + " | ".join(alts) + "\n" + "\n".join(rules) + "\n"
    if flexible:
        out += "fenced: " + " | ".join(f"fx_{i}" for i in range(len(fns))) + "\n"
    return out


def _many(item: str, sep: str, parallel: bool) -> str:
    return f"{item} ({_lit(sep)} {item})*" if parallel else item


def _not_call(fns: list[dict], fence: bool) -> str:
    """Text that does not open a bare (or ```json-fenced) call of one of these tools: such text
    is free, while `{"name": "<a tool>"` commits to a call that the grammar then enforces (an
    unknown name, as small models invent, stays text)."""
    names = "|".join(re.escape(f["name"]) for f in fns)
    fence_re = r"(```(json)?\s*)?" if fence else ""
    return rf'/(.|\n)*/ & ~/\s*{fence_re}\{{\s*"name"\s*:\s*"({names})"(?s:.*)/'


def _grammar(fmt: ToolFormat, fns: list[dict], mode: str, parallel: bool,
             token_id: Callable[[str], int | None] | None) -> str:
    g = "%llguidance {}\n"
    flexible = False
    if fmt.name == "hermes":
        g += 'body: "\\n" fn "\\n</tool_call>"\n'
        if mode == "required":
            g += f"start: {_many('call', chr(10), parallel)}\ncall: \"<tool_call>\" body\n"
        else:  # text; a tagged call from the trigger on; or the bare / fenced JSON small models write
            flexible = True
            more = ' ("\\n<tool_call>" body)*' if parallel else ""
            g += (f"start: TEXT | bare | fenced | tagged\nbare: {_many('fn', chr(10), parallel)}\n"
                  f'tagged: hd body{more}\nhd[lazy]: TEXT0 "<tool_call>"\nTEXT0: {_not_call(fns, True)}\n'
                  f"TEXT: {_not_call(fns, True)} & ~/(?s:.*)<tool_call>(?s:.*)/\n")
    elif fmt.name == "llama3":
        calls = _many("fn", "\n", parallel)
        g += f"start: {calls}\n" if mode == "required" else f"start: TEXT | {calls}\nTEXT: {_not_call(fns, False)}\n"
    elif fmt.name == "mistral":
        tid = token_id("[TOOL_CALLS]") if token_id else None
        marker = f"<[{tid}]>" if tid is not None else _lit("[TOOL_CALLS]")
        arr = f'"[" {_many("fn", ", ", parallel)} "]"'
        if mode == "required":
            g += f"start: {marker} {arr}\n"
        elif tid is not None:  # a special token never occurs in TEXT: no ambiguity
            g += f"start: TEXT? ({marker} {arr})?\nTEXT: /(.|\\n)+/\n"
        else:
            g += (f"start: TEXT | hd {arr}\nhd[lazy]: /(.|\\n)*/ {marker}\n"
                  "TEXT: /(.|\\n)*/ & ~/(?s:.*)\\[TOOL_CALLS\\](?s:.*)/\n")
    else:
        calls = f'"{{\\"tool_calls\\": [" {_many("fn", ", ", parallel)} "]}}"'
        if mode == "required":
            g += f"start: {calls}\n"
        else:
            g += f'start: {calls} | "{{\\"response\\": " reply "}}"\nreply: %json {{"type": "string"}}\n'
    return g + _call_rules(fns, fmt.arg_key, flexible)


# ---- generic format: prompt and history --------------------------------------------------------
def _generic_prompt(fns: list[dict], choice: str | dict, parallel: bool) -> str:
    lines = "\n".join(json.dumps(f, ensure_ascii=False) for f in fns)
    call = '{"name": <function name>, "arguments": <arguments as a JSON object>}'
    many = "one or more calls" if parallel else "exactly one call"
    text = (f"You can call the following functions:\n{lines}\n\n"
            f'To call functions, reply with the JSON object {{"tool_calls": [{call}]}} ({many} in the list).')
    if isinstance(choice, dict):
        return text + f' You must call the function "{choice["name"]}" now.'
    if choice == "required":
        return text + " You must call at least one function now."
    return text + ' To answer the user directly instead, reply with {"response": "<your answer>"}.'


def _inject_system(messages: list[dict], prompt: str) -> list[dict]:
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
        return [first] + messages[1:]
    return [{"role": "system", "content": prompt}] + messages


def _generic_history(messages: list[dict]) -> list[dict]:
    """Assistant tool calls become the JSON the model is asked to write; tool results become a
    user turn (templates without tool support rarely know a `tool` role)."""
    out: list[dict] = []
    names: dict[str, str] = {}
    for m in messages:
        m = m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else m
        role = m.get("role") if isinstance(m, dict) else None
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc.get("function", {}) if isinstance(tc, dict) else {}
                names[str(tc.get("id"))] = fn.get("name", "")
                args = fn.get("arguments", "{}")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    pass
                calls.append({"name": fn.get("name", ""), "arguments": args})
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif role == "tool":
            result = {"tool_response": {"name": m.get("name") or names.get(str(m.get("tool_call_id")), ""),
                                        "content": _text(m.get("content"))}}
            text = json.dumps(result, ensure_ascii=False)
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _mistral_history(messages: list[dict]) -> list[dict]:
    """Mistral templates require 9-character alphanumeric call ids: map ours consistently."""
    def short(call_id: Any) -> str:
        return hashlib.sha1(str(call_id).encode()).hexdigest()[:9]

    out = []
    for m in messages:
        m = m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**tc, "id": short(tc.get("id"))} for tc in m["tool_calls"]]
        if m.get("role") == "tool" and m.get("tool_call_id"):
            m["tool_call_id"] = short(m["tool_call_id"])
        out.append(m)
    return out


def special_token_lookup(tokenizer: Any) -> Callable[[str], int | None]:
    """`token_id` for plan_tools: the id of `text` when it is one special token of `tokenizer`."""
    def lookup(text: str) -> int | None:
        ids = tokenizer.encode(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 and tokenizer.is_special(ids[0]) else None
    return lookup
