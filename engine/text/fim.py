"""Fill-in-the-middle: which tokens a vocabulary has for it, and llama.cpp's prompt layout.

Token discovery follows llama.cpp (src/llama-vocab.cpp, `llama_vocab::impl::load`): the ids in
the GGUF metadata (`tokenizer.ggml.fim_pre_token_id` ... `fim_sep_token_id`, and the deprecated
`prefix/suffix/middle_token_id`, which llama.cpp reads after and so lets win) where present and
inside the vocabulary, otherwise the token whose text is one of the known spellings
(`<|fim_prefix|>`, `<fim-prefix>`, `<PRE>`, ...; the table is engine/text/tokenizer_rules.py's,
which also makes fim_pad/rep/sep end-of-generation tokens).

The layout is llama-server's `format_prompt_infill` (tools/server/server-common.cpp), token for
token: the repo-level pattern of Qwen2.5-Coder (arxiv 2409.12186)

    [FIM_REP]myproject\\n [FIM_SEP]{filename}\\n{text} ... [FIM_SEP]filename\\n
    [BOS] [FIM_PRE]{prefix}{prompt} [FIM_SUF]{suffix} [FIM_MID]

with the prefix cut from the left to 3/4 of `n_batch`, the suffix cut from the right to the
quarter left after the prompt, and the extra context (its newest end) filling what the context
leaves after `n_batch` and twice `n_predict`. Without a FIM_SEP token the chunks are joined by a
"--- snippet ---" line; with `spm` the suffix part comes first. No HTTP here: api/infill.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .tokenizer import Tokenizer
from .tokenizer_rules import _FIM_TEXTS as FIM_TEXTS

FIM_NAMES = ("fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep")
REQUIRED = ("fim_pre", "fim_suf", "fim_mid")
_DEPRECATED_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
REPO_NAME = "myproject\n"  # llama.cpp: "TODO: make project name an input"
CURRENT_FILE = "filename\n"  # llama.cpp: "TODO: current filename"
DEFAULT_CHUNK_FILENAME = "tmp"
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"


class FimUnsupported(ValueError):
    """The vocabulary lacks FIM tokens; `missing` names them (fim_pre, fim_suf, fim_mid)."""

    def __init__(self, missing: list[str], spellings: dict[str, tuple[str, ...]]) -> None:
        self.missing = missing
        said = " ".join(f"{_WORDS[name]} token is missing." for name in missing)  # llama-server's words
        looked = "; ".join(f"{name}: tokenizer.ggml.{name}_token_id or a token {' / '.join(spellings[name][:4])} ..."
                           for name in missing)
        super().__init__(f"Infill is not supported by this model: {said} (looked for {looked})")


_WORDS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}


@dataclass(frozen=True)
class FimTokens:
    pre: int | None = None
    suf: int | None = None
    mid: int | None = None
    pad: int | None = None
    rep: int | None = None
    sep: int | None = None

    def get(self, name: str) -> int | None:
        return getattr(self, name.removeprefix("fim_"))

    @property
    def missing(self) -> list[str]:
        return [name for name in REQUIRED if self.get(name) is None]

    def require(self) -> "FimTokens":
        """self, or FimUnsupported naming the missing prefix/suffix/middle tokens."""
        if self.missing:
            raise FimUnsupported(self.missing, FIM_TEXTS)
        return self

    @property
    def end_ids(self) -> set[int]:
        """The FIM tokens that end a generation (llama.cpp adds pad, rep and sep to its EOG set)."""
        return {t for t in (self.pad, self.rep, self.sep) if t is not None}


def find_fim_tokens(tokenizer: Tokenizer, meta: Mapping[str, Any] | None = None) -> FimTokens:
    """The FIM token ids of a vocabulary: metadata ids first, else by text (see module doc)."""
    meta = meta or {}
    n = tokenizer.vocab_size
    lookup = tokenizer.hf.token_to_id

    def by_key(name: str) -> int | None:
        found = None
        for key in (f"tokenizer.ggml.{name}_token_id", f"tokenizer.ggml.{_DEPRECATED_KEYS.get(name)}_token_id"):
            v = meta.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
                found = int(v)  # a later key overrides an earlier one, as llama.cpp's loop does
        return found

    def by_text(name: str) -> int | None:
        ids = []
        for text in FIM_TEXTS[name]:
            i = lookup(text)
            if i is not None and 0 <= i < n and tokenizer.id_to_token(i) == text:
                ids.append(i)
        return min(ids) if ids else None  # as tokenizer_rules.eog_ids picks among spellings

    ids = {}
    for name in FIM_NAMES:
        i = by_key(name)
        ids[name.removeprefix("fim_")] = i if i is not None else by_text(name)
    return FimTokens(**ids)


Mixed = str | Sequence[str | int]


def tokenize_mixed(tokenizer: Tokenizer, value: Mixed) -> list[int]:
    """llama-server's tokenize_mixed(value, add_special=false, parse_special=false): a string, or a
    list of strings (tokenized as plain text) and token ids (kept)."""
    if isinstance(value, str):
        return tokenizer.encode(value, add_special=False, parse_special=False) if value else []
    out: list[int] = []
    for part in value:
        if isinstance(part, str):
            out += tokenizer.encode(part, add_special=False, parse_special=False) if part else []
        else:
            out.append(int(part))
    return out


@dataclass(frozen=True)
class ExtraChunk:
    text: str
    filename: str = DEFAULT_CHUNK_FILENAME


def _plain(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special=False, parse_special=False) if text else []


def extra_context(tokenizer: Tokenizer, fim: FimTokens, chunks: Sequence[ExtraChunk]) -> list[int]:
    """The repo-level context before the FIM prefix (all of it; fim_layout keeps its tail)."""
    out: list[int] = []
    if fim.rep is not None:
        out += [fim.rep, *_plain(tokenizer, REPO_NAME)]
    for chunk in chunks:
        if fim.sep is not None:
            out += [fim.sep, *_plain(tokenizer, chunk.filename + "\n")]
        else:
            out += _plain(tokenizer, SNIPPET_SEPARATOR)
        out += _plain(tokenizer, chunk.text)
    if fim.sep is not None:
        out += [fim.sep, *_plain(tokenizer, CURRENT_FILE)]
    return out


@dataclass(frozen=True)
class FimPrompt:
    token_ids: list[int]
    n_prefix: int  # prefix tokens kept (of n_prefix_total)
    n_suffix: int
    n_extra: int
    n_prefix_total: int
    n_suffix_total: int
    n_extra_total: int

    @property
    def truncated(self) -> bool:
        return (self.n_prefix, self.n_suffix, self.n_extra) != (self.n_prefix_total, self.n_suffix_total,
                                                                 self.n_extra_total)


def fim_layout(tokenizer: Tokenizer, fim: FimTokens, prefix: Mixed, suffix: Mixed,
               extra: Sequence[ExtraChunk] = (), prompt_ids: Sequence[int] = (), *, n_batch: int,
               n_predict: int, n_ctx: int, spm: bool = False) -> FimPrompt:
    """llama-server's format_prompt_infill for these inputs (see the module doc). Raises
    FimUnsupported when the vocabulary lacks a prefix, suffix or middle token."""
    fim.require()
    tokens_prefix = tokenize_mixed(tokenizer, prefix)
    tokens_suffix = tokenize_mixed(tokenizer, suffix)
    extra_tokens = extra_context(tokenizer, fim, extra)
    prompt_ids = list(prompt_ids)

    n_prefix_take = min(len(tokens_prefix), 3 * (n_batch // 4))
    n_suffix_take = min(len(tokens_suffix), max(0, n_batch // 4 - (2 + len(prompt_ids))))
    n_extra_take = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_tokens))

    head = [fim.pre, *tokens_prefix[len(tokens_prefix) - n_prefix_take:], *prompt_ids]
    tail = [fim.suf, *tokens_suffix[:n_suffix_take]]
    first, second = (tail, head) if spm else (head, tail)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    ids = [*extra_tokens[len(extra_tokens) - n_extra_take:], *bos, *first, *second, fim.mid]
    return FimPrompt(ids, n_prefix_take, n_suffix_take, n_extra_take, len(tokens_prefix), len(tokens_suffix),
                     len(extra_tokens))
