"""Embeddings against a real server (smollm2) with the official openai SDK: the vectors equal the
mean-pooled last-layer hidden states of a direct forward pass, base64 == float, `dimensions`,
llama-server's /embedding shape, 32 concurrent embedding requests among streaming chats (all
succeed, the chats' greedy text unchanged), malformed bodies as OpenAI-shaped 4xx, 400 when not
enabled, /metrics, and the --embeddings / --pooling settings."""

from __future__ import annotations

import asyncio
import base64
import math
import struct

import httpx
import pytest
import torch
from openai import OpenAI
from server_fixture import loaded_model, metric, settle, start_server

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "def add(a, b):\n    return a + b"]


@pytest.fixture(scope="module")
def srv():
    s = start_server(embeddings=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv) -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def offline_mean(text_or_ids: str | list[int]) -> torch.Tensor:
    """The engine's model run directly on one whole input, mean-pooled and L2-normalised."""
    from kernels import AttentionMetadata

    loaded = loaded_model()
    ids = (loaded.tokenizer.encode(text_or_ids, add_special=True, parse_special=True)
           if isinstance(text_or_ids, str) else text_or_ids)
    n, bs = len(ids), 16
    nb = -(-n // bs)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(nb, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        max_seqlen_q=n, max_seqlen_k=n, block_size=bs)
    with torch.inference_mode():
        h = loaded.model.forward(torch.tensor(ids), torch.arange(n), meta, loaded.model.allocate_kv_cache(nb, bs))
    v = h.float().mean(0)
    return v / v.norm()


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def test_sdk_equals_offline_mean_pooling(srv, client) -> None:
    r = client.embeddings.create(model="smollm2", input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == "smollm2" and [d.index for d in r.data] == [0, 1, 2]
    tok = loaded_model().tokenizer
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(
        len(tok.encode(t, add_special=True, parse_special=True)) for t in TEXTS)
    for text, d in zip(TEXTS, r.data, strict=True):
        assert len(d.embedding) == srv.engine.model_config.hidden_size
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-4)  # L2-normalised
        assert cosine(d.embedding, offline_mean(text)) >= 0.9999
    one = client.embeddings.create(model="smollm2", input=TEXTS[1], encoding_format="float")
    assert cosine(one.data[0].embedding, r.data[1].embedding) >= 0.9999  # batched == alone
    st = srv.wait_idle()
    assert st.free_blocks == st.total_blocks  # no KV kept after


def test_token_id_inputs(client) -> None:
    ids = [[504, 3458, 2872, 30], [1530, 314, 253]]
    r = client.embeddings.create(model="smollm2", input=ids, encoding_format="float")
    assert r.usage.prompt_tokens == 7
    for i, d in zip(ids, r.data, strict=True):
        assert cosine(d.embedding, offline_mean(i)) >= 0.9999
    flat = client.embeddings.create(model="smollm2", input=ids[0], encoding_format="float")
    assert len(flat.data) == 1 and cosine(flat.data[0].embedding, r.data[0].embedding) >= 0.9999


def test_base64_decodes_to_the_same_floats(srv, client) -> None:
    floats = client.embeddings.create(model="smollm2", input=TEXTS[:2], encoding_format="float")
    with srv.client() as c:
        raw = c.post("/v1/embeddings", json={"model": "smollm2", "input": TEXTS[:2], "encoding_format": "base64"})
    assert raw.status_code == 200
    for d, f in zip(raw.json()["data"], floats.data, strict=True):
        b = base64.b64decode(d["embedding"])
        assert list(struct.unpack(f"<{len(b) // 4}f", b)) == f.embedding
    sdk_default = client.embeddings.create(model="smollm2", input=TEXTS[:2])  # the SDK asks for base64 itself
    assert [list(map(float, d.embedding)) for d in sdk_default.data] == [f.embedding for f in floats.data]


def test_dimensions_truncate_and_renormalise(client) -> None:
    full = client.embeddings.create(model="smollm2", input=TEXTS[0], encoding_format="float").data[0].embedding
    short = client.embeddings.create(model="smollm2", input=TEXTS[0], dimensions=64,
                                     encoding_format="float").data[0].embedding
    assert len(short) == 64 and math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-4)
    head = torch.tensor(full[:64])
    assert torch.allclose(torch.tensor(short), head / head.norm(), atol=1e-5)


def test_llama_server_shape(srv, client) -> None:
    want = client.embeddings.create(model="smollm2", input=TEXTS[:2], encoding_format="float")
    with srv.client() as c:
        for path, body in (("/embedding", {"content": TEXTS[:2]}), ("/embeddings", {"input": TEXTS[:2]})):
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert [g["index"] for g in got] == [0, 1]
            for g, w in zip(got, want.data, strict=True):
                assert len(g["embedding"]) == 1 and cosine(g["embedding"][0], w.embedding) >= 0.9999
        raw = c.post("/embedding", json={"content": TEXTS[0], "embd_normalize": -1}).json()[0]["embedding"][0]
        assert math.sqrt(sum(x * x for x in raw)) > 1.5  # not normalised when asked
        assert cosine(raw, want.data[0].embedding) >= 0.9999
        assert c.post("/embedding", json={}).json()["error"]["message"] == '"input" or "content" must be provided'


def _chat_body(i: int) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            "max_tokens": 24, "temperature": 0, "stream": True}


async def _stream_chat(c: httpx.AsyncClient, i: int) -> str:
    import json

    text = []
    async with c.stream("POST", "/v1/chat/completions", json=_chat_body(i)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    text.append(ch["delta"].get("content") or "")
    return "".join(text)


def test_concurrent_embeddings_among_streaming_chats(srv) -> None:
    texts = [f"Document number {i}: " + "words about topic %d. " % (i % 5) * (1 + i % 7) for i in range(32)]

    async def alone() -> list[str]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=300) as c:
            return [await _stream_chat(c, i) for i in range(4)]

    async def mixed() -> tuple[list[str], list[dict]]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=300) as c:
            chats = [asyncio.ensure_future(_stream_chat(c, i)) for i in range(4)]
            embs = [asyncio.ensure_future(c.post("/v1/embeddings", json={"model": "smollm2", "input": t}))
                    for t in texts]
            return await asyncio.gather(*chats), [r.json() for r in await asyncio.gather(*embs)]

    with srv.client() as c:
        before = c.get("/metrics").text
    want_chats = asyncio.run(alone())
    chats, embs = asyncio.run(mixed())
    assert chats == want_chats  # greedy output unchanged by the embedding work in its batches
    assert all(len(e["data"]) == 1 for e in embs), [e for e in embs if "error" in e][:1]
    for t, e in zip(texts[:4], embs[:4], strict=True):
        assert cosine(e["data"][0]["embedding"], offline_mean(t)) >= 0.9999
    settle(srv)
    st = srv.engine.stats()
    assert st.free_blocks == st.total_blocks and st.num_running == 0
    with srv.client() as c:
        after = c.get("/metrics").text
    ok = 'llamatron:embedding_inputs_total{outcome="ok"}'
    assert metric(after, ok) - metric(before, ok) == 32
    tokens = sum(e["usage"]["prompt_tokens"] for e in embs)
    assert metric(after, "llamatron:embedding_prompt_tokens_total") - metric(
        before, "llamatron:embedding_prompt_tokens_total") == tokens
    assert metric(after, "llamatron:embedding_request_latency_seconds_count") - metric(
        before, "llamatron:embedding_request_latency_seconds_count") == 32


BAD = [
    ({}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": None}, 400, "input"),
    ({"input": [1, "a"]}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [["a"]]}, 400, "input"),
    ({"input": [True]}, 400, "input"),
    ({"input": ""}, 400, "input[0]"),
    ({"input": ["ok", ""]}, 400, "input[1]"),
    ({"input": [[10**9]]}, 400, "input[0]"),
    ({"input": [[-1]]}, 400, "input[0]"),
    ({"input": ["x"] * 2049}, 400, "input"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": 100000}, 400, "dimensions"),
    ({"input": "x", "dimensions": "8"}, 400, "dimensions"),
    ({"input": "x", "embd_normalize": -2}, 400, "embd_normalize"),
    ({"input": "x", "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_malformed_bodies_are_openai_4xx(srv, body, status, param) -> None:
    with srv.client() as c:
        r = c.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_too_long_input_names_its_index(srv, client) -> None:
    n_ctx = srv.engine.config.max_model_len
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input=["short", [100] * (n_ctx + 1)])
    err = e.value.body
    assert err["param"] == "input[1]" and err["code"] == "context_length_exceeded" and "input[1]" in err["message"]
    ok = client.embeddings.create(model="smollm2", input=[[100] * n_ctx], encoding_format="float")  # exactly fits
    assert ok.usage.prompt_tokens == n_ctx
    with srv.client() as c:
        assert c.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 400
        assert c.post("/v1/embeddings", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert c.get("/v1/embeddings").status_code == 405
    st = srv.wait_idle()
    assert st.free_blocks == st.total_blocks


def test_disabled_answers_400_saying_how_to_enable() -> None:
    s = start_server()
    try:
        with s.client() as c:
            for path in ("/v1/embeddings", "/embedding", "/embeddings"):
                r = c.post(path, json={"input": "hi"})
                assert r.status_code == 400
                err = r.json()["error"]
                assert "--embeddings" in err["message"] and err["type"] == "not_supported_error"
            assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


def test_pooling_setting() -> None:
    s = start_server(embeddings=True, pooling="none")
    try:
        tok = loaded_model().tokenizer
        with s.client() as c:
            r = c.post("/v1/embeddings", json={"input": "hi there"})
            assert r.status_code == 400 and "not OAI compatible" in r.json()["error"]["message"]
            rows = c.post("/embedding", json={"content": "hi there"}).json()[0]["embedding"]
            assert len(rows) == len(tok.encode("hi there", add_special=True, parse_special=True))
    finally:
        s.stop()
    s = start_server(embeddings=True, pooling="last")
    try:
        with s.client() as c:
            v = c.post("/v1/embeddings", json={"input": TEXTS[0]}).json()["data"][0]["embedding"]
            assert cosine(v, offline_mean(TEXTS[0])) < 0.9999  # not the mean
    finally:
        s.stop()


def test_settings_flag_env_and_config(tmp_path) -> None:
    from api.cli_serve import add_serve_args, settings_from_args
    from api.server import ServerSettings, SettingsError, load_settings

    assert ServerSettings().embeddings is False and ServerSettings().pooling == ""
    import argparse

    p = argparse.ArgumentParser()
    add_serve_args(p)
    s = settings_from_args(p.parse_args(["--embeddings", "--pooling", "cls"]))
    assert s.embeddings is True and s.pooling == "cls" and s.engine_config().pooling == "cls"
    assert load_settings(env={"LLAMATRON_EMBEDDINGS": "1", "LLAMATRON_POOLING": "last"}).pooling == "last"
    cfg = tmp_path / "s.toml"
    cfg.write_text('embeddings = true\npooling = "mean"\n')
    assert load_settings(config_file=str(cfg), env={}).embeddings is True
    with pytest.raises(SettingsError):
        load_settings({"pooling": "max"}, env={})
