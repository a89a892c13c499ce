"""The router's parts without its processes: which model a body names, what a folder holds, the
presets file, the catalogue and each worker's settings; split GGUF files; the router staying
free of torch; the server's sampling defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from api.router.catalog import build_catalog, worker_settings
from api.router.presets import load_presets
from api.router.select import top_level_model
from api.server import ServerSettings, SettingsError, load_settings
from engine.loading.discovery import scan_models_dir
from engine.loading.gguf import GGUFError, GGUFFile
from engine.loading.model_info import describe
from router_fixture import ROOT, empty_registry_config
from synth import write_tiny_model


# ---- which model a body names -------------------------------------------------------------------

@pytest.mark.parametrize("body, want", [
    ({"model": "a", "messages": []}, "a"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "b"}, "b"),
    ({"tools": [{"function": {"parameters": {"model": "nested"}}}], "model": "top"}, "top"),
    ({"tools": [{"function": {"parameters": {"model": "nested"}}}]}, None),
    ({"messages": [{"content": '"model": "in text"'}]}, None),
    ({"prompt": "model", "n": 1}, None),  # "model" as a value, not a key
    ({"model": "é \"quoted\" \\ name"}, "é \"quoted\" \\ name"),
    ({"model": 3}, None),
    ([{"model": "in a list"}], None),
])
def test_top_level_model(body, want) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert top_level_model(raw) == want == _decoded(raw)


def _decoded(raw: bytes) -> str | None:
    data = json.loads(raw)
    return data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str) else None


def test_top_level_model_last_key_wins_and_bad_json() -> None:
    assert top_level_model(b'{"model": "a", "x": 1, "model": "b"}') == "b"
    assert top_level_model(b'{"model": ') is None
    assert top_level_model(b"") is None


# ---- what a folder holds --------------------------------------------------------------------------

def test_scan_models_dir(tmp_path) -> None:
    for name in ("a.gguf", "b-00001-of-00002.gguf", "b-00002-of-00002.gguf", "mmproj-a.gguf", ".hidden.gguf",
                 "notes.txt", "one/x.gguf", "multi/p.gguf", "multi/q.gguf", "hf/config.json", "empty/readme"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = {f.id: f.path.relative_to(tmp_path).as_posix() for f in scan_models_dir(tmp_path)}
    assert found == {"a": "a.gguf", "b": "b-00001-of-00002.gguf", "one": "one/x.gguf", "multi/p": "multi/p.gguf",
                     "multi/q": "multi/q.gguf", "hf": "hf"}
    with pytest.raises(FileNotFoundError, match="models folder not found"):
        scan_models_dir(tmp_path / "nope")


# ---- split GGUF files ----------------------------------------------------------------------------

def test_split_gguf_loads_as_one_model(tmp_path) -> None:
    from engine.core.sampling import SamplingParams
    from synth import make_engine

    from engine.config import EngineConfig
    from engine.loading.loader import load_model

    whole = write_tiny_model(tmp_path / "whole" / "tiny.gguf")
    first = write_tiny_model(tmp_path / "split" / "tiny.gguf", split_max_tensors=8)
    assert first.name == "tiny-00001-of-00003.gguf"
    assert describe(first).n_params == describe(whole).n_params and len(describe(first).files) == 3
    outs = []
    for path in (whole, first):
        loaded = load_model(EngineConfig(model=str(path), device="cpu", max_model_len=256))
        eng = make_engine(loaded)
        outs.append(eng.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=12, temperature=0))[0].token_ids)
    assert outs[0] == outs[1]
    (tmp_path / "split" / "tiny-00002-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match=r"part 2 of 3 is missing \(tiny-00002-of-00003.gguf\)"):
        GGUFFile(first)


def test_truncated_gguf_is_named(tmp_path) -> None:
    whole = write_tiny_model(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size - 1000])
    with pytest.raises(GGUFError, match="cut.gguf: truncated"):
        GGUFFile(cut)
    cut.write_bytes(whole.read_bytes()[:300])  # inside the header
    with pytest.raises(GGUFError, match="cut.gguf: truncated"):
        describe(cut)


# ---- presets and the catalogue ---------------------------------------------------------------------

@pytest.fixture
def no_registry(monkeypatch):
    monkeypatch.setenv("LLAMATRON_CONFIG_DIR", str(empty_registry_config()))


def test_presets_file(tmp_path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    p = tmp_path / "p.toml"
    p.write_text('ctx_size = 4096\n[models.a]\nalias = "x, y"\nchat_template = "t.jinja"\ntemperature = 0.5\n'
                 'load_on_startup = true\n[models.b]\nmodel = "/m/b.gguf"\nparallel = 2\n')
    presets = load_presets(p)
    assert presets.defaults == {"ctx_size": 4096}
    a, b = presets.models["a"], presets.models["b"]
    assert a.aliases == ["x", "y"] and a.load_on_startup and a.settings["temperature"] == 0.5
    assert a.settings["chat_template"] == str(tmp_path / "t.jinja")
    assert b.model == "/m/b.gguf" and b.settings == {"parallel": 2}
    for text, why in [("host = 'x'\n", "router-wide"), ("[models.a]\nbogus = 1\n", "unknown"),
                      ("[models.a]\nparallel = 'two'\n", "parallel"), ("models = 3\n", "must be a table"),
                      ("[models.a]\nload_on_startup = 1\n", "true or false"), ("[x\n", "models preset")]:
        p.write_text(text)
        with pytest.raises(SettingsError, match=why):
            load_presets(p)


def test_catalog_sources_and_worker_settings(tmp_path, no_registry) -> None:
    folder = tmp_path / "models"
    write_tiny_model(folder / "alpha.gguf")
    write_tiny_model(folder / "beta.gguf", seed=1)
    other = write_tiny_model(tmp_path / "elsewhere" / "gamma.gguf", seed=2)
    (folder / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    preset = tmp_path / "p.toml"
    preset.write_text(f'parallel = 3\n[models.alpha]\nalias = ["a1"]\nctx_size = 128\n'
                      f'[models.gamma]\nmodel = "{other}"\ngpu_memory_fraction = 0.5\n')
    s = load_settings({"models_dir": str(folder), "models_preset": str(preset), "model": str(folder / "beta.gguf"),
                       "alias": "beta,b2", "models_max": 2, "threads": 0, "device": "cpu"}, env={})
    specs = {x.id: x for x in build_catalog(s)}
    assert set(specs) == {"alpha", "bad", "beta", "gamma"}
    assert specs["beta"].load_on_startup and specs["beta"].aliases == ["b2"]
    assert specs["alpha"].aliases == ["a1"] and specs["alpha"].info.n_layers == 2
    assert specs["bad"].info is None and "bad.gguf" in specs["bad"].error
    w = worker_settings(s, specs["alpha"], slots=2)
    assert (w.model, w.alias, w.ctx_size, w.parallel) == (str(folder / "alpha.gguf"), "alpha,a1", 128, 3)
    assert w.api_key == [] and w.no_webui and not w.models_dir and not w.models_preset
    assert w.gpu_memory_fraction == pytest.approx(0.85 / 2) and w.threads >= 1
    assert worker_settings(s, specs["gamma"], slots=2).gpu_memory_fraction == 0.5
    clash = tmp_path / "clash.toml"
    clash.write_text('[models.alpha]\nalias = "beta"\n')
    with pytest.raises(SettingsError, match="'beta' is given to both"):
        build_catalog(load_settings({"models_dir": str(folder), "models_preset": str(clash)}, env={}))


def test_router_mode_and_settings() -> None:
    assert ServerSettings().router_mode and not ServerSettings(model="x.gguf").router_mode
    assert ServerSettings(model="x.gguf", models_dir="/m").router_mode
    s = ServerSettings(model="m.gguf", alias="one, two")
    assert s.model_id() == "one" and s.aliases == ["one", "two"]
    assert ServerSettings(temperature=0.2, top_k=0).sampling_defaults() == {"temperature": 0.2, "top_k": 0}
    for bad in ({"temperature": 3.0}, {"top_k": -2}, {"models_max": -1}, {"gpu_memory_fraction": 0.0},
                {"models_wait_s": -1.0}):
        with pytest.raises(SettingsError):
            load_settings(bad, env={})


def test_the_router_process_never_imports_torch(tmp_path) -> None:
    """The router reads headers and forwards bytes: torch (hundreds of MB, a CUDA context on a GPU
    machine) lives only in the workers."""
    code = ("import sys; import api.router.app, api.router.catalog, api.router.routes; "
            "from engine.loading.model_info import describe; "
            f"describe({str(write_tiny_model(tmp_path / 'tiny.gguf'))!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- the server's sampling defaults (single-model server) -------------------------------------------

def test_server_sampling_defaults_apply_to_requests_that_leave_them_out() -> None:
    from server_fixture import start_server

    srv = start_server(temperature=0.0, top_k=1)
    try:
        props = httpx.get(srv.base_url + "/props").json()["default_generation_settings"]["params"]
        assert props["temperature"] == 0.0 and props["top_k"] == 1
        body = {"prompt": "Once upon a time", "n_predict": 16}
        runs = [httpx.post(srv.base_url + "/completion", json=body, timeout=60).json() for _ in range(2)]
        assert runs[0]["content"] == runs[1]["content"]
        assert runs[0]["generation_settings"]["temperature"] == 0.0
        chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 16}
        a, b = (httpx.post(srv.base_url + "/v1/chat/completions", json=chat, timeout=60).json() for _ in range(2))
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
    finally:
        srv.stop()


def test_file_names_route_only_where_they_are_unambiguous(tmp_path) -> None:
    from api.router.catalog import ModelSpec
    from api.router.manager import ModelManager

    specs = [ModelSpec("one", tmp_path / "one" / "model.gguf", "dir"), ModelSpec("two", tmp_path / "two" / "model.gguf",
             "dir", aliases=["model"]), ModelSpec("three", tmp_path / "x.gguf", "dir")]
    m = ModelManager(specs, ServerSettings(), tmp_path)
    assert m.lookup("model.gguf") is None  # two files of that name
    assert m.lookup("model").id == "two" and m.lookup("x.gguf").id == "three" and m.lookup("x").id == "three"
    assert m.lookup("one").id == "one" and m.lookup("nope") is None
