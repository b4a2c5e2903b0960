"""Text to token shards in parallel: documents re-cut into pieces at points where cutting cannot change
the tokens, encoded in batches on every core while the next batch is read, written with the tokenizer's
end-of-text token between documents."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from tinylm.data.shards import ShardWriter
from tinylm.data.sources import Chunk
from tinylm.data.splits import Part
from tinylm.tokenizer import Tokenizer, document_separator, encode_arrays

PIECE_CHARS = 1 << 16  # characters per piece for a context-dependent tokenizer (BPE): many pieces per batch
CHAR_PIECE_CHARS = 1 << 20  # characters per piece for the character lookup: a whole read of a text file
HARD_CUT = 16  # a piece with no safe cut in its second half waits for this many PIECE_CHARS of text
BATCH_CHARS = 16 << 20  # at most this many characters (bytes, where known) per encoding batch (bounds memory)
IN_FLIGHT = 2  # batches encoding or queued while the next one is read
CHECKPOINT_SECONDS = 30.0  # how often the written position is saved for a resume


class Digest(Protocol):
    """A streaming hash (xxhash's, hashlib's)."""

    def update(self, data: bytes, /) -> None: ...


def _safe(text: str, pos: int) -> bool:
    """Whether the newline or space at `pos` lies between two non-space characters."""
    return 0 < pos < len(text) - 1 and not text[pos - 1].isspace() and not text[pos + 1].isspace()


def safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The last position in (lo, hi] where `text` can be cut without changing its byte-level BPE tokens:
    just after a newline, or just before a space, that lies between two non-space characters. GPT-2's
    pre-tokenizer always splits there (such a newline is a word of its own; such a space starts the next
    word), and it reads no text behind a split, so pieces cut there encode to the tokens of the whole."""
    pos = text.rfind("\n", lo, hi)
    while pos >= lo and pos != -1:
        if _safe(text, pos):
            return pos + 1
        pos = text.rfind("\n", lo, pos)
    pos = text.rfind(" ", lo, hi)  # a long line: cut between two words
    while pos > lo and pos != -1:
        if _safe(text, pos):
            return pos
        pos = text.rfind(" ", lo, pos)
    return None


_NEXT_SAFE = re.compile(r"(?<=\S)(?:\n(?=\S)|(?= \S))")  # ends where safe_cut may cut


def next_safe_cut(text: str, lo: int) -> int | None:
    """The first position after `lo` where safe_cut may cut."""
    match = _NEXT_SAFE.search(text, lo + 1)
    return match.end() if match else None


def _cut_point(text: str, start: int, size: int) -> int | None:
    """Where to end a piece of about `size` characters that starts at `start`, or None to wait for more."""
    cut = safe_cut(text, start + size // 2, start + size) or next_safe_cut(text, start + size)
    if cut is None and len(text) - start >= HARD_CUT * size:
        return start + size  # no newline or space between words in HARD_CUT pieces: the one inexact cut
    return cut


def pieces(parts: Iterable[Part], context_free: bool, size: int) -> Iterator[Part]:
    """The parts' documents re-cut into pieces of about `size` characters, at safe points only."""
    if context_free:  # any cut is safe: no buffering, and a part that fits passes through whole
        for part in parts:
            if 0 <= part.nbytes <= size or len(part.text) <= size:  # bytes: no counting characters
                yield part
                continue
            for i in range(0, len(part.text), size):
                yield Part(part.split, part.text[i : i + size], part.first and i == 0)
        return
    split, first, buf, start = "", False, "", 0
    for part in parts:
        if part.first or part.split != split:  # a new document: the last one ends whole
            if start < len(buf):
                yield Part(split, buf[start:], first)
            split, first, buf, start = part.split, part.first, part.text, 0
        else:
            buf, start = buf[start:] + part.text, 0
        while len(buf) - start > size:
            cut = _cut_point(buf, start, size)
            if cut is None:
                break
            yield Part(split, buf[start:cut], first)
            start, first = cut, False
    if start < len(buf):
        yield Part(split, buf[start:], first)


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


MAX_STARTS = 10_001  # document starts remembered per split: enough to hold out documents afterwards


@dataclass
class SplitStats:
    """What one split received: documents, characters and UTF-8 bytes of text (separators included)."""

    documents: int = 0
    chars: int = 0
    bytes: int = 0
    # (tokens, chars, bytes) before each of the first MAX_STARTS documents, and its separator's tokens
    starts: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Progress:
    """Counters the progress bar shows."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0


class ShardSink:
    """Writes encoded pieces into one ShardWriter per split, a separator between documents; its
    state_dict (pieces written, shard sizes, counters) lets an interrupted prepare continue from there."""

    def __init__(self, tok: Tokenizer, writers: dict[str, ShardWriter]) -> None:
        self.writers = writers
        self.sep_text, self.sep_ids = document_separator(tok)
        self.per_char = tok.kind == "char"  # one token per character: the tokens count the characters
        self.stats = {split: SplitStats() for split in writers}
        self.progress = Progress()
        self.pieces = 0  # pieces written, in stream order

    def state_dict(self) -> dict:
        """Where the output stands, after flushing every shard to disk."""
        return {
            "pieces": self.pieces,
            "shards": {split: w.flush() for split, w in self.writers.items()},
            "stats": {split: asdict(st) for split, st in self.stats.items()},
            "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict: shards cut back to it, counters as they were."""
        for split, writer in self.writers.items():
            writer.restore(state["shards"][split])
            st = state["stats"][split]
            self.stats[split] = SplitStats(
                st["documents"], st["chars"], st["bytes"], [tuple(x) for x in st["starts"]]
            )
        self.progress = Progress(**state["progress"])
        self.pieces = state["pieces"]

    def add(self, part: Part, ids: np.ndarray) -> None:
        writer, stats = self.writers[part.split], self.stats[part.split]
        if part.first:
            sep = len(self.sep_ids) if writer.tokens else 0
            if len(stats.starts) < MAX_STARTS:
                stats.starts.append((writer.tokens, stats.chars, stats.bytes, sep))
            if sep:
                writer.write(self.sep_ids)
                stats.chars += len(self.sep_text)
                stats.bytes += len(self.sep_text)
            stats.documents += 1
            self.progress.documents += 1
        n_bytes = part.nbytes if part.nbytes >= 0 else utf8_len(part.text)
        stats.chars += len(ids) if self.per_char else len(part.text)
        stats.bytes += n_bytes
        writer.write(ids)
        self.progress.tokens += len(ids)
        self.progress.text_bytes += n_bytes
        self.pieces += 1

    def hold_out_last(self, fraction: float) -> int:
        """Move the last training documents to validation, as few as hold `fraction` of the characters
        (at least one, never all); for corpora with too few documents to hold out 1 in every k."""
        train, val = self.stats["train"], self.stats["val"]
        total = train.chars + val.chars
        k = 1
        while k < len(train.starts) - 1 and train.chars - train.starts[-k][1] < fraction * total:
            k += 1
        tokens, chars, n_bytes, sep = train.starts[-k]
        writer = self.writers["train"]
        ids = writer.read(tokens + sep, writer.tokens)
        sep_chars = len(self.sep_text) if sep else 0
        moved_chars, moved_bytes = train.chars - chars - sep_chars, train.bytes - n_bytes - sep_chars
        writer.truncate(tokens)
        del train.starts[-k:]
        train.chars, train.bytes, train.documents = chars, n_bytes, train.documents - k
        self.writers["val"].write(ids)
        val.chars, val.bytes, val.documents = moved_chars, moved_bytes, k
        return k


def hashed(chunks: Iterable[Chunk], digest: Digest) -> Iterator[Chunk]:
    """The chunks unchanged, their text added to `digest` as they pass: the corpus in reading order,
    documents joined by a blank line (so one text file hashes to the hash of its content). The digest
    is complete once the chunks are."""
    started = False
    for chunk in chunks:
        if chunk.first and started:
            digest.update(b"\n\n")
        digest.update(chunk.raw if chunk.raw is not None else str(chunk.text).encode("utf-8"))
        started = True
        yield chunk


def batches(parts: Iterable[Part], max_pieces: int, max_chars: int = BATCH_CHARS) -> Iterator[list[Part]]:
    """Consecutive pieces grouped for one encoding call."""
    batch: list[Part] = []
    chars = 0
    for part in parts:
        batch.append(part)
        chars += part.nbytes if part.nbytes >= 0 else len(part.text)  # bytes, when known, bound it
        if len(batch) >= max_pieces or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_into(
    tok: Tokenizer,
    parts: Iterable[Part],
    sink: ShardSink,
    on_batch: Callable[[], None] = lambda: None,
    checkpoint: Callable[[dict], None] | None = None,
) -> None:
    """Encode the parts into the sink in three overlapping stages: this thread reads and cuts, one
    thread drives the tokenizer (whose own threads, or a thread pool for characters, use every core)
    and one writes shards; at most IN_FLIGHT batches wait between them. The sink's first `sink.pieces`
    pieces are already written (a resume): they are read again but not encoded. Every
    CHECKPOINT_SECONDS the writer hands `checkpoint` the sink's state."""
    cores = os.cpu_count() or 1
    context_free = getattr(tok, "context_free", False)
    size = CHAR_PIECE_CHARS if context_free else PIECE_CHARS
    per_batch = 2 * cores if context_free else max(16, 4 * cores)
    todo = itertools.islice(pieces(parts, context_free, size), sink.pieces, None)
    saver = _Checkpoints(sink, checkpoint)
    pending: deque[Future] = deque()
    with (
        ThreadPoolExecutor(1, thread_name_prefix="tinylm-encode") as encoder,
        ThreadPoolExecutor(1, thread_name_prefix="tinylm-write") as writer,
    ):
        try:
            for batch in batches(todo, per_batch):
                encoded = encoder.submit(encode_arrays, tok, [p.text for p in batch], narrow=True)
                pending.append(writer.submit(_write, batch, encoded, sink, saver))
                while len(pending) > IN_FLIGHT:
                    pending.popleft().result()
                    on_batch()
            while pending:
                pending.popleft().result()
                on_batch()
        finally:
            for future in pending:  # on an error, stop what has not started
                future.cancel()


class _Checkpoints:
    """Saves the sink's state now and then, from the writer thread, between two batches."""

    def __init__(self, sink: ShardSink, save: Callable[[dict], None] | None) -> None:
        self.sink, self.save, self.last = sink, save, time.monotonic()

    def after_batch(self) -> None:
        if self.save is not None and time.monotonic() - self.last >= CHECKPOINT_SECONDS:
            self.save(self.sink.state_dict())
            self.last = time.monotonic()


def _write(batch: list[Part], encoded: Future, sink: ShardSink, saver: _Checkpoints) -> None:
    for part, ids in zip(batch, encoded.result()):
        sink.add(part, ids)
    saver.after_batch()
