"""Anthropic Messages request bodies (/v1/messages, /v1/messages/count_tokens) and their translation
into the chat request the rest of the server already knows (api/schemas.py ChatCompletionRequest).

Strict types as elsewhere; unknown fields are ignored (Anthropic adds fields often, and clients
such as Claude Code send `cache_control`, `context_management`, ... that change nothing here).
What we cannot honour is a 400 naming it: image and document blocks, server tools, a final
assistant message (prefill).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import invalid
from .schemas import MAX_STOP, ChatCompletionRequest, Num

_UNSUPPORTED_BLOCKS = ("image", "document", "search_result", "container_upload")
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")  # earlier reasoning sent back: nothing to render


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _block_error(where: str, kind: str) -> ValueError:
    if kind in _UNSUPPORTED_BLOCKS:
        return ValueError(f"{where} has type '{kind}', which is not supported: this model takes text only")
    return ValueError(f"{where} has unknown or unsupported type '{kind}'")


def _text_of(where: str, blocks: Any, allowed: tuple[str, ...] = ("text",)) -> str:
    """A string, or text blocks joined by newlines (tool_result content, system)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ValueError(f"{where} must be a string or an array of text blocks")
    parts = []
    for i, b in enumerate(blocks):
        kind = b.get("type") if isinstance(b, dict) else None
        if not isinstance(kind, str):
            raise ValueError(f"{where}[{i}] must be an object with a string 'type'")
        if kind not in allowed:
            raise _block_error(f"{where}[{i}]", kind)
        if not isinstance(b.get("text"), str):
            raise ValueError(f"{where}[{i}] is a text block without a string 'text'")
        parts.append(b["text"])
    return "\n".join(parts)


def _check_block(i: int, b: Any, role: str) -> dict[str, Any]:
    """Checked by hand so the 400 says exactly what is wrong with which block."""
    where = f"content[{i}]"
    kind = b.get("type") if isinstance(b, dict) else None
    if not isinstance(kind, str):
        raise ValueError(f"{where} must be an object with a string 'type'")
    if kind == "text":
        if not isinstance(b.get("text"), str):
            raise ValueError(f"{where} is a text block without a string 'text'")
        return {"type": "text", "text": b["text"]}
    if kind in _DROPPED_BLOCKS and role == "assistant":
        return {"type": kind}
    if kind == "tool_use" and role == "assistant":
        if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not b["name"]:
            raise ValueError(f"{where} is a tool_use block without a string 'id' and 'name'")
        if not isinstance(b.get("input"), dict):
            raise ValueError(f"{where}.input must be an object")
        return {"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]}
    if kind == "tool_result" and role == "user":
        if not isinstance(b.get("tool_use_id"), str):
            raise ValueError(f"{where} is a tool_result block without a string 'tool_use_id'")
        is_error = b.get("is_error", False)
        if not isinstance(is_error, bool):
            raise ValueError(f"{where}.is_error must be a boolean")
        content = b.get("content", "")
        text = _text_of(f"{where}.content", content if content is not None else "")
        return {"type": "tool_result", "tool_use_id": b["tool_use_id"], "text": text, "is_error": is_error}
    if kind in ("tool_use", "tool_result", *_DROPPED_BLOCKS):
        raise ValueError(f"{where} has type '{kind}', which is not allowed in a '{role}' message")
    raise _block_error(where, kind)


class Message(_Body):
    role: Literal["user", "assistant"]
    content: Any

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, v: Any, info: Any) -> list[dict[str, Any]]:
        role = info.data.get("role", "user")
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if not isinstance(v, list):
            raise ValueError("content must be a string or an array of content blocks")
        return [_check_block(i, b, role) for i, b in enumerate(v)]


class Tool(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None

    @field_validator("type")
    @classmethod
    def _custom(cls, v: str | None) -> str | None:
        if v not in (None, "custom"):
            raise ValueError(f"tool type '{v}' is a server tool, which this server does not run "
                             "(only client tools with an input_schema are supported)")
        return v

    @field_validator("input_schema")
    @classmethod
    def _object(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":
            raise ValueError("input_schema must have type 'object'")
        return v


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class OutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    effort: str | None = None  # accepted: no knob for it on these models
    format: OutputFormat | None = None


class Metadata(_Body):
    user_id: str | None = None


class CountTokensRequest(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: Any = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system(cls, v: Any) -> str | None:
        return None if v is None else _text_of("system", v)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP)
    temperature: Num | None = Field(None, ge=0.0, le=1.0)
    top_p: Num | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    service_tier: str | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v: list[str] | None) -> list[str] | None:
        if v and any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v


# ---- translation ---------------------------------------------------------------------------------

def _messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic turns -> chat messages: tool_use blocks become the assistant's tool_calls, each
    tool_result a `tool` message (in order, before the user's text), the system prompt a leading
    system message."""
    out: list[dict[str, Any]] = [{"role": "system", "content": req.system}] if req.system else []
    if req.messages[-1].role == "assistant":
        raise invalid("A final assistant message (prefill) is not supported; end with a user message.",
                      "messages")
    for i, m in enumerate(req.messages):
        if not m.content:
            raise invalid(f"messages[{i}].content must not be empty", f"messages[{i}].content")
        if m.role == "assistant":
            text = "".join(b["text"] for b in m.content if b["type"] == "text")
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"], "arguments": _json(b["input"])}}
                     for b in m.content if b["type"] == "tool_use"]
            msg: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        texts: list[str] = []
        for b in m.content:
            if b["type"] == "tool_result":
                if texts:
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                content = f"Error: {b['text']}" if b["is_error"] else b["text"]
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": content})
            else:
                texts.append(b["text"])
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        raise invalid("A tool_use input is nested too deeply.", "messages") from None


def _tool_choice(req: CountTokensRequest) -> tuple[Any, bool | None]:
    tc = req.tool_choice
    if tc is None:
        return None, None
    parallel = None if tc.disable_parallel_tool_use is None else not tc.disable_parallel_tool_use
    if tc.type == "tool":
        if not tc.name:
            raise invalid("tool_choice of type 'tool' needs a 'name'", "tool_choice")
        return {"type": "function", "function": {"name": tc.name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[tc.type], parallel


def to_chat(req: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that generates this Anthropic request's answer."""
    choice, parallel = _tool_choice(req)
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req)}
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in req.tools]
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    if isinstance(req, MessagesRequest):
        body.update(max_tokens=req.max_tokens, stop=req.stop_sequences or [], temperature=req.temperature,
                    top_p=req.top_p, top_k=req.top_k, stream=req.stream)
        fmt = req.output_config.format if req.output_config else None
        if fmt is not None:  # structured output: enforced by grammar like chat's response_format
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    return ChatCompletionRequest.model_validate(body)
