"""Where text comes from, read as a stream of documents: files (.txt, .jsonl, .parquet, each optionally
.gz or .zst), folders, globs, built-in corpora and Hugging Face datasets (streamed). Nothing here holds a
whole corpus: text files arrive in chunks, records one at a time."""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import io
import itertools
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from tinylm.errors import TinyLMError

# Built-in corpora: looked up in $TINYLM_DATA_DIR first, else downloaded once into the cache.
BUILTINS = {
    "shakespeare": dict(
        path="tinyshakespeare/input.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}
FORMATS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}  # what a folder's files may be
COMPRESSIONS = (".gz", ".zst")
READ_BYTES = 1 << 20  # bytes per read from a text file (a character piece: no re-cutting)
VAL_SPLITS = ("validation", "valid", "val")  # a Hugging Face dataset's held-out split, by these names


@dataclass(frozen=True)
class Input:
    """One thing to read: a local file of some format, or a Hugging Face dataset."""

    name: str  # as shown to the user
    kind: str  # "text", "jsonl", "parquet" or "hf"
    path: Path | None = None
    compression: str = ""  # "", ".gz" or ".zst"
    size: int = 0  # bytes on disk (0 for hf)
    origin: str = ""  # the command-line input it came from (a folder, a glob, ...)

    def fingerprint(self) -> list:
        """What identifies this input's content cheaply: its path, size and modification time."""
        if self.path is None:
            return [self.name]
        stat = self.path.stat()
        return [str(self.path.resolve()), stat.st_size, stat.st_mtime_ns]


class Utf8Text:
    """One read of a text file kept as its UTF-8 bytes, for a tokenizer that encodes those directly (the
    character lookup: CharTokenizer.encode_utf8), so the reader never decodes it. What needs characters
    gets them: len() counts them on the bytes, str() and slices decode, and bytes that are not UTF-8 then
    raise the reader's error, naming the file and offset."""

    __slots__ = ("raw", "name", "offset", "_chars")

    def __init__(self, raw: bytes, name: str, offset: int) -> None:
        self.raw, self.name, self.offset = raw, name, offset
        self._chars = -1

    def __len__(self) -> int:
        if self._chars < 0:
            self._chars = utf8_chars(self.raw)
        return self._chars

    def __str__(self) -> str:
        try:
            return self.raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(self.name, self.offset + exc.start) from None

    def __getitem__(self, key: slice) -> str:
        return str(self)[key]

    def isspace(self) -> bool:
        return str(self).isspace()  # as str does (bytes.isspace leaves out \x1c to \x1f)


def utf8_chars(raw: bytes) -> int:
    """Characters in UTF-8 bytes: every byte but the continuation bytes (10xxxxxx: below -64 as int8)
    starts one."""
    return len(raw) if raw.isascii() else len(raw) - int(np.count_nonzero(np.frombuffer(raw, np.int8) < -64))


class Chunk(NamedTuple):
    """A piece of one document's text, in reading order."""

    text: str | Utf8Text  # Utf8Text only where the reader was asked for bytes (lazy)
    first: bool  # this chunk starts a new document
    split: str = ""  # "train" or "val" when the source has an official split, else ""
    raw: bytes | None = None  # text's UTF-8 bytes where the reader has them (text files, non-ASCII documents)


def cache_dir() -> Path:
    return Path(os.environ.get("TINYLM_CACHE", Path.home() / ".cache" / "tinylm"))


def read_text_file(path: Path) -> str:
    """Read UTF-8 text or say why not (for small files: prompts, evaluation texts)."""
    if not path.is_file():
        what = "is a directory, not a text file" if path.is_dir() else "does not exist"
        raise TinyLMError(f"{path} {what}; pass a UTF-8 text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc.start) from None


def _not_utf8(name: object, offset: int) -> TinyLMError:
    return TinyLMError(f"{name} is not UTF-8 text (bad byte at offset {offset}); convert it to UTF-8 first.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def builtin_path(name: str) -> Path:
    """A built-in corpus from $TINYLM_DATA_DIR, the cache, or its canonical URL (checksum verified)."""
    spec = BUILTINS[name]
    candidates = (
        [Path(os.environ["TINYLM_DATA_DIR"]) / spec["path"]] if os.environ.get("TINYLM_DATA_DIR") else []
    )
    candidates.append(cache_dir() / spec["path"])
    for path in candidates:
        if path.is_file():
            if _sha256(path) != spec["sha256"]:
                raise TinyLMError(
                    f"{path} does not match the expected checksum of {name!r}; delete or replace it."
                )
            return path
    target = candidates[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(spec["url"], tmp)
    except OSError as exc:
        raise TinyLMError(
            f"{name!r} is not in $TINYLM_DATA_DIR and could not be downloaded ({exc}); "
            f"set TINYLM_DATA_DIR to a folder holding {spec['path']}."
        ) from None
    if _sha256(tmp) != spec["sha256"]:
        tmp.unlink()
        raise TinyLMError(f"The download of {name!r} failed its checksum; try again.")
    tmp.replace(target)
    return target


# ----- resolving the command line's inputs -------------------------------------------------------
def _file_kind(path: Path) -> tuple[str, str] | None:
    """(format, compression) from the file name, or None when a folder should skip it."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind = FORMATS.get(suffixes[-1]) if suffixes else None
    return (kind, compression) if kind else None


def file_input(path: Path, name: str | None = None, origin: str = "") -> Input:
    """A file given by name: its format from its suffix; any other file is plain text."""
    suffix = path.suffix.lower()
    kind, compression = _file_kind(path) or ("text", suffix if suffix in COMPRESSIONS else "")
    if kind == "parquet" and compression:
        raise TinyLMError(f"{path}: Parquet compresses its own columns; pass the .parquet file uncompressed.")
    return Input(name or str(path), kind, path, compression, path.stat().st_size, origin or name or str(path))


def _folder(path: Path, origin: str) -> list[Input]:
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and _file_kind(p)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise TinyLMError(
            f"Directory {path} holds no .txt files (nor .jsonl or .parquet, plain or .gz/.zst compressed)."
        )
    return [file_input(f, origin=origin) for f in files]


def resolve_inputs(specs: list[str]) -> list[Input]:
    """Each command-line input as files to read in order: a file, a folder (its .txt/.jsonl/.parquet
    files, recursively, sorted), a glob, a built-in corpus name, or hf:NAME[:CONFIG]."""
    if not specs:
        raise TinyLMError("Give at least one input: a text file, a directory, a built-in name or hf:NAME.")
    inputs: list[Input] = []
    for spec in specs:
        path = Path(spec)
        if spec.startswith("hf:"):
            _hf_parts(spec)
            inputs.append(Input(spec, "hf", origin=spec))
        elif path.is_file():
            inputs.append(file_input(path))
        elif path.is_dir():
            inputs += _folder(path, spec)
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise TinyLMError(f"The pattern {spec!r} matches no files.")
            inputs += [file_input(f, origin=spec) for f in files]
        elif spec in BUILTINS:
            inputs.append(file_input(builtin_path(spec), name=spec))
        else:
            raise TinyLMError(
                f"Input {spec!r} is not a file, a directory, a glob, a built-in corpus "
                f"({', '.join(BUILTINS)}) or hf:NAME."
            )
    return inputs


# ----- reading documents -------------------------------------------------------------------------
def read_chunks(
    inp: Input, text_field: str = "text", opened: dict | None = None, lazy: bool = False
) -> Iterator[Chunk]:
    """The documents of one input as chunks in reading order: a text file is one document, a JSONL
    line or a Parquet / Hugging Face row is one document (its `text_field`). `opened` keeps Hugging
    Face datasets opened by an earlier pass, so a second pass streams without resolving them again.
    `lazy`: a text file's chunks are Utf8Text, not decoded here."""
    if inp.kind == "text":
        yield from (_lazy_text_chunks(inp) if lazy else _text_chunks(inp))
    elif inp.kind == "jsonl":
        yield from _jsonl_chunks(inp, text_field)
    elif inp.kind == "parquet":
        yield from _parquet_chunks(inp, text_field)
    else:
        yield from _hf_chunks(inp.name, text_field, {} if opened is None else opened)


@contextlib.contextmanager
def _open_binary(inp: Input) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed on the fly."""
    assert inp.path is not None
    if inp.compression == ".gz":
        import gzip

        with gzip.open(inp.path, "rb") as f:
            yield f
    elif inp.compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise TinyLMError(
                f"Reading {inp.name} needs the zstandard package: pip install 'tinylm[data]'."
            ) from None
        with open(inp.path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield f  # type: ignore[misc]
    else:
        with open(inp.path, "rb") as f:
            yield f


def _read_errors(inp: Input) -> tuple[type[BaseException], ...]:
    """What a corrupt compressed file raises while it is read."""
    errors: list[type[BaseException]] = [EOFError]
    if inp.compression == ".gz":
        import gzip
        import zlib

        errors += [gzip.BadGzipFile, zlib.error]
    elif inp.compression == ".zst":
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


def _reads(inp: Input) -> Iterator[bytes]:
    """A file's (decompressed) bytes in reads of READ_BYTES; a damaged compressed file is one sentence."""
    with _open_binary(inp) as f:
        while True:
            try:
                raw = f.read(READ_BYTES)
            except _read_errors(inp) as exc:
                raise TinyLMError(f"{inp.name} is not a valid {inp.compression} file ({exc}).") from None
            if not raw:
                return
            yield raw


def _text_chunks(inp: Input) -> Iterator[Chunk]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, first, carry = 0, True, b""  # carry: the bytes of a character cut by the last read
    for raw in itertools.chain(_reads(inp), [b""]):  # b"": the end, where a cut character is an error
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise _not_utf8(inp.name, offset - len(carry) + exc.start) from None
        offset += len(raw)
        data = carry + raw if carry else raw
        carry = decoder.getstate()[0]
        if text:
            yield Chunk(text, first, "", data[: len(data) - len(carry)] if carry else data)
            first = False


def _lazy_text_chunks(inp: Input) -> Iterator[Chunk]:
    """As _text_chunks, each read kept as bytes (Utf8Text), cut before a character the read split."""
    offset, first, carry = 0, True, b""  # offset: where `carry` starts in the file
    for raw in _reads(inp):
        data = carry + raw if carry else raw
        whole = _whole_chars(data)
        carry = data[whole:]
        if whole:
            kept = data[:whole] if carry else data
            yield Chunk(Utf8Text(kept, inp.name, offset), first, "", kept)
            first, offset = False, offset + whole
    if carry:  # the file ends inside a character
        raise _not_utf8(inp.name, offset)


def _whole_chars(data: bytes) -> int:
    """The length of `data` without a multi-byte character its end cuts short."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing cut
            return len(data)
        if byte >= 0xC0:  # the last character's first byte: is the character whole?
            size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= size else len(data) - back
    return len(data)  # continuation bytes only: malformed, which the encoding finds


def count_bytes(inp: Input) -> tuple[int, bool]:
    """A (compressed) text file's bytes once decompressed, and whether any is not a space."""
    n_bytes, nonblank = 0, False
    for raw in _reads(inp):
        n_bytes += len(raw)
        nonblank = nonblank or not raw.isspace()
    return n_bytes, nonblank


def _jsonl_chunks(inp: Input, text_field: str) -> Iterator[Chunk]:
    with _open_binary(inp) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (lineno names the line in errors)
                if line.strip():
                    record = json_record(line, inp.name, lineno)
                    text = _field(record, text_field, inp.name, f"line {lineno}")
                    if text:
                        yield _document(text, inp.name, f"line {lineno}")
        except UnicodeDecodeError:
            raise TinyLMError(
                f"{inp.name} line {lineno + 1} is not UTF-8 text; convert it to UTF-8 first."
            ) from None
        except _read_errors(inp) as exc:
            raise TinyLMError(f"{inp.name} is not a valid {inp.compression} file ({exc}).") from None


def json_record(line: str, name: str, lineno: int) -> object:
    """One JSONL line, or an error naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TinyLMError(f"{name} line {lineno} is not valid JSON ({exc.msg}).") from None


def _document(text: str, name: str, where: str, split: str = "") -> Chunk:
    """A decoded document as a chunk; one that is not ASCII is encoded to UTF-8 once, here (the hash and
    the byte counts read those bytes), and a lone surrogate (JSON's "\\ud800") is an error naming where."""
    if text.isascii():
        return Chunk(text, True, split)
    try:
        return Chunk(text, True, split, text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TinyLMError(
            f"{name} {where} holds {text[exc.start]!r}, half of a surrogate pair, which is not text; "
            "remove it or fix the pair."
        ) from None


def _field(record: object, text_field: str, name: str, where: str) -> str:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        has = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise TinyLMError(
            f"{name} {where} has no text field {text_field!r} (it has: {has}); "
            "pass --text-field NAME to read another field."
        )
    return text


def _parquet_chunks(inp: Input, text_field: str) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TinyLMError(f"Reading {inp.name} needs pyarrow: pip install 'tinylm[data]'.") from None
    try:
        parquet = pq.ParquetFile(inp.path)
    except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
        raise TinyLMError(f"{inp.name} is not a valid Parquet file ({exc}).") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise TinyLMError(
            f"{inp.name} has no column {text_field!r} (it has: {', '.join(columns)}); "
            "pass --text-field NAME to read another column."
        )
    number = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            number += 1
            if text:
                yield _document(str(text), inp.name, f"row {number}")


def _hf_parts(spec: str) -> tuple[str, str | None]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise TinyLMError(f"Write Hugging Face datasets as hf:NAME or hf:NAME:CONFIG, not {spec!r}.")
    return parts[1], parts[2] if len(parts) == 3 else None


def _load_hf(spec: str):  # -> datasets.IterableDatasetDict
    """`hf:NAME[:CONFIG]` opened with streaming (nothing is downloaded whole); NAME may be a local folder."""
    from tinylm.hub import offline_reason

    name, config = _hf_parts(spec)
    offline = None if Path(name).is_dir() else offline_reason()  # before importing datasets
    try:
        import datasets
    except ImportError:
        raise TinyLMError(
            "Hugging Face datasets need the `datasets` package: pip install 'tinylm[data]'."
        ) from None
    try:
        return datasets.load_dataset(name, config, streaming=True)
    except Exception as exc:  # no network, unknown name, ...
        if offline:
            raise TinyLMError(
                f"{spec!r} is not in the local Hugging Face cache and {offline}; connect to the network "
                "or pass local files."
            ) from None
        raise TinyLMError(
            f"Could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the name and your network, or pass local files."
        ) from None


def _hf_chunks(spec: str, text_field: str, opened: dict) -> Iterator[Chunk]:
    """A dataset's train split, then its validation split (its official held-out set) if it has one."""
    if spec not in opened:
        opened[spec] = _load_hf(spec)
    ds = opened[spec]
    if "train" not in ds:
        raise TinyLMError(f"{spec!r} has no train split (it has: {', '.join(ds)}).")
    val = next((s for s in VAL_SPLITS if s in ds), None)
    plan = [("train" if val else "", "train")] + ([("val", val)] if val else [])
    for split, key in plan:
        part = ds[key]
        columns = list(part.features) if part.features else None
        if columns is not None and text_field not in columns:
            raise TinyLMError(
                f"{spec!r} has no column {text_field!r} (it has: {', '.join(columns)}); "
                "pass --text-field NAME to read another column."
            )
        rows = iter(part)
        for number, row in enumerate(_guarded(rows, spec), 1):
            text = _field(row, text_field, f"{spec} ({key})", f"row {number}")
            if text:
                yield _document(text, f"{spec} ({key})", f"row {number}", split)


def _guarded(rows: Iterator[dict], spec: str) -> Iterator[dict]:
    """Rows of a streamed dataset; a failure on the way (network, corrupt shard) as one clear error."""
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise TinyLMError(
                f"Reading {spec!r} failed ({type(exc).__name__}: {str(exc)[:200]}); check your network "
                "and run prepare again."
            ) from None
        yield row
