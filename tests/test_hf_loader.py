"""Hugging Face folders on tiny synthetic models: GGUF -> `convert` -> the safetensors loader gives
the same decoder, for every architecture; shards; load-time quantization; the Triton backend's
dense float path; and every load error naming its file and problem before a weight is read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.loading.loader import load_model
from greedy_eval import logprobs_for
from synth import write_tiny_hf_folder, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPT = "The quick brown fox jumps over the lazy dog, and then it sleeps for a while."


def _load(path: Path, **kw):
    kw.setdefault("cpu_weights", "exact")
    return load_model(EngineConfig(model=str(path), device="cpu", max_model_len=256, **kw))


def _logprobs(loaded) -> torch.Tensor:
    return logprobs_for(loaded.model, loaded.tokenizer.encode(PROMPT))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: write_tiny_hf_folder(root / arch, arch=arch, vocab_size=2048, tied=arch == "gemma3")
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_folder_is_the_same_model(folders, arch) -> None:
    """fp32 conversion is exact: the folder's logits equal the GGUF's (llama Q/K un-permuted and
    run as neox, gemma norms stored as w - 1 and restored)."""
    hf, gguf = _load(folders[arch]), _load(folders[arch].parent / "tiny.gguf")
    assert hf.format == "safetensors" and gguf.format == "gguf"
    assert hf.config.rope_neox and hf.config.tied_embeddings == gguf.config.tied_embeddings
    torch.testing.assert_close(_logprobs(hf), _logprobs(gguf), atol=2e-4, rtol=0)


def test_sharded_bf16_folder(tmp_path) -> None:
    folder = write_tiny_hf_folder(tmp_path, dtype="bf16", shard_mb=0.05)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    hf, gguf = _load(folder), _load(tmp_path / "tiny.gguf")
    a, b = _logprobs(hf), _logprobs(gguf)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9  # bf16 weights: near, not equal
    assert (a.exp() - b.exp()).abs().max() < 0.05


def test_quantize_at_load(folders) -> None:
    """--quantize q8_0 / q4_k store the matrices as GGUF blocks (the C kernels' planes on CPU)."""
    from kernels.cpu.pack import PackedWeight

    exact = _logprobs(_load(folders["qwen2"]))
    for q, tol in (("q8_0", 0.02), ("q4_k", 0.15)):
        loaded = _load(folders["qwen2"], cpu_weights="auto", quantize=q)
        layer = loaded.model.layers[0]
        assert isinstance(layer.wqkv, PackedWeight), q
        p = _logprobs(loaded)
        assert (p.exp() - exact.exp()).abs().max() < tol, q
    default = _load(folders["llama"], cpu_weights="auto")  # CPU default: Q8_0 planes
    assert isinstance(default.model.layers[0].wqkv, PackedWeight)
    assert isinstance(_load(folders["llama"], cpu_weights="auto", quantize="none").model.layers[0].wqkv,
                      torch.Tensor)


def test_q8_0_matches_gguf_reference_and_q4_k_round_trips() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    from engine.loading.quantize import quantize_q4_k, quantize_q8_0
    from kernels.ref_quant import dequantize

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    x[3, :32] = 0.0  # an all-zero block
    assert (quantize_q8_0(x).numpy() == gguf_quantize(x.numpy(), GGMLQuantizationType.Q8_0)).all()
    y = dequantize(quantize_q4_k(x), 12, tuple(x.shape))
    assert ((y - x).norm() / x.norm()).item() < 0.09  # 16 levels over each block's range
    assert (y[3, :32] == 0).all()


def test_triton_backend_dense_bf16_weights(folders, tmp_path) -> None:
    """Unquantized bf16 matrices on the Triton backend go through torch.matmul (interpreter run)."""
    from engine.loading.hf_folder import open_hf_folder
    from engine.model import Model
    from kernels import backend

    folder = write_tiny_hf_folder(tmp_path, dtype="bf16", n_layers=1, vocab_size=512)
    f = open_hf_folder(folder)
    ops = backend("triton")
    model = Model.from_gguf(f.weights(None), f.config, ops, 64)
    # dense in its own dtype, fp32 where the activations are (the interpreter)
    w = model.layers[0].wqkv
    assert isinstance(w, torch.Tensor) and w.dtype == (torch.bfloat16 if ops.dtype == torch.bfloat16 else torch.float32)
    ids = f.tokenizer.encode("Hello there, tiny model")
    want = logprobs_for(_load(folder).model, ids)
    torch.testing.assert_close(logprobs_for(model, ids), want, atol=2e-3, rtol=0)


def test_llama3_rope_scaling_matches_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.loading.hf_config import _rope_freq_factors

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    c = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
    base = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ours = base / torch.tensor(_rope_freq_factors(scaling, 500000.0, 64, Path("c")))
    torch.testing.assert_close(ours.float(), inv.float(), rtol=1e-5, atol=0)


def test_transformers_5_rope_parameters(folders, tmp_path) -> None:
    """rope_theta and rope_scaling under `rope_parameters` (per layer type for gemma3)."""
    from engine.loading.hf_config import config_from_hf

    folder = _broken(folders, tmp_path, "gemma3")
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        cfg.pop(k, None)
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (folder / "config.json").write_text(json.dumps(cfg))
    got = config_from_hf(folder)
    assert (got.rope_base, got.rope_base_local, got.rope_freq_factors) == (1e6, 1e4, (8.0,) * 8)


def test_gemma3_layer_types_give_the_pattern(folders) -> None:
    from engine.loading.hf_config import config_from_hf

    cfg = json.loads((folders["gemma3"] / "config.json").read_text())
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    loaded = config_from_hf(folders["gemma3"])
    assert loaded.sliding_window == 8 and loaded.layer_is_sliding(0) and loaded.attn_scale == 16 ** -0.5


# ---- errors: each names the file and the problem, before any weight is read ----------------------

def _broken(folders, tmp_path: Path, arch: str = "llama") -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(folders[arch], dst)
    return dst


def _error(path: Path) -> str:
    with pytest.raises(ValueError) as e:
        _load(path)
    return str(e.value)


def test_missing_shard(tmp_path) -> None:
    folder = write_tiny_hf_folder(tmp_path, shard_mb=0.05)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _error(folder)
    assert "model.safetensors.index.json" in msg and f"{shard.name} is missing" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "short"])
def test_corrupt_safetensors(folders, tmp_path, damage) -> None:
    folder = _broken(folders, tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage_header": data[:8] + b"\x00garbage" + data[17:],
                   "short": data[:5]}[damage])
    msg = _error(folder)
    assert str(f) in msg
    assert {"truncated": "outside the file", "garbage_header": "not JSON", "short": "no header"}[damage] in msg


def test_unknown_architecture(folders, tmp_path) -> None:
    folder = _broken(folders, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _error(folder)
    assert "config.json" in msg and "unsupported architecture 'MambaForCausalLM'" in msg


def test_unsupported_dtype(folders, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _broken(folders, tmp_path)
    f = folder / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, f)
    msg = _error(folder)
    assert str(f) in msg and name in msg and "dtype I8" in msg


def test_missing_tensor_and_tokenizer(folders, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _broken(folders, tmp_path)
    f = folder / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    assert "missing tensors for llama: model.layers.1.mlp.up_proj.weight" in _error(folder)
    (folder / "tokenizer.json").unlink()
    assert "tokenizer.json: missing" in _error(folder)


def test_cli_reports_the_problem_without_a_traceback(folders, tmp_path) -> None:
    folder = _broken(folders, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = subprocess.run([sys.executable, "-m", "api.cli", "generate", "-m", str(folder), "-p", "hi", "-n", "2",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "corrupt safetensors header" in r.stderr and "Traceback" not in r.stderr


def test_cli_convert_and_generate(tmp_path) -> None:
    gguf = write_tiny_model(tmp_path / "t.gguf", vocab_size=1024)
    run = lambda *a: subprocess.run([sys.executable, "-m", "api.cli", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    r = run("convert", str(gguf), "-o", str(tmp_path / "out"), "--dtype", "f16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert run("convert", str(gguf), "-o", str(tmp_path / "out")).returncode == 1  # exists: no overwrite
    r = run("generate", "-m", str(tmp_path / "out"), "-p", "Hello", "-n", "4", "--temp", "0", "--device", "cpu",
            "--quantize", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "4 generated" in r.stderr


def test_registry_resolves_folders(folders, tmp_path) -> None:
    from engine.loading.registry import RegistryError, resolve

    assert resolve(str(folders["llama"])) == folders["llama"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="without config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(RegistryError, match="not found"):
        resolve(str(tmp_path / "nope"))


def test_serve_exits_with_the_load_error(folders, tmp_path) -> None:
    from server_fixture import free_port

    folder = _broken(folders, tmp_path)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    r = subprocess.run([sys.executable, "-m", "api.cli_serve", "-m", str(folder), "--port", str(free_port()),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "corrupt safetensors header" in r.stderr and str(folder / "model.safetensors") in r.stderr
    assert "Traceback" not in r.stderr


def test_tensors_the_model_has_no_place_for(folders, tmp_path) -> None:
    """An o_proj bias (a llama variant with attention_bias) would be silently dropped: an error instead."""
    from safetensors.torch import load_file, save_file

    folder = _broken(folders, tmp_path)
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # a buffer: ignored
    save_file(tensors, f)
    msg = _error(folder)
    assert "no place for: model.layers.0.self_attn.o_proj.bias" in msg and "inv_freq" not in msg


def test_quantize_setting_flag_env_and_validation() -> None:
    from api.cli_serve import add_serve_args, settings_from_args
    from api.server import SettingsError, load_settings

    assert load_settings(env={"LLAMATRON_QUANTIZE": "q4_k"}).engine_config().quantize == "q4_k"
    import argparse

    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert settings_from_args(p.parse_args(["some/folder", "--quantize", "q8_0"])).engine_config().quantize == "q8_0"
    with pytest.raises(SettingsError, match="quantize"):
        load_settings(cli={"quantize": "q3_k"}, env={})
    with pytest.raises(ValueError, match="quantize must be"):
        from engine.loading.loader import quant_type

        quant_type("q3_k", None, None)
