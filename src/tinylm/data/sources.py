"""Where text comes from: files, folders, built-in corpora and Hugging Face datasets."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tinylm.errors import TinyLMError

# Built-in corpora: looked up in $TINYLM_DATA_DIR first, else downloaded once into the cache.
BUILTINS = {
    "shakespeare": dict(
        path="tinyshakespeare/input.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


@dataclass
class Source:
    """One loaded text source: its text and where it came from."""

    name: str
    text: str
    val_text: str | None = None  # an official validation split, when the source has one


def cache_dir() -> Path:
    return Path(os.environ.get("TINYLM_CACHE", Path.home() / ".cache" / "tinylm"))


def read_text_file(path: Path) -> str:
    """Read UTF-8 text or say why not."""
    if not path.is_file():
        what = "is a directory, not a text file" if path.is_dir() else "does not exist"
        raise TinyLMError(f"{path} {what}; pass a UTF-8 text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TinyLMError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 first."
        ) from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_builtin(name: str) -> Source:
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
            return Source(name, read_text_file(path))
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
    return Source(name, read_text_file(target))


def load_hf(spec: str) -> Source:
    """`hf:NAME[:CONFIG]` through Hugging Face `datasets`: its train split, and validation if it has one."""
    from tinylm.hub import offline_reason

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise TinyLMError(f"Write Hugging Face datasets as hf:NAME or hf:NAME:CONFIG, not {spec!r}.")
    offline = offline_reason()  # before importing datasets, which reads offline mode once
    try:
        import datasets
    except ImportError:
        raise TinyLMError(
            "Hugging Face datasets need the `datasets` package: pip install 'tinylm[datasets]'."
        ) from None
    try:
        ds = datasets.load_dataset(parts[1], parts[2] if len(parts) == 3 else None)
    except Exception as exc:  # no network, unknown name, ...
        if offline:
            raise TinyLMError(
                f"{spec!r} is not in the local Hugging Face cache and {offline}; connect to the network "
                "(the first download is cached) or pass a local text file."
            ) from None
        raise TinyLMError(
            f"Could not load {spec!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the name and your network, or pass a local text file."
        ) from None
    column = "text" if "text" in ds["train"].column_names else ds["train"].column_names[0]
    val = ds.get("validation")
    return Source(spec, "".join(ds["train"][column]), "".join(val[column]) if val is not None else None)


def load_source(spec: str) -> Source:
    """A text file, a directory of .txt files, a built-in name or hf:NAME[:CONFIG]."""
    if spec.startswith("hf:"):
        return load_hf(spec)
    path = Path(spec)
    if path.is_file():
        return Source(str(path), read_text_file(path))
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise TinyLMError(f"Directory {path} holds no .txt files.")
        return Source(str(path), "\n\n".join(read_text_file(f) for f in files))
    if spec in BUILTINS:
        return load_builtin(spec)
    raise TinyLMError(
        f"Input {spec!r} is not a file, a directory, a built-in corpus ({', '.join(BUILTINS)}) or hf:NAME."
    )
