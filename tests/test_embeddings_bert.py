"""all-MiniLM-L6-v2 (a BERT encoder from the registry, a Hugging Face folder) served for
/v1/embeddings: the vectors equal sentence-transformers' (cosine >= 0.9999 on 20 sentences;
measured min 0.999999+), the encoder embeds only (generation routes answer 400), it needs no
--embeddings flag, /v1/models shows the format, and an input past the model's 256 tokens is a 400.
"""

from __future__ import annotations

import os

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

from server_fixture import loaded_model, start_server

SENTENCES = [
    "The cat sits on the mat.", "A man is playing a guitar on stage.", "Paris is the capital of France.",
    "The weather today is sunny with a light breeze.", "def add(a, b):\n    return a + b",
    "Quantum computers use qubits instead of bits.", "I love eating fresh strawberries in summer!",
    "The stock market fell sharply on Monday.", "¿Dónde está la biblioteca?", "Der schnelle braune Fuchs.",
    "Machine learning models need a lot of data.", "She walked her dog along the beach at sunset.",
    "HTTP 404 means the resource was not found.", "A quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light into chemical energy.", "The meeting was moved to 3 PM on Thursday.",
    "Emoji test: 🦙 llamas are great 🎉", "Tokyo is one of the largest cities in the world.",
    "Please restart the server after updating the config.", "   Leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def minilm():
    return loaded_model("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def srv(minilm):
    s = start_server(minilm, alias="")  # no --embeddings: an encoder implies it
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv) -> OpenAI:
    return OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def test_embeddings_match_sentence_transformers(minilm, client) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: set it first
    st = pytest.importorskip("sentence_transformers")
    ref = torch.tensor(st.SentenceTransformer(str(minilm.path), device="cpu").encode(SENTENCES))
    r = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES)
    ours = torch.tensor([d.embedding for d in r.data])
    assert ours.shape == (20, 384)
    cos = torch.nn.functional.cosine_similarity(ours.double(), ref.double())
    print(f"all-MiniLM-L6-v2 vs sentence-transformers: cosine min {cos.min():.7f} over {len(cos)} sentences")
    assert (cos >= 0.9999).all(), cos
    assert r.usage.prompt_tokens == sum(len(minilm.tokenizer.encode(s)) for s in SENTENCES)


def test_encoder_embeds_only(srv, client) -> None:
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="all-minilm-l6-v2", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4)
    assert "embeddings only" in str(e.value)
    with pytest.raises(BadRequestError):
        client.completions.create(model="all-minilm-l6-v2", prompt="hi", max_tokens=4)
    r = httpx.post(srv.base_url + "/completion", json={"prompt": "hi", "n_predict": 4}, timeout=30)
    assert r.status_code == 400 and "embeddings only" in r.json()["error"]["message"]


def test_models_card_shows_the_format(srv) -> None:
    card = httpx.get(srv.base_url + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == "all-minilm-l6-v2"
    assert card["meta"]["format"] == "safetensors" and card["meta"]["arch"] == "bert"
    assert card["meta"]["n_ctx"] == 256  # sentence_bert_config.json's max_seq_length


def test_input_past_the_context_is_a_400(client) -> None:
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model="all-minilm-l6-v2", input=["ok", "word " * 300])
    assert e.value.body["param"] == "input[1]" and e.value.body["code"] == "context_length_exceeded"


def test_whole_inputs_share_steps(minilm) -> None:
    """Encoder inputs are never chunked: a budget smaller than two inputs runs them in turn, and a
    long input still gets a whole step (the budget grows to the context)."""
    from engine.core.pooling import PoolingParams
    from synth import make_engine

    eng = make_engine(minilm, max_num_batched_tokens=64)
    assert eng.scheduler.max_num_batched_tokens >= eng.config.max_model_len == 256
    long = "word " * 200
    vecs = eng.embed([long, "short one", long], PoolingParams("mean"))
    alone = eng.embed([long], PoolingParams("mean"))
    torch.testing.assert_close(torch.tensor(vecs[0]), torch.tensor(alone[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(vecs[2]), torch.tensor(alone[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,quantize", [("torch", None), ("triton", None), ("cpu", "q8_0")])
def test_encoder_on_every_backend(minilm, kind, quantize) -> None:
    """The same hidden states on every backend that can be selected (the Triton one in the
    interpreter here; dense fp32 matrices through torch.matmul), and close with Q8_0 weights."""
    from engine.encoder import Encoder
    from engine.loading.hf_folder import open_hf_folder
    from engine.loading.quantize import QUANTIZE_TYPES
    from kernels import AttentionMetadata, backend

    folder = open_hf_folder(minilm.path)
    ops = backend(kind)
    enc = Encoder.from_weights(folder.weights(QUANTIZE_TYPES.get(quantize)), folder.config, ops)
    seqs = [minilm.tokenizer.encode(s) for s in SENTENCES[:3]]
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(ids), dtype=torch.long), block_tables=torch.zeros(3, 1),
                             seq_lens=cu[1:] - cu[:-1], cu_seqlens_q=cu, max_seqlen_q=0, max_seqlen_k=0)
    got = enc.forward(ids, pos, meta, []).float()
    want = minilm.model.forward(ids, pos, meta, []).float()
    cos = torch.nn.functional.cosine_similarity(got, want).min()
    assert cos >= (0.999 if quantize else 0.99999), cos
