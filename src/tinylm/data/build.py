"""`prepare`: inputs -> tokenizer -> token shards + manifest, streamed in bounded memory, built in a
staging directory that is renamed into place only when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from tinylm.config import PrepareConfig
from tinylm.data.encoding import PIECE_CHARS, ShardSink, encode_into, hashed, pieces
from tinylm.data.shards import FORMAT, ShardWriter, fsync_dir
from tinylm.data.sources import Chunk, Input, count_bytes, read_chunks, resolve_inputs
from tinylm.data.splits import HeldOut, Part, contiguous_cut, route, single_document
from tinylm.errors import TinyLMError
from tinylm.progress import progress_bar
from tinylm.tokenizer import (
    CHAR_SEPARATOR,
    EOT,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    token_dtype,
    tokenizer_hash,
)

STATE = "prepare-state.json"  # in the staging directory: what an interrupted prepare may reuse
STATE_VERSION = 2  # what the state means (2: a single document's cut is a byte offset); others start clean


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | Tokenizer | None = None,
    vocab_size: int = 0,
    val_fraction: float | None = None,
    *,
    text_field: str | None = None,
    tokenizer_sample: int | None = None,
    shard_tokens: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize the inputs (with a new tokenizer of that kind, or a given one) into token shards,
    tokenizer.json and meta.json in `out`; defaults are PrepareConfig's. Returns the meta."""
    given = None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    if isinstance(tokenizer, str) and tokenizer not in ("char", "bpe", "gpt2"):
        raise TinyLMError(f"Unknown tokenizer {tokenizer!r}; use char, bpe or gpt2.")
    defaults = PrepareConfig()
    cfg = PrepareConfig(
        tokenizer=given.kind if given else tokenizer or defaults.tokenizer,
        vocab_size=vocab_size or defaults.vocab_size,  # 0: the default, as the CLI's --vocab-size
        val_fraction=defaults.val_fraction if val_fraction is None else val_fraction,
        text_field=defaults.text_field if text_field is None else text_field,
        tokenizer_sample=defaults.tokenizer_sample if tokenizer_sample is None else tokenizer_sample,
        shard_tokens=defaults.shard_tokens if shard_tokens is None else shard_tokens,
    )
    sources = resolve_inputs(list(inputs))
    place = Destination(Path(out), force)
    fingerprint = _fingerprint(sources, cfg, given)
    done = place.existing(fingerprint)
    if done is not None:
        return {**done, "reused": True}
    staging, state = place.open_staging(fingerprint)
    build = Build(sources, list(inputs), cfg, staging, state, progress)
    try:
        meta = build.run(given)
    except TinyLMError:
        shutil.rmtree(staging, ignore_errors=True)  # a user error: nothing to resume
        raise
    meta["fingerprint"] = fingerprint
    place.commit(staging, meta)
    return {**meta, "resumed": build.resumed, "resumed_tokens": build.resumed_tokens}


def _fingerprint(sources: list[Input], cfg: PrepareConfig, given: Tokenizer | None) -> str:
    """What the output depends on: the inputs (path, size, mtime), the options and a given tokenizer."""
    what = {
        "format": FORMAT,
        "inputs": [s.fingerprint() for s in sources],
        "config": asdict(cfg),
        "tokenizer": tokenizer_hash(given) if given else None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class Destination:
    """The output directory: refuse to mix or overwrite, stage the work beside it, rename when done."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.force = out, force
        whole = out.absolute()  # "." and "data/" have names too
        self.staging = whole.parent / f".{whole.name}.partial"
        for parent in (out, *out.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise TinyLMError(f"Cannot create {out}: {parent} is a file, not a directory.")
                break

    def existing(self, fingerprint: str) -> dict | None:
        """The meta of an identical finished prepare in `out` (nothing to do), else None when `out` is free."""
        if not self.out.exists() or not any(self.out.iterdir()):
            return None
        meta_path = self.out / "meta.json"
        if not meta_path.is_file():
            raise TinyLMError(
                f"{self.out} is not empty and holds no prepared data; choose a new or empty --out."
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        if meta.get("fingerprint") == fingerprint and not self.force:
            return meta
        if self.force:
            return None
        raise TinyLMError(
            f"{self.out} already holds data prepared from other inputs or options; choose another --out, "
            "or pass --force to replace it (the old data stays until the new data is complete)."
        )

    def open_staging(self, fingerprint: str) -> tuple[Path, dict]:
        """The staging directory and its saved state: resumed when an interrupted prepare of the same
        inputs and options left it, else started clean."""
        state_path = self.staging / STATE
        if self.staging.exists():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                state = {}
            if not state and any(p.name != STATE for p in self.staging.iterdir()):
                raise TinyLMError(f"{self.staging} exists and was not made by tinylm prepare; move it away.")
            if state.get("fingerprint") == fingerprint and state.get("version") == STATE_VERSION:  # continue
                if "encoded" not in state:
                    for shard in self.staging.glob("*.bin"):
                        shard.unlink()
                return self.staging, state
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        state = {"fingerprint": fingerprint, "version": STATE_VERSION}
        write_json(state_path, state)
        return self.staging, state

    def commit(self, staging: Path, meta: dict) -> None:
        """meta.json last, then one rename: `out` is either absent, the old data, or complete."""
        write_json(staging / "meta.json", meta)
        (staging / STATE).unlink()
        fsync_dir(staging)
        old = self.staging.with_name(self.staging.name.replace(".partial", ".old"))
        if self.out.exists() and any(self.out.iterdir()):  # --force over finished data
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.out, old)
        elif self.out.exists():
            self.out.rmdir()
        os.rename(staging, self.out)
        fsync_dir(self.out.parent)
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a temporary file fsynced, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Bar:
    """Progress over the text read (kB, or MB for 100 MB and more), with documents, tokens and MB/s; a
    line every 10 s when the total is unknown (compressed files, Hugging Face streams) and not a terminal."""

    def __init__(self, desc: str, total_bytes: int, enabled: bool) -> None:
        self.unit = 10**6 if total_bytes >= 10**8 else 10**3
        self.desc = f"{desc} ({'MB' if self.unit == 10**6 else 'kB'})"
        self.lines = enabled and not total_bytes and not sys.stderr.isatty()
        self.bar = progress_bar(
            -(-total_bytes // self.unit), desc=self.desc, enabled=enabled and not self.lines
        )
        self.every = 0.5 if not self.lines else 10.0  # seconds between updates
        self.start = self.last = time.perf_counter()
        self.shown = 0

    def update(self, text_bytes: int, documents: int, tokens: int | None = None, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < self.every:
            return
        self.last = now
        values = {"docs": f"{documents:,}", "MB_s": f"{text_bytes / 1e6 / max(now - self.start, 1e-9):.1f}"}
        if tokens is not None:
            values["tokens"] = f"{tokens:,}"
        if self.lines:
            extra = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"{self.desc}: {text_bytes // self.unit:,}, {extra}", file=sys.stderr, flush=True)
            return
        self.bar.set_postfix(refresh=False, **values)
        step = (self.bar.total if final else text_bytes // self.unit) - self.shown  # the last unit is partial
        self.bar.update(max(step, 0))
        self.shown += max(step, 0)

    def close(self) -> None:
        self.bar.close()


class Build:
    """One prepare: a scan when characters or a cut need it, the tokenizer, then one encoding pass."""

    def __init__(
        self,
        sources: list[Input],
        specs: list[str],
        cfg: PrepareConfig,
        staging: Path,
        state: dict,
        progress: bool,
    ) -> None:
        self.sources, self.specs, self.cfg, self.staging, self.state = sources, specs, cfg, staging, state
        self.progress = progress
        plain = all(s.kind in ("text", "jsonl") and not s.compression for s in sources)
        self.total_bytes = sum(s.size for s in sources) if plain else 0
        self.single = single_document(sources)
        self.official: set[str] = set()  # sources that came with their own validation split
        self.opened: dict = {}  # Hugging Face datasets, opened once for every pass
        self.resumed = False  # whether an interrupted prepare's tokenizer was reused
        self.resumed_tokens = 0  # tokens an interrupted prepare had written, kept

    def chunks(self, counts: dict | None = None, lazy: bool = False) -> Iterator[Chunk]:
        """Every input's chunks in order, counted per command-line input into `counts` (files,
        documents, UTF-8 bytes: known without counting characters); `lazy`: text files' chunks stay
        UTF-8 bytes (Utf8Text) for a tokenizer that encodes those."""
        for source in self.sources:
            entry = None
            if counts is not None:
                entry = counts.setdefault(
                    source.origin, {"input": source.origin, "files": 0, "documents": 0, "bytes": 0}
                )
                entry["files"] += source.path is not None
            for chunk in read_chunks(source, self.cfg.text_field, self.opened, lazy):
                if chunk.split:
                    self.official.add(source.name)
                if entry is not None:
                    entry["documents"] += chunk.first
                    entry["bytes"] += len(chunk.raw) if chunk.raw is not None else len(chunk.text)  # ASCII
                yield chunk

    def parts(self, chunks: Iterable[Chunk]) -> Iterator[Part]:
        return route(chunks, self.cfg.val_fraction, self.state.get("cut"))

    def run(self, given: Tokenizer | None) -> dict[str, Any]:
        start = time.perf_counter()
        tok = self.tokenizer(given)
        dtype = token_dtype(tok.vocab_size)
        writers = {s: ShardWriter(self.staging, s, dtype, self.cfg.shard_tokens) for s in ("train", "val")}
        sink, digest, counts = ShardSink(tok, writers), xxhash.xxh3_128(), {}
        if "encoded" in self.state:  # an interrupted run wrote this much: keep it, read on from there
            sink.load_state_dict(self.state["encoded"])
            self.resumed_tokens = sink.progress.tokens
        bar = Bar("Tokenizing", self.total_bytes, self.progress)
        nonblank = _Nonblank()
        lazy = hasattr(tok, "encode_utf8")  # the character lookup reads UTF-8 bytes: no decoding here
        parts = self.parts(nonblank.watch(hashed(self.chunks(counts, lazy), digest)))
        p = sink.progress
        encode_into(
            tok, parts, sink, lambda: bar.update(p.text_bytes, p.documents, p.tokens), self.checkpoint
        )
        bar.update(p.text_bytes, p.documents, p.tokens, final=True)
        bar.close()
        if not nonblank.seen:
            raise TinyLMError(f"The input ({', '.join(self.specs)}) is empty: there is no text to train on.")
        split = self.describe_split(sink)
        shards = {s: w.close() for s, w in writers.items()}
        meta: dict[str, Any] = {
            "format": FORMAT,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "sources": self.specs,
            "inputs": list(counts.values()),
            "documents": sum(e["documents"] for e in counts.values()),
            "split": split,
            "separator": sink.sep_text or EOT,
        }
        if "sample" in self.state:
            meta["tokenizer_sample"] = self.state["sample"]
        for name, stats in sink.stats.items():
            meta[f"{name}_documents"] = stats.documents
            meta[f"{name}_tokens"] = writers[name].tokens
            meta[f"{name}_chars"] = stats.chars
            meta[f"{name}_bytes"] = stats.bytes
        meta["xxh3_128"] = digest.hexdigest()  # the text read, as `xxh128sum` gives it for one file
        meta["shard_tokens"] = self.cfg.shard_tokens
        meta["shards"] = shards
        meta["seconds"] = round(time.perf_counter() - start, 3)
        return meta

    def checkpoint(self, encoded: dict) -> None:
        """Save how far the shards are written (from the writer thread, the files already fsynced)."""
        self.state["encoded"] = encoded
        write_json(self.staging / STATE, self.state)

    def describe_split(self, sink: ShardSink) -> str:
        """How the split was made; when no whole document was held out, hold out the last one."""
        f = self.cfg.val_fraction
        if self.state.get("cut") is not None:
            return f"contiguous {1 - f:g}/{f:g}"
        train, val = sink.stats["train"], sink.stats["val"]
        official = sorted(self.official)
        if val.documents == 0:
            if train.documents < 2:
                raise TinyLMError(
                    "The input holds a single document, and whole documents are held out for validation; "
                    "give more documents, or one plain text file (it is cut contiguously)."
                )
            k = sink.hold_out_last(f)
            return (
                f"whole documents: too few to hold out 1 in {HeldOut(f).fraction.denominator}, so the last "
                f"{k} ({100 * sink.stats['val'].chars / max(1, train.chars + sink.stats['val'].chars):.0f}% of the text)"
            )
        if official and len(official) == len(self.sources):
            return "official"
        if official:
            return f"official for {', '.join(official)}; {HeldOut(f).describe()} elsewhere"
        return HeldOut(f).describe()

    # ----- the tokenizer ---------------------------------------------------------------------------
    def tokenizer(self, given: Tokenizer | None) -> Tokenizer:
        """The given tokenizer, the one an interrupted run already made, or a new one (saved for resumes)."""
        path = self.staging / "tokenizer.json"
        if self.state.get("tokenizer") and path.is_file():
            self.resumed = True
            return load_tokenizer(path)
        chars: set[str] = set()
        n_bytes, nonblank = self.sources[0].size, True  # a plain text file's size is its text's bytes
        if given is None and self.cfg.tokenizer == "char":
            n_bytes, chars, nonblank = self.scan()
        elif self.single and self.sources[0].compression:
            n_bytes, nonblank = count_bytes(self.sources[0])
        if not nonblank:
            raise TinyLMError(f"The input ({', '.join(self.specs)}) is empty: there is no text to train on.")
        self.state["cut"] = contiguous_cut(n_bytes, self.cfg.val_fraction) if self.single else None
        if given is not None:
            tok = given
        elif self.cfg.tokenizer == "char":
            tok = CharTokenizer(chars | (set() if self.single else set(CHAR_SEPARATOR)))
        elif self.cfg.tokenizer == "bpe":
            tok = self.train_bpe()
        else:
            tok = gpt2_tokenizer()
        tok.save(path)
        self.state["tokenizer"] = path.name
        write_json(self.staging / STATE, self.state)
        return tok

    def scan(self) -> tuple[int, set[str], bool]:
        """One pass over the text: its characters collected (for a character tokenizer), and its UTF-8
        bytes counted."""
        bar = Bar("Scanning characters", self.total_bytes, self.progress)
        seen, n_bytes, docs, nonblank = _CharSet(), 0, 0, _Nonblank()
        for chunk in nonblank.watch(self.chunks()):
            n_bytes += len(chunk.raw) if chunk.raw is not None else len(chunk.text)  # ASCII
            docs += chunk.first
            seen.add(chunk.text)
            bar.update(n_bytes, docs)
        bar.update(n_bytes, docs, final=True)
        bar.close()
        return n_bytes, seen.chars(), nonblank.seen

    def train_bpe(self) -> Tokenizer:
        """A byte-level BPE learned from the first tokenizer_sample characters of the training text."""
        budget = self.cfg.tokenizer_sample
        sample = {
            "budget_chars": budget,
            "chars": 0,
            "documents": 0,
            "what": "the first characters of the training text",
        }
        nonblank = _Nonblank()

        def texts() -> Iterator[str]:
            for part in pieces(self.parts(nonblank.watch(self.chunks())), False, PIECE_CHARS):
                if part.split != "train":
                    continue
                text = part.text[: budget - sample["chars"]]
                sample["chars"] += len(text)
                sample["documents"] += part.first
                yield text
                if sample["chars"] >= budget:
                    return

        shown = self.progress and sys.stderr.isatty()  # its bars print blank lines into a file or pipe
        tok = HFTokenizer.train_bpe(texts(), self.cfg.vocab_size, progress=shown)
        if not nonblank.seen:
            raise TinyLMError(f"The input ({', '.join(self.specs)}) is empty: there is no text to train on.")
        self.state["sample"] = sample
        return tok


class _Nonblank:
    """Whether any chunk held a non-space character (checked until one did)."""

    def __init__(self) -> None:
        self.seen = False

    def watch(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            if not self.seen and chunk.text and not chunk.text.isspace():
                self.seen = True
            yield chunk


class _CharSet:
    """The set of characters in a stream of text, collected with NumPy (ASCII text: bytes.translate)."""

    def __init__(self) -> None:
        self.ascii = bytearray()  # ASCII characters seen
        self.other = np.zeros(0x110000, dtype=bool)

    def add(self, text: str) -> None:
        if text.isascii():
            new = text.encode("ascii").translate(None, bytes(self.ascii))  # only unseen characters remain
            self.ascii += bytes(set(new))
        else:
            self.other[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")] = True

    def chars(self) -> set[str]:
        return {chr(c) for c in self.ascii} | {chr(c) for c in np.flatnonzero(self.other)}
