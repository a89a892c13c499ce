"""Bad input never gets a 5xx: llama-server's error transcripts (errors.json), a hypothesis fuzz of
malformed bodies at every endpoint, auth/CORS, body limits, loading and overload answers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_fixture import api_server, loaded_model, start_server  # noqa: F401

DATA = Path(__file__).parent / "data" / "smollm2"
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def assert_error_body(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err) and isinstance(err["message"], str)
    return err


JSON_CT = {"content-type": "application/json"}


def send(client: httpx.Client, rec: dict[str, Any]) -> httpx.Response:
    body = rec["request_body"]
    content = body if isinstance(body, str) else (None if body is None else json.dumps(body))
    return client.request(rec["method"], rec["path"], content=content, headers=rec.get("request_headers") or {})


def test_llama_server_error_cases_are_4xx(api_server) -> None:  # noqa: F811
    records = json.loads((DATA / "errors.json").read_text())["records"]
    with api_server.client() as c:
        for rec in records:
            if rec["path"] == "/":  # recorded from a llama-server without its web UI; ours serves its chat page
                continue
            r = send(c, rec)
            assert r.status_code < 500, (rec["name"], r.status_code, r.text)
            if rec["status"] >= 400:  # llama-server called it a mistake (sometimes with a 500): so do we
                assert 400 <= r.status_code < 500, (rec["name"], r.status_code, r.text)
            if r.status_code >= 400:
                assert_error_body(r)
        # the server still answers, on the same keep-alive connection
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/v1/chat/completions", json=CHAT_OK).status_code == 200


def test_specific_statuses(api_server) -> None:  # noqa: F811
    with api_server.client() as c:
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST" and assert_error_body(r)
        r = c.post("/health")
        assert r.status_code == 405 and "GET" in r.headers["allow"]
        r = c.get("/nope")
        assert r.status_code == 404 and assert_error_body(r)["type"] == "not_found_error"
        err = assert_error_body(c.post("/v1/chat/completions", json={**CHAT_OK, "temperature": "hot"}))
        assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
        err = assert_error_body(c.post("/completion", json={"prompt": "hello " * 2100, "n_predict": 4}))
        assert err["code"] == "context_length_exceeded" and err["n_ctx"] == 2048
        bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
        r = c.post("/v1/chat/completions", json={**CHAT_OK, "response_format": bad_schema})
        assert r.status_code == 400 and assert_error_body(r)["param"] == "response_format"
        r = c.post("/detokenize", json={"tokens": [49152]})
        assert r.status_code == 400 and assert_error_body(r)["param"] == "tokens"
        r = c.post("/v1/chat/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", content="[" * 100000, headers=JSON_CT)  # deep nesting
        assert r.status_code == 400
        r = c.post("/v1/chat/completions", content='{"messages": NaN}', headers=JSON_CT)
        assert r.status_code == 400


def test_native_endpoints_match_llama_server(api_server) -> None:  # noqa: F811
    tok = json.loads((DATA / "tokenize.json").read_text())["records"]
    tmpl = json.loads((DATA / "templates.json").read_text())["conversations"]
    with api_server.client() as c:
        for rec in tok:
            r = c.post("/tokenize", json=rec["request"])
            assert r.status_code == 200 and r.json() == rec["response"], rec["text"]
        for conv in tmpl:
            r = c.post("/apply-template", json=conv["request"])
            if conv["status"] == 200 and r.status_code == 200:
                assert r.json() == conv["response"], conv["name"]
            assert r.status_code < 500, conv["name"]
        ids = c.post("/tokenize", json={"content": "Hello, world!"}).json()["tokens"]
        # llama-server reads `content`, vLLM `prompt` (api/tokenizer_api.py)
        text = "Hello, world!"
        assert c.post("/detokenize", json={"tokens": ids}).json() == {"content": text, "prompt": text}
        props = c.get("/props").json()
        assert props["default_generation_settings"]["n_ctx"] == 2048 and props["total_slots"] == 8
        assert props["model_alias"] == "smollm2" and props["eos_token"] == "<|im_end|>"
        assert len(c.get("/slots").json()) == 8


def test_native_completion_shapes(api_server) -> None:  # noqa: F811
    with api_server.client() as c:
        body = {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0, "n_probs": 2}
        r = c.post("/completion", json={**body, "return_tokens": True}).json()
        assert r["stop"] is True and r["tokens_predicted"] == 3 and r["tokens_evaluated"] == 5
        assert r["stop_type"] == "limit" and len(r["tokens"]) == 3 and len(r["completion_probabilities"]) == 3
        assert all(len(p["top_logprobs"]) == 2 for p in r["completion_probabilities"])
        assert r["completion_probabilities"][0]["token"] == " Paris"  # as llama-server (endpoints.json)
        with c.stream("POST", "/completion", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert "".join(e["content"] for e in events) == r["content"]
        assert events[-1]["stop"] is True and all(not e["stop"] for e in events[:-1])
        assert [e["tokens"] for e in events[:-1]] == [[t] for t in r["tokens"]]


# ---- fuzz ----------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
KEYS = {
    "/v1/chat/completions": ["messages", "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                             "logit_bias", "logprobs", "top_logprobs", "stream", "stream_options", "tools",
                             "tool_choice", "response_format", "top_k", "min_p", "presence_penalty",
                             "max_completion_tokens", "chat_template_kwargs", "mirostat", "ignore_eos"],
    "/v1/completions": ["prompt", "model", "max_tokens", "echo", "logprobs", "n", "stop", "seed", "stream",
                        "logit_bias", "temperature", "suffix", "best_of", "min_tokens"],
    "/completion": ["prompt", "n_predict", "temperature", "top_k", "n_probs", "stream", "stop", "seed",
                    "logit_bias", "max_tokens"],
    "/tokenize": ["content", "add_special", "parse_special", "with_pieces"],
    "/detokenize": ["tokens"],
    "/apply-template": ["messages", "tools", "chat_template_kwargs"],
}
VALID = {
    "/v1/chat/completions": CHAT_OK, "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/completion": {"prompt": "hi", "n_predict": 2}, "/tokenize": {"content": "hi"}, "/detokenize": {"tokens": [1]},
    "/apply-template": {"messages": [{"role": "user", "content": "hi"}]},
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 5])},
                                optional={"content": JSON | st.text(max_size=20), "tool_calls": JSON})


def _bounded(path: str, body: Any) -> Any:
    """Keeps valid-looking lengths small so a fuzzed request that *is* valid stays cheap."""
    if not isinstance(body, dict):
        return body
    limits = ("max_tokens", "n_predict", "max_completion_tokens")
    for key in limits:
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and (v > 3 or v < 0):
            body[key] = 2
    if not any(k in body for k in limits):
        body["n_predict" if path == "/completion" else "max_tokens"] = 2
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 2:
            body[key] = 2
    return body


@st.composite
def bodies(draw: Any, path: str) -> Any:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(JSON)
    body = dict(VALID[path])
    for key in draw(st.lists(st.sampled_from(KEYS[path]), max_size=4)):
        body[key] = draw(st.lists(MESSAGE, max_size=3) if key == "messages" and kind == 1 else JSON)
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))), None)
    return _bounded(path, body)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(data=st.data())
def test_fuzz_no_5xx(api_server, data) -> None:  # noqa: F811
    path = data.draw(st.sampled_from(sorted(KEYS)))
    if data.draw(st.integers(0, 9)) == 0:
        raw = data.draw(st.binary(max_size=40))
    else:
        raw = json.dumps(data.draw(bodies(path))).encode()
    with httpx.Client(base_url=api_server.base_url, timeout=60) as c:
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert_error_body(r)


# ---- auth, CORS, body limit, loading, overload ---------------------------------------------------

@pytest.fixture(scope="module")
def auth_server() -> Any:
    srv = start_server(api_key=["secret"], cors_origin=["http://localhost:3000"], max_body_mb=0.05)
    yield srv
    srv.stop()


def test_auth_records(auth_server) -> None:
    # we accept any case of "Bearer" (RFC 7235); "/" is the web UI's page, served without a key as
    # llama-server's own page is (the API calls it makes carry the key)
    ours = {"lowercase_bearer": 200, "root_no_auth": 200}
    records = json.loads((DATA / "errors_auth.json").read_text())["records"]
    with auth_server.client() as c:
        for rec in records:
            r = send(c, rec)
            assert r.status_code == ours.get(rec["name"], rec["status"]), (rec["name"], r.status_code, r.text)
            if r.status_code == 401:
                assert assert_error_body(r)["type"] == "authentication_error"


def test_cors(auth_server) -> None:
    with auth_server.client() as c:
        pre = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                          "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.get("/health", headers={"Origin": "http://localhost:3000"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_body_too_large_is_413(auth_server) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    with auth_server.client(headers={"Authorization": "Bearer secret"}) as c:
        r = c.post("/v1/chat/completions", content=big, headers=JSON_CT)
        assert r.status_code == 413 and assert_error_body(r)["code"] == "request_too_large"
        r = c.post("/v1/chat/completions", content=iter([big[:30000], big[30000:]]), headers=JSON_CT)  # chunked
        assert r.status_code == 413
        assert c.get("/health").status_code == 200


def test_health_503_until_loaded_then_200() -> None:
    from api.app import create_app
    from api.server import ServerSettings, make_uvicorn_server, uvicorn_config
    from engine.core.async_engine import AsyncEngine
    from server_fixture import free_port

    loaded = loaded_model()
    s = ServerSettings(model=str(loaded.path), alias="smollm2", port=free_port(), ctx_size=2048, kv_cache_gib=0.1)
    engine = AsyncEngine(s.engine_config(), loaded)  # not started yet: the model is "loading"
    app = create_app(engine, s)
    server = make_uvicorn_server(uvicorn_config(app, s, log_level="warning"), app)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        base = f"http://127.0.0.1:{s.port}"
        while not server.started:
            time.sleep(0.02)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and assert_error_body(r)["message"] == "Loading model"
        r = httpx.post(base + "/v1/chat/completions", json=CHAT_OK)
        assert r.status_code == 503 and r.headers["retry-after"]
        engine.start()
        deadline = time.monotonic() + 60
        while httpx.get(base + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(base + "/v1/chat/completions", json=CHAT_OK, timeout=60).status_code == 200
    finally:
        server.should_exit = True
        th.join(10)


def test_overload_is_503_with_retry_after() -> None:
    srv = start_server(parallel=1, max_waiting=0)
    try:
        with srv.client() as c1, srv.client() as c2:
            body = {**CHAT_OK, "max_tokens": 400, "ignore_eos": True, "stream": True}
            with c1.stream("POST", "/v1/chat/completions", json=body) as s:
                lines = s.iter_lines()  # keep a reference: a collected iterator closes the stream
                next(lines)  # the first request occupies the only slot
                r = c2.post("/v1/chat/completions", json=CHAT_OK)
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                assert assert_error_body(r)["code"] == "overloaded"
        assert srv.wait_idle().num_running == 0
    finally:
        srv.stop()
