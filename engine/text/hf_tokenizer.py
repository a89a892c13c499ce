"""A Hugging Face folder's tokenizer (tokenizer.json + tokenizer_config.json + generation_config.json)
as our `Tokenizer`, so the incremental detokenizer, llguidance (`to_str()`), FIM token discovery and
token_bytes work on it exactly as on a GGUF vocabulary.

tokenizer.json is loaded with the `tokenizers` library as it is (its padding and truncation
switched off: a server never pads one prompt). What GGUF says in token types is read from the
file's own structure: added tokens marked `special` are CONTROL (parsed only with parse_special,
hidden by skip_special), other added tokens USER_DEFINED, `<0xXX>` pieces of a byte-fallback model
BYTE, the unknown token UNKNOWN. The piece style (how a token's text becomes bytes) follows the
model: byte-level BPE (GPT-2 alphabet), SentencePiece ("▁" is a space) or WordPiece ("##" joins).
BOS/EOS come from tokenizer_config.json, else from the post-processor's template (BERT's
[CLS] ... [SEP]); generation_config.json's eos_token_id entries are end-of-generation tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .tokenizer import Tokenizer
from .tokenizer_rules import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, eog_ids

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_text(value: Any) -> str | None:
    """A tokenizer_config token entry: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_specials(post: dict | None) -> tuple[str | None, str | None]:
    """(token before $A, token after $A) of the single-sequence post-processor template."""
    if not post:
        return None, None
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            got = _template_specials(p)
            if got != (None, None):
                return got
        return None, None
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return post["cls"][0], post["sep"][0]
    if post.get("type") != "TemplateProcessing":
        return None, None
    single = post.get("single", [])
    seq = next((i for i, p in enumerate(single) if "Sequence" in p), len(single))
    before = [p["SpecialToken"]["id"] for p in single[:seq] if "SpecialToken" in p]
    after = [p["SpecialToken"]["id"] for p in single[seq + 1:] if "SpecialToken" in p]
    return (before[0] if before else None), (after[-1] if after else None)


def _add_space_prefix(spec: dict) -> bool:
    """SentencePiece's leading "▁" per text: a Prepend normalizer or a Metaspace that prepends."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend":
                return True
            if node.get("type") == "Metaspace":
                return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))


def from_hf_files(tokenizer_json: str, config: dict[str, Any], generation: dict[str, Any] | None = None,
                  vocab_size: int = 0) -> Tokenizer:
    """Our Tokenizer from tokenizer.json's text, tokenizer_config.json and generation_config.json.
    `vocab_size`: the model's logits width; ids past the tokenizer's own (checkpoints pad their
    embedding to a round size) are unused tokens that print nothing, as in llama.cpp."""
    spec = json.loads(tokenizer_json)
    hf = HFTokenizer.from_str(tokenizer_json)
    hf.no_padding()
    hf.no_truncation()
    n = hf.get_vocab_size(with_added_tokens=True)
    tokens = [hf.id_to_token(i) or f"[EMPTY_{i}]" for i in range(n)]
    vocab = {t: i for i, t in enumerate(tokens)}
    padded = max(n, vocab_size)
    tokens += [f"[PAD_{i}]" for i in range(n, padded)]
    model = spec.get("model", {})
    kind = model.get("type")
    spm = kind == "BPE" and bool(model.get("byte_fallback"))
    attrs = [NORMAL] * n + [UNUSED] * (padded - n)
    if spm:
        for i, t in enumerate(tokens):
            if _BYTE_PIECE.fullmatch(t):
                attrs[i] = BYTE
    unk = model.get("unk_token")
    if unk in vocab:
        attrs[vocab[unk]] = UNKNOWN
    rstrip = set()
    for a in spec.get("added_tokens", []):
        i = a["id"]
        if 0 <= i < n:
            attrs[i] = (UNKNOWN if attrs[i] == UNKNOWN else CONTROL) if a.get("special") else USER_DEFINED
            if a.get("rstrip"):
                rstrip.add(i)

    def tid(key: str) -> int | None:
        text = token_text(config.get(key))
        return vocab.get(text) if text else None

    tmpl_bos, tmpl_eos = _template_specials(spec.get("post_processor"))
    bos_id = tid("bos_token") if tid("bos_token") is not None else tid("cls_token")
    eos_id = tid("eos_token") if tid("eos_token") is not None else tid("sep_token")
    add_bos = config.get("add_bos_token")
    add_eos = config.get("add_eos_token")
    if add_bos is None:
        add_bos = tmpl_bos is not None
        bos_id = vocab.get(tmpl_bos, bos_id) if tmpl_bos else bos_id
    if add_eos is None:
        add_eos = tmpl_eos is not None
        eos_id = vocab.get(tmpl_eos, eos_id) if tmpl_eos else eos_id
    if (add_bos and bos_id is None) or (add_eos and eos_id is None):
        raise ValueError("tokenizer_config.json: add_bos/eos_token is true but that token is not in the vocabulary")
    eog = eog_ids(tokens, attrs, vocab, eos_id, lambda name, default: None)
    gen_eos = (generation or {}).get("eos_token_id")
    eog |= {int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if isinstance(i, int) and 0 <= i < n}
    wordpiece = kind == "WordPiece"
    return Tokenizer(hf, tokens, attrs, spm, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos),
                     add_eos=bool(add_eos), add_space_prefix=wordpiece or (spm and _add_space_prefix(spec)),
                     clean_spaces=bool(config.get("clean_up_tokenization_spaces", False)), eog_ids=eog,
                     rstrip_ids=frozenset(rstrip), pad_id=tid("pad_token"), wordpiece=wordpiece)
