"""llama.cpp's vocabulary rules as data, for engine/text/tokenizer.py.

Everything here mirrors `llama_vocab::impl::load` and `llm_tokenizer_bpe` in llama.cpp's
src/llama-vocab.cpp: the pre-tokenizer regex list and flags for each `tokenizer.ggml.pre` name,
token attributes, and the text-based detection of end-of-generation tokens (with the attribute
upgrades llama.cpp applies to them, which decide what parse_special and skip_special affect).
"""

from __future__ import annotations

import re
from typing import Callable

# llama.cpp token attributes (llama_token_attr bit flags); GGUF token_type t maps to TYPE_ATTR[t]
UNDEFINED, UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 0, 1, 2, 4, 8, 16, 32
TYPE_ATTR = [UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE]

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          + _CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
          r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"

# pre-tokenizer type -> (regexes applied in turn, ignore_merges, clean_spaces, add_bos default)
PRE_TYPES: dict[str, tuple[list[str], bool, bool, bool]] = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, True, False),
    "llama3": ([_LLAMA3], True, True, True),
    "dbrx": ([_LLAMA3], False, True, False),
    "chatglm4": ([_LLAMA3], False, True, False),
    "gpt2": ([_GPT2], False, True, False),
    "starcoder": ([r"\p{N}", _GPT2], False, True, False),
    "qwen2": ([_QWEN2], False, True, False),
    "qwen35": ([_QWEN35], False, False, False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, True, False),
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
                       False, False, False),
    "bloom": ([_BLOOM], False, True, False),
    "gpt4o": ([_GPT4O], False, False, False),
}
# tokenizer.ggml.pre name -> (pre-tokenizer type, clean_spaces override or None)
PRE_NAMES: dict[str, tuple[str, bool | None]] = {
    "default": ("default", None),
    **{n: ("llama3", None) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                     "pixtral", "midm-2.0", "lfm2")},
    **{n: ("dbrx", None) for n in ("dbrx", "smaug-bpe")},
    **{n: ("chatglm4", None) for n in ("glm4", "chatglm-bpe")},
    **{n: ("gpt2", None) for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                   "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4",
                                   "mpt", "olmo", "jais", "jina-v1-en", "jina-v2-code", "roberta-bpe")},
    **{n: ("gpt2", False) for n in ("trillion", "granite-docling")},
    **{n: ("starcoder", None) for n in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b")},
    **{n: ("starcoder", False) for n in ("smollm", "command-r")},
    **{n: ("qwen2", False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "hunyuan")},
    **{n: ("qwen2", None) for n in ("stablelm2", "megrez")},
    "qwen35": ("qwen35", None),
    "falcon": ("falcon", None),
    "deepseek-coder": ("deepseek-coder", None),
    "bloom": ("bloom", None), "gpt3-finnish": ("bloom", None), "poro-chat": ("bloom", False),
    **{n: ("gpt4o", None) for n in ("gpt-4o", "llama4")},
}


def pre_tokenizer(pre: str | None) -> tuple[list[str], bool, bool, bool]:
    """(regexes, ignore_merges, clean_spaces, add_bos default) for a BPE `tokenizer.ggml.pre`."""
    name = pre or "default"  # llama.cpp warns and uses 'default' when the key is missing
    if name not in PRE_NAMES:
        raise ValueError(f"unknown pre-tokenizer type: {name!r}")
    kind, clean_override = PRE_NAMES[name]
    regexes, ignore_merges, clean, add_bos = PRE_TYPES[kind]
    return regexes, ignore_merges, clean if clean_override is None else clean_override, add_bos


# llama.cpp's text-based detection of end-of-turn / FIM / end-of-generation tokens
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")


def eog_ids(tokens: list[str], attrs: list[int], vocab: dict[str, int], eos_id: int | None,
            key_id: Callable[[str, int | None], int | None]) -> set[int]:
    """End-of-generation ids as llama.cpp's load() finds them. Updates `attrs` in place the way
    llama.cpp does: every detected EOT/FIM/EOG token becomes CONTROL (so e.g. gemma's "</s>",
    typed USER_DEFINED in the file, is only parsed as a token when parse_special is on)."""
    def find(texts: tuple[str, ...]) -> int | None:
        found = [vocab[t] for t in texts if t in vocab]
        return min(found) if found else None

    def detect(name: str, texts: tuple[str, ...]) -> int | None:
        i = key_id(name, None)  # an id given in the metadata wins, without an attribute change
        if i is None:
            i = find(texts)
            if i is not None:
                attrs[i] |= CONTROL
        return i

    eot, eom = detect("eot", _EOT_TEXTS), detect("eom", ("<|eom_id|>",))
    fim = {name: detect(name, texts) for name, texts in _FIM_TEXTS.items()}
    eog = {fim[k] for k in ("fim_pad", "fim_rep", "fim_sep") if fim[k] is not None}
    for t in _EOG_TEXTS:
        if t in vocab:
            eog.add(vocab[t])
            attrs[vocab[t]] |= CONTROL
    for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always shown
        if t in vocab:
            attrs[vocab[t]] = USER_DEFINED
    eog |= {i for i in (eos_id, eot, eom) if i is not None}
    by_text = {tokens[i]: i for i in eog}
    # harmony-style vocabularies: "<|end|>" ends a message, not the generation
    if "<|end|>" in by_text and ({"<|return|>", "<|call|>"} <= by_text.keys()
                                 or {"<|calls|>", "<|flush|>"} <= by_text.keys()):
        eog.discard(by_text["<|end|>"])
        attrs[by_text["<|end|>"]] = USER_DEFINED
    if "</s>" in by_text and "<|tool_response>" in by_text:  # gemma4 / paddleocr
        eog.discard(by_text["</s>"])
        attrs[by_text["</s>"]] = NORMAL
    return eog


def rstrip_ids(meta: dict, tokens: list[str], attrs: list[int]) -> set[int]:
    """Special tokens that swallow the whitespace after them (llama.cpp's RSTRIP attribute, set by
    model name because GGUF does not carry it: phi-3 only)."""
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    ids = {i for i, a in enumerate(attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)}
    ids |= {i for i, t in enumerate(tokens) if t == "</s>"}
    return ids - {i for i, t in enumerate(tokens) if t in ("<unk>", "<s>", "<|endoftext|>")}


def gguf_merges(merges: list[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        p = m.find(" ", 1)  # as llama.cpp: the first space after position 0 separates the pair
        if p > 0:
            out.append((m[:p], m[p + 1:]))
    return out


def clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_spaces detokenizer passes (" ." -> ".", " ' " -> "'", " 's" -> "'s")."""
    text = re.sub(rb" (?=[?!.,])", b"", text)
    text = re.sub(rb" ' ", b"'", text)
    return re.sub(rb" (?='(?:[sm]|re|ve))", b"", text)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level char -> byte
