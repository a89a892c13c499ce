"""API pieces that need no model: request schemas, error bodies, auth, metrics, settings, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.auth import APIKeyMiddleware, key_matches, load_keys, presented_key
from api.cli_serve import add_serve_args, settings_from_args
from api.errors import APIError, from_validation_error
from api.metrics import Metrics
from api.schemas import ChatCompletionRequest, CompletionRequest, NativeCompletionRequest, parse_body
from api.server import ServerSettings, SettingsError, load_settings

MSG = [{"role": "user", "content": "hi"}]


def _err(cls: type, body: object) -> APIError:
    try:
        parse_body(cls, body)
    except APIError as e:
        return e
    except ValidationError as e:
        return from_validation_error(e)
    raise AssertionError(f"{body!r} was accepted")


@pytest.mark.parametrize("body,param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": MSG, "temperature": "0.5"}, "temperature"),
    ({"messages": MSG, "temperature": 3}, "temperature"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "stop": ["a", 1]}, "stop"),
    ({"messages": MSG, "stop": [""]}, "stop"),
    ({"messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"5": 500}}, "logit_bias"),
    ({"messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": MSG, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": MSG, "mirostat": 2}, "mirostat"),
    ({"messages": MSG, "typical_p": 0.5}, "typical_p"),
    ({"messages": MSG, "presence_penalty": float("nan")}, "presence_penalty"),
])
def test_chat_schema_rejects_with_param(body: dict, param: str) -> None:
    err = _err(ChatCompletionRequest, body)
    assert err.status == 400 and err.param == param, (err.param, err.message)
    assert set(err.body()["error"]) >= {"message", "type", "param", "code"}


def test_chat_schema_accepts_and_normalises() -> None:
    req = parse_body(ChatCompletionRequest, {
        "messages": [{"role": "system", "content": "s"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "stop": "x", "logit_bias": {"7": -100}, "unknown_field": {"deep": [1]}, "user": "u", "typical_p": 1,
        "top_k": 40, "min_p": 0.1, "repeat_penalty": 1.1, "ignore_eos": True, "cache_prompt": False})
    assert req.stop == ["x"] and req.logit_bias == {7: -100.0}
    assert req.messages[1].to_template() == {"role": "user", "content": "a\nb"}
    # llama-server's list form of logit_bias, with `false` meaning "never"
    req = parse_body(ChatCompletionRequest, {"messages": MSG, "logit_bias": [[3, 1.5], [4, False]]})
    assert req.logit_bias == {3: 1.5, 4: -100.0}
    assert parse_body(ChatCompletionRequest, {"messages": MSG, "stop": None}).stop == []


def test_body_must_be_object() -> None:
    for body in ([1, 2], "text", 3, None):
        assert _err(ChatCompletionRequest, body).status == 400


@pytest.mark.parametrize("prompt,expect", [
    ("abc", ["abc"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt: object, expect: list) -> None:
    assert parse_body(CompletionRequest, {"prompt": prompt}).prompt == expect


@pytest.mark.parametrize("prompt", [{"x": 1}, [], [1, "a"], [[]], [True], None, [[1], "a"]])
def test_completion_prompt_rejects(prompt: object) -> None:
    assert _err(CompletionRequest, {"prompt": prompt}).param == "prompt"


def test_native_defaults_follow_llama_server() -> None:
    r = parse_body(NativeCompletionRequest, {"prompt": "x"})
    assert (r.temperature, r.top_k, r.top_p, r.min_p, r.n_predict, r.seed) == (0.8, 40, 0.95, 0.05, -1, -1)
    assert parse_body(NativeCompletionRequest, {"prompt": ["a", 5, "b"]}).prompt == ["a", 5, "b"]
    assert _err(NativeCompletionRequest, {"prompt": "x", "n_predict": "four"}).param == "n_predict"
    assert _err(NativeCompletionRequest, {"n_predict": 4}).param == "prompt"


def test_error_body_shape_and_extra() -> None:
    e = APIError(400, "too long", param="messages", code="context_length_exceeded", extra={"n_ctx": 8})
    assert e.body() == {"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",
                                  "code": "context_length_exceeded", "n_ctx": 8}}
    assert APIError(503, "x").type == "unavailable_error" and APIError(401, "x").type == "authentication_error"


# ---- auth ----------------------------------------------------------------------------------------

def test_key_parsing_and_compare(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nk2\n\n  k3 \n")
    keys = load_keys(["k1", ""], str(f))
    assert keys == ["k1", "k2", "k3"]
    assert presented_key({b"authorization": b"Bearer k2"}) == b"k2"
    assert presented_key({b"authorization": b"bearer  k2 "}) == b"k2"
    assert presented_key({b"x-api-key": b"k3"}) == b"k3"
    assert presented_key({}) is None
    assert key_matches(b"k3", keys) and not key_matches(b"k4", keys) and not key_matches(None, keys)
    assert not key_matches(b"k", keys) and not key_matches(b"k1k1", keys)
    # header values are bytes: a UTF-8 key arrives as its UTF-8 bytes and must match
    assert key_matches(presented_key({b"authorization": "Bearer clé-ключ".encode()}), ["clé-ключ"])


def test_auth_middleware_guards_all_but_health() -> None:
    async def ok(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/health", ok), Route("/v1/models", ok)])
    client = TestClient(APIKeyMiddleware(app, ["sekret"]))
    assert client.get("/health").status_code == 200
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/v1/models", headers={"X-Api-Key": "sekret"}).status_code == 200


# ---- metrics -------------------------------------------------------------------------------------

class _Stats:
    num_running, num_waiting, kv_usage, total_blocks, free_blocks = 2, 1, 0.25, 100, 75
    prefix_cache_hit_tokens, num_preemptions, prompt_tokens_total, generation_tokens_total = 32, 0, 90, 12


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_private_registry_and_values() -> None:
    m, other = Metrics(lambda: _Stats()), Metrics()
    m.observe_request(10, 5, "stop", 0.05, 0.3)
    m.observe_request(7, 3, "length", None, 0.2)
    m.observe_itl(0.02, 2)
    text = m.render().decode()
    assert _value(text, "llamatron:prompt_tokens_total") == 17
    assert _value(text, "llamatron:generation_tokens_total") == 8
    assert _value(text, "llamatron:num_requests_running") == 2
    assert _value(text, "llamatron:kv_cache_usage_ratio") == 0.25
    assert _value(text, "llamatron:prefix_cache_hit_tokens_total") == 32
    assert _value(text, "llamatron:time_to_first_token_seconds_count") == 1
    assert _value(text, "llamatron:inter_token_latency_seconds_count") == 2
    assert _value(text, "llamatron:e2e_request_latency_seconds_count") == 2
    assert 'llamatron:requests_total{finish_reason="length"} 1.0' in text
    assert _value(other.render().decode(), "llamatron:prompt_tokens_total") == 0  # registries are separate


# ---- settings and CLI ----------------------------------------------------------------------------

def test_settings_layers(tmp_path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('port = 9000\nalias = "from-file"\napi_key = ["a"]\n')
    s = load_settings(None, env={})
    assert s == ServerSettings()  # configs/server.toml holds exactly the dataclass defaults
    s = load_settings(None, str(cfg), env={"LLAMATRON_ALIAS": "from-env", "LLAMATRON_API_KEY": "x,y"})
    assert (s.port, s.alias, s.api_key) == (9000, "from-env", ["x", "y"])
    s = load_settings({"alias": "from-cli", "port": None}, str(cfg), env={"LLAMATRON_ALIAS": "from-env"})
    assert (s.port, s.alias) == (9000, "from-cli")
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    with pytest.raises(SettingsError):
        load_settings(None, str(bad), env={})
    with pytest.raises(SettingsError):
        load_settings(None, None, env={"LLAMATRON_PORT": "eighty"})
    with pytest.raises(SettingsError):
        load_settings({"device": "tpu"}, env={})


def test_cli_flags() -> None:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["my.gguf", "--port", "9001", "-a", "m", "-c", "1024", "-np", "4", "--api-key", "k1",
                         "--api-key", "k2", "--cors-origin", "*", "--device", "cpu", "--log-format", "json",
                         "--grace-period", "3", "--kv-cache-gib", "0.5", "--max-batched-tokens", "256"])
    s = settings_from_args(args)
    assert (s.model, s.port, s.alias, s.ctx_size, s.parallel) == ("my.gguf", 9001, "m", 1024, 4)
    assert (s.api_key, s.cors_origin, s.device, s.log_format) == (["k1", "k2"], ["*"], "cpu", "json")
    assert (s.grace_period, s.kv_cache_gib, s.max_batched_tokens, s.host) == (3.0, 0.5, 256, "127.0.0.1")
    assert s.model_id() == "m"
    assert settings_from_args(p.parse_args(["-m", "x.gguf"])).model_id() == "x"
    ec = s.engine_config()
    assert (ec.max_model_len, ec.max_num_seqs, ec.device) == (1024, 4, "cpu")


def test_sse_json_has_no_nan() -> None:
    from api.runs import finite, sse_bytes

    assert finite(float("-inf")) == -9999.0
    assert json.loads(sse_bytes({"a": finite(float("nan"))})[6:]) == {"a": -9999.0}


def test_json_log_format(capsys) -> None:
    import logging

    from api.server import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("json", "info")
        logging.getLogger("llamatron.test").info("hello %s", "world")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        rec = json.loads(line)
        assert rec["msg"] == "hello world" and rec["level"] == "INFO" and rec["logger"] == "llamatron.test"
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
