"""Tokenizers behind one interface: characters, byte-level BPE (HF `tokenizers`), and GPT-2's."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from tinylm.errors import TinyLMError

EOT = "<|endoftext|>"


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
    so a prompt never turns into different text than the user typed.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise TinyLMError("A character tokenizer needs at least one character of text.")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        return self.stoi.get("\n")

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise TinyLMError(
                f"Text has {len(unknown)} character(s) outside this model's vocabulary: {shown}; "
                "remove them or train on a corpus that contains them."
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False))


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer: byte-level BPE trained here, or GPT-2's."""

    def __init__(self, tok: object, kind: str) -> None:
        self.tok = tok
        self.kind = kind

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """Train a GPT-2-style byte-level BPE on the corpus; `<|endoftext|>` is token 0."""
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
            show_progress=False,
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

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))  # the standard HF format, loadable by tokenizers and transformers


class TiktokenTokenizer:
    """GPT-2's tokenizer through OpenAI's tiktoken (used when transformers cannot load it)."""

    kind = "gpt2"

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
