"""OpenAI Responses request bodies, validated in their own terms and translated into a chat request.

`ResponsesRequest` checks the top-level fields (strict types, unknown fields ignored as OpenAI
does); `to_chat` turns `instructions` + `input` items + flat function tools + `text.format` into a
ChatCompletionRequest, which api/plans.py plans like any chat request (same template, tool
formats, tool_choice grammars, response_format grammars, limits). What this server cannot honour
is a 400 naming it: non-function tools, stored state (`previous_response_id`, `conversation`,
`item_reference`, `background`), images and files (the models take text only).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .errors import APIError, invalid
from .schemas import ChatCompletionRequest, Num, _Body

_TEXT_PARTS = ("input_text", "output_text", "text")
_MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image_url", "image", "file")
_SYSTEM_ROLES = ("system", "developer")
_ROLES = ("user", "assistant", *_SYSTEM_ROLES)


class Reasoning(_Body):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class TextConfig(_Body):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: Num | None = Field(None, ge=0.0, le=2.0)
    top_p: Num | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    reasoning: Reasoning | None = None
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    user: str | None = None
    seed: int | None = None  # an extension (OpenAI's Responses API has none): reproducible sampling
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None


class InputTokensRequest(ResponsesRequest):
    input: str | list[Any] = ""  # OpenAI's count endpoint takes a request with no input


def check_unsupported(req: ResponsesRequest) -> None:
    """Stored state and the knobs this server cannot honour: a 400 naming each."""
    for key in ("previous_response_id", "conversation"):
        if getattr(req, key) is not None:
            raise APIError(400, f"'{key}' refers to stored state; this server is stateless (store nothing) and "
                           "cannot find it: send the whole conversation in 'input'.", param=key,
                           code="previous_response_not_found")
    if req.background:
        raise invalid("background responses need stored state, which this server does not keep.", "background")
    if req.prompt is not None:
        raise invalid("Stored prompt templates ('prompt') are not supported; send 'instructions' and 'input'.",
                      "prompt")
    if req.max_tool_calls is not None:
        raise invalid("'max_tool_calls' is not supported; use parallel_tool_calls: false for one call.",
                      "max_tool_calls")
    if req.top_logprobs:
        raise invalid("'top_logprobs' is not supported on /v1/responses.", "top_logprobs")
    if req.truncation not in (None, "disabled", "auto"):
        raise invalid(f"Invalid truncation {req.truncation!r} (expected 'auto' or 'disabled').", "truncation")


# ---- input items -> chat messages ----------------------------------------------------------------

def _part_text(p: Any, param: str) -> str:
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise invalid(f"'{param}' must be an object with a string 'type'.", param)
    kind = p["type"]
    if kind in _MEDIA_PARTS:
        raise invalid(f"'{param}' has type '{kind}', which is not supported: this model takes text only.", param)
    if kind == "refusal" and isinstance(p.get("refusal"), str):
        return p["refusal"]
    if kind not in _TEXT_PARTS:
        raise invalid(f"'{param}' has unknown content type '{kind}' (expected input_text or output_text).", param)
    if not isinstance(p.get("text"), str):
        raise invalid(f"'{param}' is a text part without a string 'text'.", param)
    return p["text"]


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or an array of content parts.", param)
    return "".join(_part_text(p, f"{param}[{i}]") for i, p in enumerate(content))


def _str_field(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (key != "arguments" and not value):
        raise invalid(f"'{param}.{key}' must be a non-empty string.", f"{param}.{key}")
    return value


def input_messages(instructions: str | None, items: str | list[Any]) -> list[dict[str, Any]]:
    """Chat messages for `input`: one leading system message (instructions, then every system and
    developer message in order: templates such as Qwen's take only one), then the turns."""
    system = [instructions] if instructions else []
    turns: list[dict[str, Any]] = []
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    calls: dict[str, str] = {}  # call_id -> function name
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"'{param}' must be an object (a message or an item).", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(f"'{param}.role' must be one of {', '.join(_ROLES)}, not {role!r}.", f"{param}.role")
            text = _content(item.get("content"), f"{param}.content")
            if role in _SYSTEM_ROLES:
                system.append(text)
            else:
                turns.append({"role": role, "content": text})
        elif kind == "function_call":
            call_id, name = _str_field(item, "call_id", param), _str_field(item, "name", param)
            args = _str_field(item, "arguments", param)
            calls[call_id] = name
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant":  # calls after a text turn: one message
                last.setdefault("tool_calls", []).append(call)
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _str_field(item, "call_id", param)
            if call_id not in calls:
                raise invalid(f"No function_call with call_id {call_id!r} precedes '{param}': this server "
                              "is stateless, so send the function_call item in 'input' too.", f"{param}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{param}.output")
            turns.append({"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": text})
        elif kind == "reasoning":
            continue  # the model's earlier reasoning: not replayed (the templates drop it too)
        elif kind == "item_reference":
            raise APIError(400, f"'{param}' is an item_reference; this server stores no items: send the item "
                           "itself.", param=param, code="previous_response_not_found")
        else:
            raise invalid(f"'{param}' has type {kind!r}, which is not supported (expected message, "
                          "function_call, function_call_output or reasoning).", f"{param}.type")
    if not turns and not system:
        raise invalid("'input' is empty.", "input")
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + turns


# ---- tools, tool_choice, text.format -------------------------------------------------------------

def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    other = [t.get("type") if isinstance(t, dict) else type(t).__name__ for t in tools
             if not (isinstance(t, dict) and t.get("type") == "function")]
    if other:
        names = ", ".join(sorted({str(k) for k in other}))
        raise APIError(400, f"Unsupported tool type(s): {names}. This server runs function tools only "
                       "({\"type\": \"function\", \"name\", \"parameters\"}).", param="tools",
                       code="unsupported_tool_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t.get("name"), str):
            raise invalid(f"'tools[{i}].name' must be a string.", f"tools[{i}].name")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise invalid("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}"
                  f"; {choice.get('type')!r} is not supported.", "tool_choice")


def chat_response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise invalid("text.format.schema must be a JSON schema object.", "text.format.schema")
        if not isinstance(fmt.get("name"), str):
            raise invalid("text.format.name must be a string.", "text.format.name")
        return {"type": "json_schema", "json_schema": {"name": fmt["name"], "schema": schema,
                                                       "strict": bool(fmt.get("strict"))}}
    raise invalid(f"Unsupported text.format type {kind!r} (expected text, json_object or json_schema).",
                  "text.format.type")


def to_chat(req: ResponsesRequest, count_only: bool = False) -> ChatCompletionRequest:
    """The chat request this Responses request runs as (validated by the chat schema too)."""
    check_unsupported(req)
    body: dict[str, Any] = {
        "model": req.model, "messages": input_messages(req.instructions, req.input),
        "tools": chat_tools(req.tools), "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls, "response_format": chat_response_format(req.text),
        "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "user": req.user,
    }
    if not count_only:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["chat_template_kwargs"] = {"reasoning_effort": req.reasoning.effort}  # gpt-oss style templates
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


_PARAMS = {"response_format": "text.format", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "chat_template_kwargs": "reasoning"}


def rename_param(e: APIError) -> APIError:
    """A chat-side error's param in the Responses request's terms."""
    p = e.param or ""
    if p.startswith("messages"):
        e.param = "input"
    elif p.split(".")[0] in _PARAMS:
        e.param = _PARAMS[p.split(".")[0]]
    return e
