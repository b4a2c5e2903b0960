"""Tokens on disk: fixed-size shard files (raw uint16/uint32, no header) listed in meta.json, the
directory's manifest; a split is the concatenation of its shards, read through memmaps."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from tinylm.data.appender import Appender
from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash

FORMAT = 2  # meta.json "format": 2 lists shards; without it, a directory holds train.bin and val.bin


def shard_name(split: str, index: int) -> str:
    """The file name of a split's index-th shard."""
    return f"{split}-{index:05d}.bin"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ShardWriter:
    """Appends one split's tokens to fixed-size shard files in a directory (through an Appender: direct
    writes where the file system takes them); each full shard is fsynced."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = (
            Path(directory),
            split,
            np.dtype(dtype),
            shard_tokens,
        )
        self.counts: list[int] = []  # tokens per shard written so far
        self._out: Appender | None = None  # the shard being written

    @property
    def tokens(self) -> int:
        """Tokens written so far."""
        return sum(self.counts)

    def write(self, ids: np.ndarray) -> None:
        """Append tokens (any integer dtype whose values fit: they are converted as they are staged)."""
        while len(ids):
            if self._out is None:
                self._out = Appender(self._path(len(self.counts)), self.dtype)
                self.counts.append(0)
            take = ids[: self.shard_tokens - self.counts[-1]]
            self._out.append(take)
            self.counts[-1] += len(take)
            ids = ids[len(take) :]
            if self.counts[-1] == self.shard_tokens:
                self._close_file()

    def flush(self) -> list[int]:
        """Make what was written durable (fsync); the token count of each shard."""
        if self._out is not None:
            self._out.sync()
        return list(self.counts)

    def restore(self, counts: list[int]) -> None:
        """Continue after an interruption: the shards as `counts` says (later bytes and shards dropped)."""
        self._close_file()
        self.counts = [n for n in counts]
        for stray in self.directory.glob(f"{self.split}-*.bin"):
            if int(stray.stem.rsplit("-", 1)[1]) >= len(counts):
                stray.unlink()
        if self.counts:
            self._reopen_last()

    def _path(self, index: int) -> Path:
        return self.directory / shard_name(self.split, index)

    def _reopen_last(self) -> None:
        """Cut the last shard to its count; append to it again unless it is full."""
        last, keep = self._path(len(self.counts) - 1), self.counts[-1]
        if not last.is_file() or last.stat().st_size < keep * self.dtype.itemsize:
            raise TinyLMError(
                f"{last} is missing or shorter than the saved progress says; "
                f"delete {self.directory} to prepare from the start."
            )
        if keep < self.shard_tokens:
            self._out = Appender(last, self.dtype, keep)
        else:
            os.truncate(last, keep * self.dtype.itemsize)

    def _close_file(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            out.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) written so far (a copy)."""
        if self._out is not None:
            self._out.write_out()
        return np.asarray(self.view()[start:stop]).copy()

    def view(self) -> np.ndarray | ShardedTokens:
        """The tokens written so far, read as one sequence."""
        return open_tokens(
            [self._path(i) for i in range(len(self.counts))],
            self.counts,
            self.dtype,
        )

    def truncate(self, tokens: int) -> None:
        """Keep only the first `tokens` tokens (shards after them are deleted)."""
        self._close_file()
        while self.counts and self.tokens - self.counts[-1] >= tokens:
            self._path(len(self.counts) - 1).unlink()
            self.counts.pop()
        if self.counts:
            self.counts[-1] = tokens - (self.tokens - self.counts[-1])
            self._reopen_last()

    def close(self) -> list[dict]:
        """Flush and fsync; the manifest entries {file, tokens} of this split."""
        self._close_file()
        return [{"file": shard_name(self.split, i), "tokens": n} for i, n in enumerate(self.counts)]


class ShardedTokens:
    """Several shard files read as one token sequence: len(), slices and integer-array indexing (as a
    memmap offers) across shard boundaries; each shard is memory-mapped on first use."""

    ndim = 1

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.files, self.counts, self.dtype = list(files), list(counts), np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_shards + 1,)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getstate__(self) -> dict:  # DataLoader workers re-open the maps, they do not copy them
        return {**self.__dict__, "_maps": {}}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r", shape=(self.counts[i],))
        return self._maps[i]

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray | np.integer:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        flat = np.asarray(index, dtype=np.int64)
        if flat.ndim == 0:
            i = int(flat) + (len(self) if flat < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(flat)} is out of bounds for {len(self)} tokens")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self._shard(shard)[i - self.starts[shard]]
        return self._gather(flat)

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        for shard in range(max(first, 0), len(self.counts)):
            lo, hi = self.starts[shard], self.starts[shard + 1]
            if lo >= stop:
                break
            parts.append(self._shard(shard)[max(start, lo) - lo : min(stop, hi) - lo])
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        flat = index.ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} tokens")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(len(flat), dtype=self.dtype)
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = self._shard(int(s))[flat[mine] - self.starts[s]]
        return out.reshape(index.shape)


def open_tokens(files: list[Path], counts: list[int], dtype: np.dtype) -> np.ndarray | ShardedTokens:
    """One split's tokens: a memmap when it is one shard (exactly what older versions read), else a
    ShardedTokens over the shards."""
    files, counts = [f for f, n in zip(files, counts) if n], [n for n in counts if n]
    if not files:
        return np.zeros(0, dtype=dtype)
    if len(files) == 1:
        return np.memmap(files[0], dtype=dtype, mode="r", shape=(counts[0],))
    return ShardedTokens(files, counts, dtype)


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
        self.tokenizer: Tokenizer = load_tokenizer(self.path / "tokenizer.json")

    @property
    def tokenizer_hash(self) -> str:
        """A content hash of this directory's tokenizer (see `tokenizer_hash`)."""
        return tokenizer_hash(self.tokenizer)

    def split(self, name: str) -> np.ndarray | ShardedTokens:
        """The tokens of "train" or "val" as one read-only sequence (a memmap, or shards read as one)."""
        dtype = np.dtype(self.meta["dtype"])
        entries = self.meta.get("shards", {}).get(name)
        if entries is None:  # a directory from before shards: NAME.bin
            entries = [{"file": f"{name}.bin", "tokens": None}]
        files, counts = [], []
        for entry in entries:
            file = self.path / entry["file"]
            if not file.is_file():
                raise TinyLMError(f"{file} is missing; run `tinylm prepare` again.")
            size = file.stat().st_size
            tokens = size // dtype.itemsize if entry["tokens"] is None else entry["tokens"]
            if size != tokens * dtype.itemsize:
                raise TinyLMError(
                    f"{file} holds {size:,} bytes, not the {tokens:,} tokens meta.json lists; run `tinylm prepare` again."
                )
            files.append(file)
            counts.append(tokens)
        return open_tokens(files, counts, dtype)

    def chars(self, name: str) -> int:
        """Characters of text the split holds (for bits per character)."""
        return int(self.meta.get(f"{name}_chars", 0))

    def bytes(self, name: str) -> int:
        """UTF-8 bytes of text the split holds (for bits per byte)."""
        return int(self.meta.get(f"{name}_bytes", 0))
