"""Text -> tokens on disk (train.bin / val.bin + tokenizer.json + meta.json), and reading them back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tinylm.data.sources import load_source
from tinylm.errors import TinyLMError
from tinylm.tokenizer import HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, tokenizer_hash


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    # Large texts are encoded in line-aligned chunks so the Rust tokenizer can use its threads.
    if isinstance(tok, HFTokenizer) and len(text) > 1_000_000:
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 2000]) for i in range(0, len(lines), 2000)]
        return np.fromiter((i for ids in tok.encode_batch(chunks) for i in ids), dtype=np.int64)
    return np.asarray(tok.encode(text), dtype=np.int64)


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int = 0,
    val_fraction: float = 0.1,
) -> dict:
    """Tokenize the inputs (with a new tokenizer of that kind, or a given one) and write train.bin,
    val.bin, tokenizer.json and meta.json into `out`."""
    if not inputs:
        raise TinyLMError("Give at least one input: a text file, a directory, a built-in name or hf:NAME.")
    if not 0.0 < val_fraction < 1.0:
        raise TinyLMError(f"--val-fraction ({val_fraction}) must be between 0 and 1.")
    sources = [load_source(s) for s in inputs]
    text = "\n\n".join(s.text for s in sources)
    if not text.strip():
        raise TinyLMError(f"The input ({', '.join(inputs)}) is empty: there is no text to train on.")
    official_val = [s.val_text for s in sources if s.val_text]
    if official_val and len(official_val) == len(sources):
        train_text, val_text = text, "\n\n".join(official_val)
    else:  # contiguous split: first (1 - val_fraction) for training, the rest for validation
        cut = int(len(text) * (1.0 - val_fraction))
        train_text, val_text = text[:cut], text[cut:]
    if isinstance(tokenizer, str):
        tok = build_tokenizer(
            tokenizer, [train_text, val_text] if tokenizer == "char" else [train_text], vocab_size
        )
    else:
        tok = tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    meta = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "sources": [s.name for s in sources],
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "split": "official"
        if official_val and len(official_val) == len(sources)
        else f"contiguous {1 - val_fraction:g}/{val_fraction:g}",
    }
    for split, part in (("train", train_text), ("val", val_text)):
        ids = _encode(tok, part)
        ids.astype(dtype).tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_chars"] = len(part)
        meta[f"{split}_bytes"] = len(part.encode("utf-8"))
    tok.save(out / "tokenizer.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class TokenData:
    """A prepared data directory: memory-mapped token shards plus their tokenizer and meta."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise TinyLMError(
                f"{self.path} is not a prepared data directory (no meta.json); run `tinylm prepare` first."
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TinyLMError(
                f"{meta_path} is corrupt (not valid JSON); run `tinylm prepare` again."
            ) from None
        self.tokenizer = load_tokenizer(self.path / "tokenizer.json")

    @property
    def tokenizer_hash(self) -> str:
        """A content hash of this directory's tokenizer (see `tokenizer_hash`)."""
        return tokenizer_hash(self.tokenizer)

    def split(self, name: str) -> np.ndarray:
        """The tokens of "train" or "val" as a read-only memmap."""
        file = self.path / f"{name}.bin"
        if not file.is_file():
            raise TinyLMError(f"{file} is missing; run `tinylm prepare` again.")
        if file.stat().st_size == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(file, dtype=self.meta["dtype"], mode="r")

    def chars(self, name: str) -> int:
        return int(self.meta.get(f"{name}_chars", 0))

    def bytes(self, name: str) -> int:
        return int(self.meta.get(f"{name}_bytes", 0))
