"""The router's model lifecycle with real workers: eviction under --models-max 1 only once the
evicted model's requests are done, memory given back on unload, --no-models-autoload with the
admin endpoints behind the API key, a presets file (aliases, context, sampling defaults), and
unloading after --sleep-idle-seconds.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from router_fixture import model_folder, router_process
from server_fixture import metric

KEY = "router-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_path, gemma3_path):
    return model_folder(tmp_path_factory.mktemp("models"), {"smollm2": smollm2_path, "gemma3": gemma3_path})


def test_models_max_1_evicts_only_after_the_requests_finish(folder) -> None:
    with router_process(folder, "--models-max", "1") as r:
        client = openai.OpenAI(base_url=r.base_url + "/v1", api_key="x", timeout=300)
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=2)  # loads it
        events: dict[str, float] = {}
        first_chunk = threading.Event()

        def long_stream() -> None:
            n = 0
            for chunk in client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", max_tokens=150,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                n += 1
                first_chunk.set()
                if chunk.choices[0].finish_reason:
                    events["stream_finish"] = chunk.choices[0].finish_reason
                else:  # more was still to come: the request held its model at this moment
                    events["last_chunk"] = time.monotonic()
            events["stream_end"], events["chunks"] = time.monotonic(), n

        def other_model() -> None:
            out = client.completions.create(model="gemma3", prompt="Once upon a time", max_tokens=8, temperature=0)
            events["gemma3_done"], events["gemma3_text"] = time.monotonic(), out.choices[0].text

        t1 = threading.Thread(target=long_stream)
        t1.start()
        assert first_chunk.wait(60)
        t2 = threading.Thread(target=other_model)
        t2.start()
        polls = []  # (answered at, {model: status})
        while t1.is_alive() or t2.is_alive():
            cards = r.models()
            polls.append((time.monotonic(), {m: c["status"]["value"] for m, c in cards.items()}))
            time.sleep(0.05)
        t1.join()
        t2.join()
        assert events["stream_finish"] == "length" and events["gemma3_text"]
        during = [st for t, st in polls if t < events["last_chunk"]]  # answered while smollm2 still streamed
        assert during and all(st == {"smollm2": "loaded", "gemma3": "unloaded"} for st in during), during
        loading = [t for t, st in polls if st["gemma3"] == "loading"]
        assert loading and min(loading) > events["last_chunk"]  # its load began only after the stream
        assert events["gemma3_done"] > events["stream_end"]
        cards = r.models()
        assert cards["smollm2"]["status"]["value"] == "unloaded" and cards["gemma3"]["status"]["value"] == "loaded"
        text = httpx.get(r.base_url + "/metrics").text
        assert metric(text, 'llamatron:router_model_unloads_total{model="smollm2",reason="lru"}') == 1.0


def test_memory_returns_after_unload(folder) -> None:
    with router_process(folder) as r:
        time.sleep(1.0)
        before = r.tree_rss()
        load = httpx.post(r.base_url + "/models/load", json={"model": "gemma3"}, timeout=300)
        assert load.status_code == 200 and load.json()["status"]["value"] == "loaded"
        client = openai.OpenAI(base_url=r.base_url + "/v1", api_key="x", timeout=300)
        assert client.completions.create(model="gemma3", prompt="Once upon a time", max_tokens=8).choices[0].text
        loaded = r.tree_rss()
        assert loaded > before + 150e6  # the 253 MB model, its KV pool, torch
        unload = httpx.post(r.base_url + "/models/unload", json={"model": "gemma3"}, timeout=120)
        assert unload.status_code == 200 and unload.json()["status"]["value"] == "unloaded"
        after = r.tree_rss()
        assert after <= before * 1.10, (before, loaded, after)


PRESET = """
temperature = 0.0        # every model: greedy unless a request says otherwise

[models.smollm2]
alias = ["tiny", "chat-small"]
ctx_size = 1024
parallel = 2

[models.gemma3]
ctx_size = 512
temperature = 1.0
"""


def test_no_autoload_admin_behind_key_presets_and_idle_unload(folder, tmp_path) -> None:
    preset = tmp_path / "models.toml"
    preset.write_text(PRESET)
    with router_process(folder, "--no-models-autoload", "--api-key", KEY, "--models-preset", str(preset),
                        "--sleep-idle-seconds", "5") as r:
        assert httpx.get(r.base_url + "/health").status_code == 200  # open
        assert httpx.post(r.base_url + "/models/load", json={"model": "tiny"}).status_code == 401
        client = openai.OpenAI(base_url=r.base_url + "/v1", api_key=KEY, timeout=300)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=4)
        assert e.value.body["code"] == "model_not_loaded"
        assert r.models(**AUTH)["smollm2"]["aliases"] == ["tiny", "chat-small"]
        load = httpx.post(r.base_url + "/models/load", json={"model": "tiny"}, headers=AUTH, timeout=300)
        assert load.status_code == 200 and load.json()["model"] == "smollm2"
        card = r.models(**AUTH)["smollm2"]
        assert card["meta"]["n_ctx"] == 1024
        props = httpx.get(r.base_url + "/props?model=chat-small", headers=AUTH).json()
        assert props["default_generation_settings"]["params"]["temperature"] == 0.0
        # the preset's temperature 0 applies to requests that leave it out: the same answer each time,
        # and the same as asking for greedy decoding outright
        ask = dict(model="chat-small", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=20)
        a, b = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
        assert a == b == client.chat.completions.create(**ask, temperature=0).choices[0].message.content
        # idle for --sleep-idle-seconds: unloaded without being asked
        card = r.wait_status("smollm2", "unloaded", timeout=30, **AUTH)
        text = httpx.get(r.base_url + "/metrics", headers=AUTH).text
        assert metric(text, 'llamatron:router_model_unloads_total{model="smollm2",reason="idle"}') == 1.0


def test_bad_presets_fail_at_start(folder, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from router_fixture import ROOT, empty_registry_config
    from server_fixture import free_port

    cfg = empty_registry_config()
    for text, why in [("[models.smollm2]\nport = 1\n", "'port' is not a per-model setting"),
                      ("[models.smollm2]\nctx_size = 'big'\n", "ctx_size"),
                      ("[models.ghost]\nctx_size = 1\n", "ghost"),
                      ("[models.smollm2]\nalias = 'gemma3'\n", "'gemma3' is given to both")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        p = subprocess.run([sys.executable, "-m", "api.cli_serve", "--models-dir", str(folder), "--models-preset",
                            str(bad), "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "LLAMATRON_CONFIG_DIR": str(cfg)})
        assert p.returncode == 2 and why in p.stderr, (text, p.stderr)
