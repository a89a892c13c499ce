"""engine/text/hf_tokenizer.py on a tokenizer.json that our builder did not write (BERT's WordPiece
from the all-minilm-l6-v2 folder) and on the rules a Hugging Face folder states in its files:
BOS/EOS from the post-processor or tokenizer_config.json, stop ids from generation_config.json,
padding to the model's vocabulary, padding/truncation in tokenizer.json switched off."""

from __future__ import annotations

import json

import pytest

from engine.text.hf_tokenizer import from_hf_files
from engine.text.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def minilm_files():
    from conftest import model_file

    folder = model_file("all-minilm-l6-v2")
    return (folder / "tokenizer.json").read_text(), json.loads((folder / "tokenizer_config.json").read_text())


def test_wordpiece_as_sentence_transformers_tokenizes(minilm_files) -> None:
    transformers = pytest.importorskip("transformers")
    from conftest import model_file

    tj, tc = minilm_files
    tok = from_hf_files(tj, tc)
    ref = transformers.AutoTokenizer.from_pretrained(model_file("all-minilm-l6-v2"))
    long = "Tokenizers split words into pieces. " * 40  # tokenizer.json pads/truncates at 128: not here
    for text in ("Hello, World!", "unaffable naïve café", long, "[SEP] is parsed as transformers does"):
        assert tok.encode(text) == ref(text)["input_ids"]
    assert 102 not in tok.encode("[SEP] stays text", add_special=False, parse_special=False)
    assert (tok.bos_token, tok.eos_token, tok.add_bos, tok.add_eos) == ("[CLS]", "[SEP]", True, True)
    assert tok.encode("[MASK]", add_special=False) == [103] and tok.is_special(103)
    ids = tok.encode("the unaffable fox", add_special=False)
    assert tok.decode(ids) == "the unaffable fox"
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) + d.flush() == " the unaffable fox"  # each word after a space


def test_stop_ids_bos_eos_and_padding(minilm_files) -> None:
    tj, tc = minilm_files
    tok = from_hf_files(tj, {**tc, "add_bos_token": False, "eos_token": "[MASK]", "add_eos_token": False},
                        {"eos_token_id": [102, 100]}, vocab_size=30530)
    assert not tok.add_bos and tok.eos_id == 103 and {102, 100, 103} <= tok.eog_ids
    assert tok.encode("hi") == tok.encode("hi", add_special=False)
    assert tok.vocab_size == 30530 and tok.token_bytes(30525) == b"" and not tok.is_special(30525)
    with pytest.raises(ValueError, match="add_bos"):
        from_hf_files(tj, {"add_bos_token": True})
