"""The many-model router against real models: one server over a folder with smollm2, gemma3 and a
broken file, real worker processes, the official SDKs.

The answers are compared with each model served alone (tests/server_fixture.py, same settings):
greedy, token for token.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from router_fixture import model_folder, router_process
from server_fixture import loaded_model, metric, start_server

PROMPTS = ["Name three colors.", "What is the capital of France?", "Write a haiku about the sea."]
COMPLETIONS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def minilm_path():
    from conftest import model_file

    return model_file("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_path, gemma3_path, minilm_path):
    return model_folder(tmp_path_factory.mktemp("models"), {"smollm2": smollm2_path, "gemma3": gemma3_path,
                                                            "minilm": minilm_path}, broken=True)


@pytest.fixture(scope="module")
def router(folder):
    with router_process(folder) as r:
        yield r


def _chat(client: openai.OpenAI, model: str, prompt: str) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=24, temperature=0)
    return r.choices[0].message.content


def _complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0).choices[0].text


def _alone(name: str, alias: str, calls: list[tuple]) -> list[str]:
    srv = start_server(loaded_model(name), alias=alias)
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x")
        return [fn(client, alias, p) for fn, p in calls]
    finally:
        srv.stop()


class StatusLog:
    """Every status each model shows in /v1/models, in order, polled in the background."""

    def __init__(self, base_url: str) -> None:
        self.base_url, self.seen, self._stop = base_url, {}, threading.Event()
        self._poll()  # the state before anything is asked of the server
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        for m in httpx.get(self.base_url + "/v1/models", timeout=30).json()["data"]:
            seq = self.seen.setdefault(m["id"], [])
            if not seq or seq[-1] != m["status"]["value"]:
                seq.append(m["status"]["value"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(0.02)

    def stop(self) -> dict[str, list[str]]:
        self._stop.set()
        self.thread.join()
        return self.seen


def test_interleaved_requests_match_each_model_served_alone(router) -> None:
    calls = [(m, fn, p) for pair in zip([("smollm2", _chat, p) for p in PROMPTS],
                                        [("gemma3", _complete, p) for p in COMPLETIONS]) for m, fn, p in pair]
    assert [m for m, _, _ in calls] == ["smollm2", "gemma3"] * 3
    log = StatusLog(router.base_url)
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", timeout=300)
    with ThreadPoolExecutor(len(calls)) as pool:  # all at once: both models load while requests wait
        got = list(pool.map(lambda c: c[1](client, c[0], c[2]), calls))
    seen = log.stop()
    want = dict(zip([("smollm2", p) for p in PROMPTS], _alone("smollm2-135m-instruct", "smollm2",
                                                             [(_chat, p) for p in PROMPTS])))
    want |= dict(zip([("gemma3", p) for p in COMPLETIONS], _alone("gemma-3-270m", "gemma3",
                                                                 [(_complete, p) for p in COMPLETIONS])))
    assert got == [want[(m, p)] for m, _, p in calls]
    for m in ("smollm2", "gemma3"):
        assert seen[m][:3] == ["unloaded", "loading", "loaded"], seen
    cards = router.models()
    assert cards["smollm2"]["meta"]["n_ctx"] == 2048 and cards["gemma3"]["meta"]["arch"] == "gemma3"
    assert cards["smollm2"]["memory_rss_bytes"] > 50e6 and cards["smollm2"]["format"] == "gguf"


def test_broken_file_is_failed_with_its_error_and_others_serve(router) -> None:
    card = router.models()["broken"]
    assert card["status"]["value"] == "failed" and card["status"]["failed"] is True
    assert "broken.gguf" in card["status"]["error"] and "truncated" in card["status"]["error"]
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x")
    with pytest.raises(openai.APIStatusError) as e:
        _chat(client, "broken", "hi")
    assert e.value.status_code == 503 and e.value.body["code"] == "model_load_failed"
    assert "truncated" in e.value.body["message"]
    assert _chat(client, "smollm2", PROMPTS[0])  # the others keep serving


def test_unknown_or_missing_model(router) -> None:
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x")
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "no-such-model", "hi")
    assert e.value.body["code"] == "model_not_found" and "'smollm2'" in e.value.body["message"]
    r = httpx.post(router.base_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required"
    r = httpx.post(router.base_url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(router.base_url + "/v1/models/no-such-model").status_code == 404
    assert httpx.get(router.base_url + "/v1/models/smollm2").json()["id"] == "smollm2"
    r = httpx.post(router.base_url + "/tokenize?model=smollm2", json={"content": "hello"})  # no body field
    assert r.status_code == 200 and r.json()["tokens"]


def test_anthropic_sdk_and_its_error_shape(router) -> None:
    client = anthropic.Anthropic(base_url=router.base_url, api_key="x")
    msg = client.messages.create(model="smollm2.gguf", max_tokens=16,  # the file name routes too
                                 messages=[{"role": "user", "content": "Say hi."}])
    assert msg.content[0].text and msg.model == "smollm2"
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"


def test_stream_passes_through_and_equals_the_answer(router) -> None:
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=24, temperature=0,
        stream=True) if c.choices)
    assert text == _chat(client, "smollm2", PROMPTS[1])


def test_disconnect_aborts_the_request_in_its_worker(router) -> None:
    aborted = 'llamatron:requests_total{finish_reason="abort",model="smollm2"}'
    before = metric(httpx.get(router.base_url + "/metrics?model=smollm2").text, aborted)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", router.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                break  # tokens are flowing: leave
    deadline = time.monotonic() + 30
    while metric(httpx.get(router.base_url + "/metrics?model=smollm2").text, aborted) < before + 1:
        assert time.monotonic() < deadline, "the worker did not abort the abandoned request"
        time.sleep(0.1)
    assert router.models()["smollm2"]["in_flight"] == 0


def test_metrics_label_every_series_by_model(router) -> None:
    text = httpx.get(router.base_url + "/metrics").text
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert samples and all('model="' in ln for ln in samples), [ln for ln in samples if 'model="' not in ln][:5]
    assert metric(text, 'llamatron:router_model_status{model="broken",status="failed"}') == 1.0
    assert any(ln.startswith("llamatron:prompt_tokens_total{") and 'model="gemma3"' in ln for ln in samples)


def test_health_and_props(router) -> None:
    assert httpx.get(router.base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(router.base_url + "/health?model=broken").status_code == 503
    props = httpx.get(router.base_url + "/props").json()
    assert props["role"] == "router" and set(props["models"]) == {"smollm2", "gemma3", "broken", "minilm"}
    one = httpx.get(router.base_url + "/props?model=smollm2").json()
    assert one["default_generation_settings"]["n_ctx"] == 2048
    assert httpx.get(router.base_url + "/slots").json()["error"]["code"] == "model_required"


def test_a_worker_that_dies_is_failed_then_reloaded(router) -> None:
    import os
    import signal

    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", timeout=300)
    first = _complete(client, "gemma3", COMPLETIONS[0])
    os.kill(router.models()["gemma3"]["pid"], signal.SIGKILL)
    card = router.wait_status("gemma3", "failed", timeout=30)
    assert "signal 9" in card["status"]["error"]
    assert _complete(client, "gemma3", COMPLETIONS[0]) == first  # the next request loads it again


def test_cli_models_offline_and_against_the_router(router, folder) -> None:
    import json
    import os
    import subprocess
    import sys

    from router_fixture import ROOT, empty_registry_config

    def run(*args: str) -> list[dict]:
        env = {**os.environ, "LLAMATRON_CONFIG_DIR": str(empty_registry_config())}
        out = subprocess.run([sys.executable, "-m", "api.cli", "models", "--json", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True, timeout=120).stdout
        return {r["id"]: r for r in json.loads(out)}

    offline = run("--models-dir", str(folder))
    assert set(offline) == {"smollm2", "gemma3", "broken", "minilm"} and offline["broken"]["status"] == "failed"
    assert offline["minilm"]["format"] == "safetensors" and offline["minilm"]["ftype"] == "F32"
    assert offline["gemma3"]["ftype"] == "Q4_K_M" and offline["smollm2"]["n_ctx_train"] == 8192
    live = run("--base-url", router.base_url)
    assert live["smollm2"]["status"] == "loaded" and live["smollm2"]["memory"] > 0
    assert live["broken"]["status"] == "failed" and "truncated" in live["broken"]["error"]


@pytest.mark.big
def test_the_three_shipped_models_from_one_folder(tmp_path, smollm2_path, gemma3_path, qwen_path) -> None:
    """All three models resident behind one port, each answering as it does alone."""
    folder = model_folder(tmp_path / "three", {"smollm2": smollm2_path, "gemma3": gemma3_path, "qwen": qwen_path})
    calls = [("qwen", _chat, "Write a Python function that adds two numbers."), ("smollm2", _chat, PROMPTS[0]),
             ("gemma3", _complete, COMPLETIONS[0]), ("qwen", _complete, COMPLETIONS[2])]
    with router_process(folder, "--models-max", "3") as r:
        client = openai.OpenAI(base_url=r.base_url + "/v1", api_key="x", timeout=600)
        with ThreadPoolExecutor(len(calls)) as pool:
            got = list(pool.map(lambda c: c[1](client, c[0], c[2]), calls))
        assert {m: c["status"]["value"] for m, c in r.models().items()} == dict.fromkeys(
            ("smollm2", "gemma3", "qwen"), "loaded")
    names = {"qwen": "qwen2.5-coder-0.5b-instruct", "smollm2": "smollm2-135m-instruct", "gemma3": "gemma-3-270m"}
    for (m, fn, p), answer in zip(calls, got):
        assert answer == _alone(names[m], m, [(fn, p)])[0], (m, p)


def test_a_hugging_face_encoder_folder_serves_embeddings(router, minilm_path) -> None:
    """A model subfolder with config.json (all-MiniLM-L6-v2) is one model: embeddings through the
    router equal the model served alone; generation on it is a 400."""
    card = router.models()["minilm"]
    assert card["format"] == "safetensors" and card["meta"]["arch"] == "bert" and card["meta"]["n_embd"] == 384
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", timeout=300)
    got = client.embeddings.create(model="minilm", input=PROMPTS).data
    srv = start_server(loaded_model("all-minilm-l6-v2"), alias="minilm")
    try:
        want = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x").embeddings.create(model="minilm",
                                                                                          input=PROMPTS).data
    finally:
        srv.stop()
    for a, b in zip(got, want):
        assert sum(x * y for x, y in zip(a.embedding, b.embedding)) > 0.9999
    with pytest.raises(openai.BadRequestError):
        _chat(client, "minilm", "hi")
