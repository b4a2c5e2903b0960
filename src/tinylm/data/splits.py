"""Which text trains and which validates: whole held-out documents (every k-th, deterministic), a
contiguous cut when the input is a single document, or a source's official split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import NamedTuple

from tinylm.data.sources import Chunk, Input, Utf8Text, utf8_chars


class Part(NamedTuple):
    """A piece of one document's text, routed to a split."""

    split: str  # "train" or "val"
    text: str
    first: bool  # starts a document in that split
    nbytes: int = -1  # the text's UTF-8 length when known without encoding it, else -1


def single_document(inputs: list[Input]) -> bool:
    """One text file (or built-in corpus): split by a contiguous cut, as char-rnn and nanoGPT cut Tiny
    Shakespeare (first 90% train, last 10% validation)."""
    return len(inputs) == 1 and inputs[0].kind == "text"


def contiguous_cut(n_bytes: int, val_fraction: float) -> int:
    """Where a single document stops training and starts validating: a byte offset into its UTF-8 text
    (moved back to the start of the character it falls in by `route`). Known from the file's size, so no pass over
    the text is needed; for ASCII text it is the character cut char-rnn and nanoGPT make."""
    return int(n_bytes * (1.0 - val_fraction))


class HeldOut:
    """Documents 0, 1, 2, ... are held out evenly: with val_fraction p = a/b (in lowest terms, denominator
    at most 10,000), document i validates when floor((i+1) p) > floor(i p): every 10th for 0.1, exactly a
    of every b, and never the first. A pure function of the document's position, so streaming works."""

    def __init__(self, val_fraction: float) -> None:
        self.fraction = Fraction(val_fraction).limit_denominator(10_000)

    def is_val(self, i: int) -> bool:
        a, b = self.fraction.numerator, self.fraction.denominator
        return (i + 1) * a // b > i * a // b

    def describe(self) -> str:
        a, b = self.fraction.numerator, self.fraction.denominator
        return f"whole documents, {a} in every {b} held out for validation"


def route(chunks: Iterable[Chunk], val_fraction: float, cut: int | None = None) -> Iterator[Part]:
    """Each chunk into its split: the characters in the first `cut` bytes train when `cut` is given (a
    single text file: its chunks carry their bytes), else official splits where a source has one and
    held-out whole documents elsewhere."""
    if cut is not None:
        yield from _cut(chunks, cut)
        return
    held_out, doc, split = HeldOut(val_fraction), -1, "train"
    for chunk in chunks:
        if chunk.first:
            doc += 1
            split = chunk.split or ("val" if held_out.is_val(doc) else "train")
        yield Part(split, chunk.text, chunk.first, _nbytes(chunk))


def _nbytes(chunk: Chunk) -> int:
    return len(chunk.raw) if chunk.raw is not None else -1


def _cut(chunks: Iterable[Chunk], cut: int) -> Iterator[Part]:
    seen = 0  # bytes
    for chunk in chunks:
        raw = chunk.raw if chunk.raw is not None else str(chunk.text).encode("utf-8")
        start = seen
        seen += len(raw)
        if seen <= cut:
            yield Part("train", chunk.text, chunk.first, len(raw))
        elif start >= cut:
            yield Part("val", chunk.text, start == cut, len(raw))
        else:  # this chunk holds the cut: make it at the start of the character there
            at = cut - start
            while at > 0 and raw[at] & 0xC0 == 0x80:  # a continuation byte: back to its character's start
                at -= 1
            if at == 0:
                yield Part("val", chunk.text, True, len(raw))
                continue
            if isinstance(chunk.text, Utf8Text):  # still bytes: cut them
                name, offset = chunk.text.name, chunk.text.offset
                train, val = Utf8Text(raw[:at], name, offset), Utf8Text(raw[at:], name, offset + at)
            else:
                chars = utf8_chars(raw[:at])
                train, val = chunk.text[:chars], chunk.text[chars:]
            yield Part("train", train, chunk.first, at)
            yield Part("val", val, True, len(raw) - at)
