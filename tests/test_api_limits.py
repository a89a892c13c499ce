"""Transport and access limits on a real server (issue 17): JSON only (415), request-head and body
timeouts (408), UTF-8 API keys, /slots without other requests' ids."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from server_fixture import start_server

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
KEY = "clé-ключ-🔑"


@pytest.fixture(scope="module")
def srv():
    s = start_server(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1)
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/completion", "/tokenize",
                                  "/detokenize", "/apply-template"])
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_json_endpoints_need_a_json_content_type(srv, path: str, ctype: str | None) -> None:
    """The content types a web page may POST cross-site without a CORS preflight never reach a
    handler; the body is not even read."""
    headers = {"content-type": ctype} if ctype else {}
    r = httpx.post(srv.base_url + path, content=b'{"prompt": "x", "messages": []}', headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_json_content_type_variants_are_accepted(srv) -> None:
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        r = httpx.post(srv.base_url + "/tokenize", content=b'{"content": "hi"}', headers={"content-type": ctype})
        assert r.status_code == 200, ctype


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def test_slow_request_head_is_cut_off(srv) -> None:
    host, port = srv.settings.host, srv.settings.port
    with socket.create_connection((host, port), timeout=10) as s:  # trickles a header, never ends it
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        reply = _read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
    with socket.create_connection((host, port), timeout=10) as s:  # says nothing at all
        assert _read_all(s).startswith(b"HTTP/1.1 408")
    with socket.create_connection((host, port), timeout=10) as s:  # keep-alive, then a partial head
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /hea")
        assert b"408 Request Timeout" in _read_all(s)
    assert httpx.get(srv.base_url + "/health").status_code == 200


def test_slow_body_gets_408(srv) -> None:
    with socket.create_connection((srv.settings.host, srv.settings.port), timeout=10) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"content\":")
        t0 = time.monotonic()
        reply = _read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert time.monotonic() - t0 < 3


def test_utf8_api_key_and_slots_privacy() -> None:
    srv = start_server(api_key=[KEY])
    try:
        auth = {"Authorization": f"Bearer {KEY}".encode()}
        assert httpx.post(srv.base_url + "/tokenize", json={"content": "x"}, headers=auth).status_code == 200
        wrong = {"Authorization": "Bearer cle-ключ-🔑".encode()}
        assert httpx.post(srv.base_url + "/tokenize", json={"content": "x"}, headers=wrong).status_code == 401
        with_key = _slots_while_busy(srv, auth)
        assert any(isinstance(s["id_task"], str) for s in with_key)  # behind a key: ids shown
    finally:
        srv.stop()


def test_slots_hide_request_ids_without_a_key(srv) -> None:
    busy = [s for s in _slots_while_busy(srv, {}) if s["is_processing"]]
    assert busy and all(s["id_task"] == -1 for s in busy)


def _slots_while_busy(srv, headers: dict) -> list[dict]:
    body = {**CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    seen: list[dict] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as r:
            for _ in r.iter_lines():
                started.set()
                if seen:
                    return

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    seen += httpx.get(srv.base_url + "/slots", headers=headers).json()
    t.join(60)
    return seen
