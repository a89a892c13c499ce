"""Request bodies of the OpenAI endpoints and llama-server's extras, as pydantic v2 models.

Strict types (no "0.5" for a number, no "yes" for a boolean), unknown fields ignored like OpenAI
does. Every declared field is honoured by api/openai.py or api/native.py; parameters we know but
cannot honour are rejected by name (400 with `param`) unless they carry their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import invalid

Num = Annotated[float, Field(allow_inf_nan=False)]
MAX_N = 16
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# Known sampler knobs we do not implement: accepted only at their neutral value (llama.cpp's
# web UI and clients send them by default), otherwise a 400 naming the parameter.
NEUTRAL = {
    "typical_p": 1.0, "mirostat": 0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
    "dynatemp_range": 0.0, "top_n_sigma": -1.0, "tfs_z": 1.0, "suffix": None, "best_of": None,
    "prompt_logprobs": None, "guided_json": None,
    "guided_regex": None, "guided_grammar": None, "guided_choice": None, "functions": None,
    "function_call": None, "audio": None, "modalities": None, "prediction": None,
}
_NEUTRAL_EQUIV = {"suffix": ("",), "modalities": (["text"],)}


def reject_unsupported(data: dict[str, Any], allowed: tuple[str, ...] = ()) -> None:
    """Raises a 400 naming the first known-but-unimplemented parameter set to a non-neutral value."""
    for key, neutral in NEUTRAL.items():
        if key in allowed or key not in data:
            continue
        value = data[key]
        if value == neutral or value in _NEUTRAL_EQUIV.get(key, ()):
            continue
        if isinstance(neutral, float) and isinstance(value, (int, float)) and float(value) == neutral:
            continue
        raise invalid(f"Unsupported parameter '{key}': only {neutral!r} is accepted by this server.", param=key)


def parse_stop(v: Any) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(s == "" for s in items):
        raise ValueError("stop sequences must not be empty")
    return list(items)


def parse_logit_bias(v: Any) -> dict[int, float]:
    """OpenAI's {"token_id": bias} object, or llama-server's [[token_id, bias|false], ...]."""
    if v is None:
        return {}
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v):
        pairs = [(p[0], p[1]) for p in v]
    else:
        raise ValueError("must be an object mapping token ids to biases")
    out: dict[int, float] = {}
    for key, bias in pairs:
        tid: int | None = None
        if isinstance(key, int) and not isinstance(key, bool):
            tid = key
        elif isinstance(key, str) and key.strip().isdigit():
            tid = int(key)
        if tid is None or tid < 0:
            raise ValueError(f"token id {key!r} is not a non-negative integer")
        if bias is False:
            bias = -100.0
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"bias for token {key} must be a number in [-100, 100]")
        out[tid] = float(bias)
    return out


def parse_body(cls: type[BaseModel], data: Any) -> Any:
    """Validates a decoded JSON body: an object, no unimplemented knobs, then the model's fields."""
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    reject_unsupported(data)
    return cls.model_validate(data)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Parameters shared by /v1/chat/completions, /v1/completions (and, renamed, /completion)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: Num | None = Field(None, ge=0.0, le=2.0)
    top_p: Num | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: Num = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Num = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Any = Field(default_factory=dict)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # llama-server / vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: Num | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Num | None = Field(None, gt=0.0, le=10.0)
    repetition_penalty: Num | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    cache_prompt: bool = True  # results never depend on it: the prefix cache is exact
    min_tokens: int = Field(0, ge=0)
    n_predict: int | None = Field(None, ge=-1)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: str | None = None  # llama-server: GBNF (engine/constrained/structured.py)
    json_schema: Any = None  # llama-server: a JSON schema the output must match

    _stop = field_validator("stop", mode="before")(lambda v: parse_stop(v))
    _bias = field_validator("logit_bias", mode="before")(lambda v: parse_logit_bias(v))

    @model_validator(mode="after")
    def _stream_options(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true", param="stream_options")
        return self


class ContentPart(_Body):
    type: str
    text: str | None = None


_MEDIA_PARTS = ("image_url", "input_audio", "file", "image", "input_image")


def _part(i: int, p: Any) -> ContentPart:
    """Checked by hand so the 400 says exactly what is wrong with which part."""
    if not isinstance(p, dict) or not isinstance(p.get("type"), str):
        raise ValueError(f"content[{i}] must be an object with a string 'type'")
    kind = p["type"]
    if kind in _MEDIA_PARTS:
        raise ValueError(f"content[{i}] has type '{kind}', which is not supported: this model takes text only")
    if kind != "text":
        raise ValueError(f"content[{i}] has unknown type '{kind}'")
    if not isinstance(p.get("text"), str):
        raise ValueError(f"content[{i}] is a text part without a string 'text'")
    return ContentPart.model_construct(type="text", text=p["text"])


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; llama.cpp also takes an object


class ToolCall(_Body):
    """An assistant message's earlier call, as the client sends it back in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: str
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> str | list[ContentPart] | None:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or an array of content parts")
        return [_part(i, p) for i, p in enumerate(v)]

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}' (expected one of {', '.join(ROLES)})")
        return v

    @model_validator(mode="after")
    def _content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template sees: string content, optional tool fields."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id", "reasoning_content"):
            value = getattr(self, key)
            if value is not None:
                m[key] = value
        if self.tool_calls is not None:
            m["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in self.tool_calls]
        return m


class ToolFunction(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: ToolFunction


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-server's spelling

    @model_validator(mode="after")
    def _schema(self) -> "ResponseFormat":
        if self.type == "json_schema":
            js = self.json_schema or {}
            if not isinstance(js.get("schema", {}), dict):
                raise ValueError("json_schema.schema must be an object")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # reasoning models (engine/text/reasoning.py): passed to the template / override the server's setting
    reasoning_effort: str | None = None
    reasoning_format: Literal["auto", "none", "deepseek"] | None = None
    reasoning_budget: int | None = Field(None, ge=-1)  # -1: unlimited

    @model_validator(mode="after")
    def _chat_checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true", param="top_logprobs")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required"):
            raise invalid(f"Invalid tool_choice '{self.tool_choice}'", param="tool_choice")
        return self


class CompletionRequest(SamplingFields):
    prompt: Any
    response_format: ResponseFormat | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """Normalise to a list of prompts, each a string or a list of token ids."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                return [list(v)]
            if all(isinstance(s, str) for s in v):
                return list(v)
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in v):
                return [list(p) for p in v]
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of such lists")


class NativeCompletionRequest(_Body):
    """llama-server's POST /completion with its defaults (temperature 0.8, top_k 40, ...)."""

    prompt: Any
    n_predict: int = Field(-1, ge=-1)
    max_tokens: int | None = Field(None, ge=-1)
    temperature: Num = Field(0.8, ge=0.0, le=2.0)
    top_k: int = Field(40, ge=-1)
    top_p: Num = Field(0.95, ge=0.0, le=1.0)
    min_p: Num = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: Num = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: Num = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Num = Field(0.0, ge=-2.0, le=2.0)
    seed: int = -1
    stop: Any = Field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: Any = Field(default_factory=dict)
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    cache_prompt: bool = True
    return_tokens: bool = False
    id_slot: int = -1
    grammar: str | None = None  # GBNF (engine/constrained/structured.py)
    json_schema: Any = None

    _stop = field_validator("stop", mode="before")(lambda v: parse_stop(v))
    _bias = field_validator("logit_bias", mode="before")(lambda v: parse_logit_bias(v))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | int]:
        """A string, a list of token ids, or a mixed list of strings and ids (concatenated)."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            return list(v)
        raise ValueError("must be a string, a list of token ids, or a list of strings and token ids")


class TokenizeRequest(_Body):
    """llama-server's shape (`content`, `add_special`, `with_pieces`) or vLLM's (`prompt` or
    `messages`, `add_special_tokens`, `return_token_strs`); api/tokenizer_api.py tells them apart."""

    content: str | None = None
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM: default True for `prompt`, False for `messages`
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    tokens: list[int]


class ApplyTemplateRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
