"""Which text trains and which validates: whole held-out documents (every k-th, deterministic), a
contiguous cut when the input is a single document, or a source's official split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import NamedTuple

from tinylm.data.sources import Chunk, Input


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


def contiguous_cut(chars: int, val_fraction: float) -> int:
    """Characters of a single document that train (the rest validates)."""
    return int(chars * (1.0 - val_fraction))


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
    """Each chunk into its split: the first `cut` characters train when `cut` is given (a single
    document), else official splits where a source has one and held-out whole documents elsewhere."""
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
    seen = 0
    for chunk in chunks:
        text, start = chunk.text, seen
        seen += len(text)
        if seen <= cut:
            yield Part("train", text, chunk.first, _nbytes(chunk))
        elif start >= cut:
            yield Part("val", text, start == cut, _nbytes(chunk))
        else:  # this chunk holds the cut
            if cut > start:
                yield Part("train", text[: cut - start], chunk.first)
            yield Part("val", text[cut - start :], True)
