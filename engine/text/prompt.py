"""A chat prompt as token ids, with message content kept as data.

The template's own markup (`<|im_start|>`, `<start_of_turn>`) must become control tokens, but the
same text typed by a user must not, or a message could forge a system turn. So before rendering,
every control-token string inside the messages and tools is replaced by a placeholder character
from Unicode's Supplementary Private Use Area-A (templates copy such characters untouched, and
`trim`/`tojson` leave them alone); the rendered prompt is then cut at the template's control
tokens, each piece in between gets its placeholders back and is tokenized as plain text. The
tokenizer cuts at control tokens and encodes the pieces between them independently anyway, so a
prompt without such strings in its content tokenizes exactly as before (and takes the one-call
path). `special_in_content=True` keeps llama-server's behaviour: the whole prompt is parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .chat import ChatTemplate
from .chat_sandbox import RENDER_TIMEOUT_S
from .tokenizer import Tokenizer

PUA_BASE, PUA_SIZE = 0xF0000, 65534  # U+F0000 .. U+FFFFD
_PUA = "[\U000F0000-\U000FFFFD]"


@dataclass
class ChatPrompt:
    text: str  # the rendered prompt, as the template produced it
    token_ids: list[int]


def trie_regex(words: list[str]) -> str:
    """A regex matching any of `words`, longest first at each position (as the tokenizer's
    leftmost-longest split does), in time independent of how many words there are."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


class ContentEscaper:
    """Per tokenizer: finds control-token strings (and stray placeholder characters) in data."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        texts = {tokenizer.id_to_token(i): i for i in tokenizer.special_ids()}
        self.special_id = texts
        words = sorted(texts)
        self.specials = re.compile(trie_regex(words)) if words else None
        self.data = re.compile(f"{trie_regex(words)}|{_PUA}" if words else _PUA)


_escapers: dict[int, tuple[Tokenizer, ContentEscaper]] = {}


def escaper(tokenizer: Tokenizer) -> ContentEscaper:
    hit = _escapers.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _escapers[id(tokenizer)] = (tokenizer, ContentEscaper(tokenizer))
    return hit[1]


class _Escape:
    """Replaces each match in the strings of a message tree by a placeholder; remembers what."""

    def __init__(self, esc: ContentEscaper) -> None:
        self.esc, self.table = esc, []

    def _sub(self, m: re.Match) -> str:
        if len(self.table) >= PUA_SIZE:
            raise ValueError(f"the messages hold more than {PUA_SIZE} control-token strings")
        self.table.append(m.group())
        return chr(PUA_BASE + len(self.table) - 1)

    def tree(self, v: Any, key: str = "") -> Any:
        if isinstance(v, str):
            return v if key in ("role", "type") else self.esc.data.sub(self._sub, v)
        if isinstance(v, dict):
            return {k: self.tree(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [self.tree(x) for x in v]
        return v

    def restore(self, text: str) -> str:
        return re.sub(_PUA, lambda m: self.table[ord(m.group()) - PUA_BASE]
                      if ord(m.group()) - PUA_BASE < len(self.table) else m.group(), text)


def encode_chat(template: ChatTemplate, tokenizer: Tokenizer, messages: list[dict], *,
                add_generation_prompt: bool = True, tools: list[dict] | None = None,
                template_kwargs: dict[str, Any] | None = None, timeout_s: float = RENDER_TIMEOUT_S,
                special_in_content: bool = False) -> ChatPrompt:
    """Renders and tokenizes a conversation (see the module docstring). Raises TemplateError."""
    if special_in_content:
        text = template.render(messages, add_generation_prompt, tools, template_kwargs, timeout_s)
        return ChatPrompt(text, tokenizer.encode(text, add_special=True, parse_special=True))
    esc = _Escape(escaper(tokenizer))
    escaped = template.render(esc.tree(messages), add_generation_prompt, esc.tree(tools) if tools else tools,
                              template_kwargs, timeout_s)
    if not esc.table:
        return ChatPrompt(escaped, tokenizer.encode(escaped, add_special=True, parse_special=True))
    return ChatPrompt(esc.restore(escaped), encode_pieces(tokenizer, esc.esc, escaped, esc.restore))


def encode_pieces(tokenizer: Tokenizer, esc: ContentEscaper, text: str, restore: Any = None) -> list[int]:
    """Tokenizes `text` cut at its control tokens, the pieces between them as plain text (after
    `restore`): what tokenizer.encode(add_special=True, parse_special=True) does, except that
    control-token strings hidden behind placeholders stay text."""
    ids: list[int] = [tokenizer.bos_id] if tokenizer.add_bos else []
    pos, strip = 0, False
    for m in esc.specials.finditer(text) if esc.specials is not None else ():
        ids += _plain(tokenizer, text[pos:m.start()], restore, strip)
        tid = esc.special_id[m.group()]
        ids.append(tid)
        pos, strip = m.end(), tid in tokenizer.rstrip_ids
    ids += _plain(tokenizer, text[pos:], restore, strip)
    if tokenizer.add_eos:
        ids.append(tokenizer.eos_id)
    return ids


def _plain(tokenizer: Tokenizer, piece: str, restore: Any, strip: bool) -> list[int]:
    if strip:
        piece = piece.lstrip()
    if restore is not None:
        piece = restore(piece)
    return tokenizer.encode(piece, add_special=False, parse_special=False) if piece else []
