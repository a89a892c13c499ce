"""GGUF vocabulary -> `tokenizers.Tokenizer` that matches llama.cpp token for token.

llama.cpp (src/llama-vocab.cpp) is the reference for every rule (tables in tokenizer_rules.py):
- special-token partition first: CONTROL / UNKNOWN tokens are cut out of the text only when
  parse_special is on, USER_DEFINED tokens always. Here they are HF added tokens (special=True
  for control/unknown, so `encode_special_tokens` turns them back into plain text).
- BPE (`tokenizer.ggml.model = gpt2`): the regex list llama.cpp uses for `tokenizer.ggml.pre`,
  each a `Split(..., "isolated")`, then byte-level BPE over the GGUF merges.
- SPM (`tokenizer.ggml.model = llama`, gemma too): spaces become "▁" (plus a leading "▁" per text
  fragment when add_space_prefix), then SentencePiece-BPE: repeatedly merge the adjacent pair whose
  concatenation is the highest-scoring vocabulary entry; leftovers fall back to <0xXX> bytes.
  GGUF stores scores, not merges, so the merges are derived: every two-piece split of every token,
  ranked by the merged token's score (ties by id). Gemma's whitespace runs ("\\n\\n", "    ")
  are USER_DEFINED tokens, so the partition takes them before the model sees the text.
Decoding is done here from per-token byte pieces (llama.cpp's token_to_piece), not by `tokenizers`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .tokenizer_rules import (BYTE, BYTE_DECODER, CONTROL, NORMAL, TYPE_ATTR, UNKNOWN, USER_DEFINED,
                              clean_spaces, eog_ids, gguf_merges, pre_tokenizer, rstrip_ids)

_BYTE_TRANSLATE = {ord(c): b for c, b in BYTE_DECODER.items()}


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> tuple[list[int], list[int]]:
    """Every split of a token into two vocabulary entries (as id pairs), best merged-token score
    first. SentencePiece-BPE merges the adjacent pair whose concatenation scores highest; ranking
    merges by that score makes HF's lowest-rank-first BPE do the same."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist()
    left: list[int] = []
    right: list[int] = []
    get = vocab.get
    for i in order:
        s = tokens[i]
        for k in range(1, len(s)):
            a = get(s[:k])
            if a is not None:
                b = get(s[k:])
                if b is not None:
                    left.append(a)
                    right.append(b)
    return left, right


def _cached_spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int],
                       cache: bool) -> list[tuple[str, str]]:
    """`_spm_merges`, kept on disk by content hash: deriving costs ~1.5 s of CPU for a 262k
    vocabulary, reading back ~0.05 s. Best effort: an unwritable directory means no cache."""
    path = None
    if cache:
        h = hashlib.sha256("\x00".join(tokens).encode("utf-8", "surrogatepass"))
        h.update(np.asarray(scores, dtype=np.float32).tobytes())
        root = Path(os.environ.get("LLAMATRON_HOME", "~/.cache/llamatron")).expanduser()
        path = root / "tokenizer-merges" / f"{h.hexdigest()[:32]}.npy"
    ids = None
    if path is not None and path.is_file():
        try:
            ids = np.load(path)
            if ids.ndim != 2 or ids.shape[0] != 2 or (ids.size and ids.max() >= len(tokens)):
                ids = None
        except (OSError, ValueError):
            ids = None
    if ids is None:
        ids = np.array(_spm_merges(tokens, scores, vocab), dtype=np.int32).reshape(2, -1)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, ids)
                os.replace(tmp, path)
            except OSError:
                pass
    get = tokens.__getitem__
    return list(zip(map(get, ids[0].tolist()), map(get, ids[1].tolist())))


class Tokenizer:
    """A GGUF vocabulary as llama.cpp tokenizes and detokenizes it (see module docstring)."""

    def __init__(self, hf: HFTokenizer, tokens: list[str], attrs: list[int], spm: bool, *,
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, clean_spaces: bool, eog_ids: set[int],
                 rstrip_ids: frozenset[int] = frozenset(), pad_id: int | None = None,
                 wordpiece: bool = False) -> None:
        """`spm`: pieces in SentencePiece style ("▁" is a space, <0xXX> bytes), else byte-level BPE;
        `wordpiece`: BERT's pieces ("##" continues a word, others start one after a space)."""
        self.hf = hf
        self._tokens = tokens
        self._attrs = attrs
        self._spm = spm
        self._wordpiece = wordpiece
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_token = tokens[bos_id] if bos_id is not None else ""
        self.eos_token = tokens[eos_id] if eos_id is not None else ""
        self.add_bos, self.add_eos = add_bos, add_eos
        self.pad_id = pad_id  # only reported (GET /tokenizer_info); never added
        self.eog_ids = eog_ids
        self._add_space_prefix = add_space_prefix
        self._clean = clean_spaces
        self.rstrip_ids = rstrip_ids  # added tokens that swallow the whitespace after them
        # no token's text covers more characters than this: a prompt longer than
        # context x this is too long without tokenizing it
        self.max_token_chars = max(map(len, tokens), default=1)
        self._pieces: list[bytes | None] = [None] * len(tokens)  # filled lazily: cheap start-up
        self._lock = threading.Lock()  # encode_special_tokens is shared state of the HF object

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from ..loading.gguf import read_metadata

        return cls.from_gguf_metadata(read_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, merge_cache: bool = True) -> "Tokenizer":
        """Build from GGUF key/values. SPM merges derived from scores are cached on disk
        (under $LLAMATRON_HOME/tokenizer-merges) unless merge_cache is False."""
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (gpt2 and llama are)")
        spm = model == "llama"
        tokens = list(meta["tokenizer.ggml.tokens"])
        if not all(tokens):
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp
        n = len(tokens)
        types = np.asarray(meta.get("tokenizer.ggml.token_type", [1] * n), dtype=np.int64)
        attrs = np.asarray(TYPE_ATTR)[np.where((types >= 0) & (types <= 6), types, 0)].tolist()
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            raise ValueError("duplicate token in GGUF vocabulary")

        def key_id(name: str, default: int | None) -> int | None:
            v = meta.get(f"tokenizer.ggml.{name}_token_id")
            if v is not None and 0 <= v < n:
                return int(v)
            return default if default is not None and default < n else None

        if spm:
            clean, add_bos = False, True
            bos_id, eos_id = key_id("bos", 1), key_id("eos", 2)
        else:
            regexes, ignore_merges, clean, add_bos = pre_tokenizer(meta.get("tokenizer.ggml.pre"))
            # llama.cpp's BPE default ids are 11 (GPT-2's ","); GLM has no default BOS
            glm = meta.get("tokenizer.ggml.pre") in ("glm4", "chatglm-bpe")
            bos_id, eos_id = key_id("bos", None if glm else 11), key_id("eos", 11)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", spm))
        if (add_bos and bos_id is None) or (add_eos and eos_id is None):
            raise ValueError("tokenizer.ggml.add_bos/eos_token is true but that token is not set")
        eog = eog_ids(tokens, attrs, vocab, eos_id, key_id)

        if spm:
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
            unk = key_id("unknown", 0)
            hf = HFTokenizer(models.BPE(vocab, _cached_spm_merges(tokens, scores, vocab, merge_cache),
                                        byte_fallback=True, fuse_unk=True,
                                        unk_token=tokens[unk] if unk is not None else None))
            norm = [normalizers.Replace(" ", "▁")]
            dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if add_space_prefix:
                norm.insert(0, normalizers.Prepend("▁"))
                dec.append(decoders.Strip(" ", 1, 0))
            hf.normalizer = normalizers.Sequence(norm)
            hf.decoder = decoders.Sequence(dec)
        else:
            merges = gguf_merges(meta["tokenizer.ggml.merges"])
            try:
                bpe = models.BPE(vocab, merges, ignore_merges=ignore_merges)
            except Exception:  # a merge naming a token outside the vocabulary: llama.cpp ignores it
                merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
                bpe = models.BPE(vocab, merges, ignore_merges=ignore_merges)
            hf = HFTokenizer(bpe)
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            hf.decoder = decoders.ByteLevel()

        # the partition llama.cpp runs before the model: control/unknown (special) and user-defined
        a = np.asarray(attrs)
        rstrip = rstrip_ids(meta, tokens, attrs)
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False, rstrip=i in rstrip)
                               for i in np.nonzero(a & (CONTROL | UNKNOWN))[0].tolist()])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False, rstrip=i in rstrip)
                       for i in np.nonzero(((a & USER_DEFINED) != 0) & ((a & (CONTROL | UNKNOWN)) == 0))[0].tolist()])
        return cls(hf, tokens, attrs, spm, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                   add_eos=add_eos, add_space_prefix=add_space_prefix, clean_spaces=clean, eog_ids=eog,
                   rstrip_ids=frozenset(rstrip), pad_id=key_id("padding", None))

    @property
    def clean_up_spaces(self) -> bool:
        """Whether decode runs llama.cpp's clean_spaces passes (" ." -> ".")."""
        return self._clean

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama_tokenize: add_special adds BOS/EOS as the metadata says; parse_special lets
        control-token text ("<|im_start|>") become the token (user-defined ones always do)."""
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (legal in JSON strings): U+FFFD each
                text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        with self._lock:
            self.hf.encode_special_tokens = not parse_special
            try:
                ids = self.hf.encode(text, add_special_tokens=False).ids
            finally:
                self.hf.encode_special_tokens = False
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """llama.cpp's token_to_piece as bytes; control/unknown tokens are empty unless `special`."""
        if not special and self._attrs[token_id] & (CONTROL | UNKNOWN):
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._make_piece(token_id)
        return piece

    def _make_piece(self, token_id: int) -> bytes:
        text, attr = self._tokens[token_id], self._attrs[token_id]
        if attr & (CONTROL | UNKNOWN | USER_DEFINED):
            return text.encode()
        if attr & NORMAL:
            if self._spm:
                return text.replace("▁", " ").encode()
            if self._wordpiece:
                return (text[2:] if text.startswith("##") else " " + text).encode()
            try:  # byte-level alphabet -> raw bytes, in C
                return text.translate(_BYTE_TRANSLATE).encode("latin-1")
            except UnicodeEncodeError:  # a char outside the alphabet: keep it as UTF-8
                return b"".join(bytes([BYTE_DECODER[c]]) if c in BYTE_DECODER else c.encode()
                                for c in text)
        if attr & BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens print nothing in llama.cpp

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """llama.cpp's detokenize; skip_special drops control tokens and an added BOS/EOS
        (remove_special + !unparse_special), otherwise control tokens show as their text."""
        ids = list(ids)
        remove_space = self._add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = [self.token_bytes(i, not skip_special) for i in ids]
        if remove_space and parts and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        out = b"".join(parts)
        if self._clean:
            out = clean_spaces(out)
        return out.decode("utf-8", "replace")

    def token_piece(self, token_id: int) -> str | list[int]:
        """The piece as llama-server's /tokenize with_pieces shows it: the text when the token's
        bytes are valid UTF-8 on their own, else the list of byte values."""
        b = self.token_bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return list(b)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def special_ids(self) -> list[int]:
        """Control (and unknown) tokens: the ones whose text becomes the token only with parse_special."""
        return [i for i, a in enumerate(self._attrs) if a & (CONTROL | UNKNOWN)]

    def is_special(self, token_id: int) -> bool:
        """Control (and unknown) tokens: hidden by skip_special, parsed only with parse_special."""
        return bool(self._attrs[token_id] & (CONTROL | UNKNOWN))


class IncrementalDetokenizer:
    """Streams text token by token, holding back the bytes of a UTF-8 character not yet complete.

    add() costs O(piece length): pieces are cached bytes and only the short undecoded tail (at
    most 3 bytes) is carried between calls."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._pending = b""
        self._parts: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text is None:
            self._text = "".join(self._parts)
            self._parts = [self._text]
        return self._text

    def _emit(self, s: str) -> str:
        if s:
            self._parts.append(s)
            self._text = None
        return s

    def add(self, token_id: int) -> str:
        buf = self._pending + self.tokenizer.token_bytes(token_id, not self.skip_special)
        cut = len(buf)
        for k in range(1, min(4, len(buf) + 1)):  # look back for the lead byte of the last char
            c = buf[-k]
            if c & 0xC0 == 0x80:
                continue  # continuation byte
            if c >= 0xC0:
                need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4 if c < 0xF8 else 1
                if need > k:
                    cut = len(buf) - k  # incomplete: hold it back
            break
        self._pending = buf[cut:]
        return self._emit(buf[:cut].decode("utf-8", "replace"))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        buf, self._pending = self._pending, b""
        return self._emit(buf.decode("utf-8", "replace"))
