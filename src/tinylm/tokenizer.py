"""Tokenizers behind one interface: characters, byte-level BPE (HF `tokenizers`), and GPT-2's."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from tinylm.errors import TinyLMError

EOT = "<|endoftext|>"
CHAR_SEPARATOR = "\n\n"  # what separates documents for a character tokenizer (it has no end-of-text token)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


class CharTokenizer:
    """One token per character; the vocabulary is the corpus's sorted set of characters.

    Characters outside the vocabulary are an error that names them (no silent unknown token),
    so a prompt never turns into different text than the user typed. Encoding is a table lookup in
    NumPy (two ASCII characters per lookup), not a Python loop.
    """

    kind = "char"
    context_free = True  # a text may be cut anywhere and encoded in pieces

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise TinyLMError("A character tokenizer needs at least one character of text.")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._tables: tuple[np.ndarray, bytes] | None = None

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        return self.stoi.get("\n")

    def _lookup(self) -> tuple[np.ndarray, bytes]:
        """(ids by code point up to the largest one in the vocabulary, the byte table for
        bytes.translate); a character outside the vocabulary maps to the table dtype's largest value,
        never an id. The byte table maps an ASCII byte to its id (ASCII characters sort first, so their
        ids are below 128) and every other byte to a mark at 128 and above (_MARKS)."""
        if self._tables is None:
            codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
            dtype = np.dtype(np.uint16 if len(codes) < 2**16 else np.uint32)  # room for the mark
            by_code = np.full(int(codes[-1]) + 1, np.iinfo(dtype).max, dtype=dtype)
            by_code[codes] = np.arange(len(codes))
            table = bytearray(_MARKS)
            for c in codes[codes < 128].tolist():
                table[c] = int(by_code[c])
            self._tables = (by_code, bytes(table))
        return self._tables

    def encode_utf8(self, raw: bytes) -> np.ndarray | None:
        """The ids of the text whose UTF-8 bytes are `raw`, found without decoding it, in a narrow dtype
        (uint8 when every id fits: ASCII text, or at most 256 characters; else the code point table's).
        None when the bytes are not well-formed UTF-8 or hold a character outside the vocabulary:
        decoding them then says which, and where. One C pass (bytes.translate) maps each ASCII byte to
        its id and each lead byte to the mark of its length, dropping the continuation bytes; NumPy
        then computes the code point of each (rare) multi-byte character from its bytes and looks it
        up, with checks as strict as Python's decoder."""
        by_code, table = self._lookup()
        # one byte per character; a bytearray's translate drops bytes without reallocating its result
        # (bytes.translate shrinks its own, which fragmented the heap: peak RSS grew with the corpus)
        marked = bytearray(raw).translate(table, _CONTINUATION)
        per_char = np.frombuffer(marked, dtype=np.uint8)  # writable: multi-byte characters go in place
        if marked.isascii():  # every character a known ASCII one; else stray continuation bytes
            return per_char if len(marked) == len(raw) else None
        at = np.flatnonzero(per_char >= 0x80)  # the multi-byte characters, and any error mark
        more = per_char[at].astype(np.int64) - (_LEAD1 - 1)  # continuation bytes each one needs
        if more.min() < 1 or int(more.sum()) != len(raw) - len(marked):
            return None  # an unknown ASCII character, an invalid byte, or continuation bytes astray
        leads = at + (np.cumsum(more) - more)  # where each starts in `raw`
        if int((leads + more).max()) >= len(raw):
            return None
        u8 = np.frombuffer(raw, dtype=np.uint8)
        code = u8[leads].astype(np.uint32) & np.where(
            more == 1, 0x1F, np.where(more == 2, 0x0F, 0x07)
        ).astype(np.uint32)
        for k in (1, 2, 3):  # each continuation byte adds 6 bits to the characters that have one
            has = more >= k
            cont = u8[np.where(has, leads + k, leads)]
            if np.any(has & ((cont & 0xC0) != 0x80)):
                return None
            code = np.where(has, (code << 6) | (cont & 0x3F), code)
        smallest = np.where(more == 1, 0x80, np.where(more == 2, 0x800, 0x10000))
        if np.any(code < smallest) or np.any((code >= 0xD800) & (code < 0xE000)) or code.max() > 0x10FFFF:
            return None  # an overlong form, a surrogate or beyond Unicode: malformed, as Python says
        if code.max() >= len(by_code):
            return None
        found = by_code[code]
        if found.max() == np.iinfo(by_code.dtype).max:  # the mark of a character not in the vocabulary
            return None
        ids = per_char if len(self.chars) <= 256 else per_char.astype(by_code.dtype)
        ids[at] = found
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as a NumPy array (uint16 while the vocabulary fits, else uint32)."""
        by_code = self._lookup()[0]
        dtype = token_dtype(self.vocab_size)
        if text.isascii():  # one byte per character: the byte table, no decoding
            ids = self.encode_utf8(text.encode("ascii"))
            if ids is None:
                self._unknown(text)
            return ids.astype(dtype, copy=False)
        # surrogatepass: a lone surrogate (JSON's "\ud800") is a character outside the vocabulary, not a crash
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.take(by_code, codes, mode="clip")  # beyond the table: checked on the next line
        if len(codes) and (codes.max() >= len(by_code) or ids.max() == np.iinfo(by_code.dtype).max):
            self._unknown(text)
        return ids.astype(dtype, copy=False)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def _unknown(self, text: str) -> None:
        unknown = sorted(set(text) - self.stoi.keys())
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise TinyLMError(
            f"Text has {len(unknown)} character(s) outside this model's vocabulary: {shown}; "
            "remove them or train on a corpus that contains them."
        )

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))


_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: dropped by the byte table
_LEAD1 = 0xFD  # the byte table's marks for lead bytes of 2, 3 and 4-byte characters: _LEAD1 + 0, 1, 2
# every other byte: an ASCII character outside the vocabulary, or one UTF-8 never uses, marked 0x80
_MARKS = bytes([0x80] * 0xC2 + [_LEAD1] * 30 + [_LEAD1 + 1] * 16 + [_LEAD1 + 2] * 5 + [0x80] * 11)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer: byte-level BPE trained here, or GPT-2's."""

    context_free = False  # its pre-tokenizer looks at neighbouring characters: cut only where safe

    def __init__(self, tok: object, kind: str) -> None:
        self.tok = tok
        self.kind = kind

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
        """Train a GPT-2-style byte-level BPE on texts (any iterable: it is read once, in batches);
        `<|endoftext|>` is token 0. `progress` shows the trainer's own bars."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise TinyLMError(
                f"A byte-level BPE needs vocab_size >= 258 (256 bytes + <|endoftext|>); got {vocab_size}."
            )
        tok = _Tok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, "bpe")

    @classmethod
    def gpt2(cls) -> HFTokenizer:
        """GPT-2's tokenizer through `transformers` (needs the files cached or a network)."""
        from tinylm.hub import offline_reason

        offline = offline_reason()  # before importing transformers, which reads offline mode once
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TinyLMError("The gpt2 tokenizer needs transformers: pip install 'tinylm[hf]'.") from None
        try:
            hf = AutoTokenizer.from_pretrained("gpt2")
        except Exception as exc:  # offline, no cache, proxy errors...
            why = f"{offline} and it is not in the local cache" if offline else f"{type(exc).__name__}"
            raise TinyLMError(
                f"Could not load GPT-2's tokenizer ({why}); use --tokenizer bpe or char instead."
            ) from None
        return cls(hf.backend_tokenizer, "gpt2")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self.tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids as an array, encoded in parallel by the Rust tokenizer's threads (no GIL)."""
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # no offsets: faster
        dtype = token_dtype(self.vocab_size)
        return [np.array(e.ids, dtype=dtype) for e in fast(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))  # the standard HF format, loadable by tokenizers and transformers


class TiktokenTokenizer:
    """GPT-2's tokenizer through OpenAI's tiktoken (used when transformers cannot load it)."""

    kind = "gpt2"
    context_free = False

    def __init__(self, encoding: str = "gpt2") -> None:
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding(encoding)
        except Exception as exc:  # not installed, or its BPE file cannot be downloaded
            raise TinyLMError(f"tiktoken could not load {encoding!r} ({type(exc).__name__}).") from None
        self.encoding = encoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT})

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "tiktoken", "encoding": self.encoding}))


_POOL: ThreadPoolExecutor | None = None


def encode_arrays(tok: Tokenizer, texts: list[str], narrow: bool = False) -> list[np.ndarray]:
    """Each text's ids as an array (token_dtype; with `narrow`, characters' ids may come in a narrower
    dtype, for a caller that widens them as it copies them), on every core: the Rust tokenizer's
    threads for BPE and GPT-2, a thread pool for the character lookup."""
    global _POOL
    if isinstance(tok, HFTokenizer):
        return tok.encode_arrays(texts)
    if isinstance(tok, CharTokenizer):
        # UTF-8 bytes are looked up by bytes.translate, which holds the GIL: a second thread would wait
        if len(texts) < 2 or (os.cpu_count() or 1) < 2 or all(hasattr(t, "raw") for t in texts):
            return [_char_ids(tok, t, narrow) for t in texts]
        _POOL = _POOL or ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="tinylm-encode")
        return list(_POOL.map(_char_ids, itertools.repeat(tok), texts, itertools.repeat(narrow)))
    dtype = token_dtype(tok.vocab_size)
    return [np.array(tok.encode(t), dtype=dtype) for t in texts]


def _char_ids(tok: CharTokenizer, text: str, narrow: bool = False) -> np.ndarray:
    """A text's ids; a text that kept its UTF-8 bytes (`raw`: the reader's data.sources.Utf8Text) is looked
    up on them, and decoded (str) only when they are malformed or hold a character outside the vocabulary,
    so that the error says where, or which."""
    raw = getattr(text, "raw", None)
    if raw is not None:
        ids = tok.encode_utf8(raw)
        if ids is not None:
            return ids if narrow else ids.astype(token_dtype(tok.vocab_size))
        text = str(text)
    return tok.encode_array(text)


def document_separator(tok: Tokenizer) -> tuple[str, np.ndarray]:
    """What goes between two documents: the end-of-text token, or for characters (which have none)
    CHAR_SEPARATOR; returned as (the text it stands for, "" for a special token; its ids)."""
    dtype = token_dtype(tok.vocab_size)
    if isinstance(tok, CharTokenizer) or tok.eot_id is None:
        return CHAR_SEPARATOR, np.array(tok.encode(CHAR_SEPARATOR), dtype=dtype)
    return "", np.array([tok.eot_id], dtype=dtype)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer from transformers, else tiktoken; one clear error when neither can load it."""
    try:
        return HFTokenizer.gpt2()
    except TinyLMError as first:
        try:
            return TiktokenTokenizer("gpt2")
        except TinyLMError:
            raise first from None


def build_tokenizer(kind: str, texts: list[str], vocab_size: int = 0) -> Tokenizer:
    """Make a tokenizer of `kind` ("char", "bpe", "gpt2") for this corpus."""
    if kind == "char":
        return CharTokenizer.train("".join(texts))
    if kind == "bpe":
        return HFTokenizer.train_bpe(texts, vocab_size or 4096)
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise TinyLMError(f"Unknown tokenizer {kind!r}; use char, bpe or gpt2.")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `save` (tinylm char JSON or a HF tokenizer.json)."""
    path = Path(path)
    if not path.is_file():
        raise TinyLMError(f"No tokenizer at {path}; a data or run directory must contain tokenizer.json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TinyLMError(f"{path} is not a valid tokenizer file (corrupt JSON).") from None
    if data.get("type") == "char":
        return CharTokenizer(data["chars"])
    if data.get("type") == "tiktoken":
        return TiktokenTokenizer(data["encoding"])
    from tokenizers import Tokenizer as _Tok

    try:
        tok = _Tok.from_file(str(path))
    except Exception as exc:
        raise TinyLMError(f"{path} is not a valid tokenizer file ({exc}).") from None
    is_gpt2 = tok.get_vocab_size() == 50257 and tok.token_to_id(EOT) == 50256
    return HFTokenizer(tok, "gpt2" if is_gpt2 else "bpe")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: equal exactly when two tokenizers map text the same way."""
    import hashlib
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer.json")
        canonical = json.dumps(
            json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")), sort_keys=True
        )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
