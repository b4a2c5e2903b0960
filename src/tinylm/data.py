"""Text sources -> token shards on disk (train.bin / val.bin + meta.json), and batches drawn from them."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from tinylm.config import TrainConfig
from tinylm.errors import TinyLMError
from tinylm.tokenizer import HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, tokenizer_hash

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


IGNORE = -100  # label of positions that carry no loss (padding, prompt tokens)

ADVICE = "use more text, a smaller --val-fraction, or a smaller block_size (--set block_size=N)"


def check_length(tokens: np.ndarray, block_size: int, split: str, advice: str = ADVICE) -> None:
    """A split must hold at least one full window of block_size + 1 tokens."""
    if len(tokens) < block_size + 1:
        raise TinyLMError(
            f"The {split} split has {len(tokens)} tokens, shorter than one context window ({block_size + 1}); "
            f"{advice}."
        )


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows starting at `starts`: both (B, block_size) int64."""
    offsets = np.arange(block_size + 1)
    chunk = torch.from_numpy(np.asarray(tokens[starts[:, None] + offsets], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]


# ----- batch sources ----------------------------------------------------------------------------
Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), both (B, T) int64


class BatchSource(Protocol):
    """Training batches by optimizer step. Every batch is a pure function of (seed, step, micro), so the
    resumable position is the step number; `state_dict` identifies the data so a resume can check it."""

    total_steps: int  # optimizer steps of the whole run

    def batch(self, step: int, micro: int = 0) -> Batch:
        """Micro-batch `micro` of optimizer step `step` (0-based) for this rank."""
        ...

    def epoch_of(self, step: int) -> float | None:
        """Epochs completed after `step` steps (fractional), or None when batches are drawn by step."""
        ...

    def epoch_done(self, step: int) -> int | None:
        """The epoch number that ends after `step` steps, else None."""
        ...

    def evaluates_at(self, step: int, eval_interval: int) -> bool:
        """Whether validation (and a `last` checkpoint) falls after `step` steps."""
        ...

    def label(self, step: int) -> str:
        """What the progress bar says after `step` steps."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _BySteps:
    """The schedule of sources drawn by step: evaluate every eval_interval steps and at the end."""

    total_steps: int = 0

    def epoch_of(self, step: int) -> float | None:
        return None

    def epoch_done(self, step: int) -> int | None:
        return None

    def evaluates_at(self, step: int, eval_interval: int) -> bool:
        return step % eval_interval == 0 or step == self.total_steps

    def label(self, step: int) -> str:
        return "Training"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "seed": self.seed, "size": self._size()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state != self.state_dict():
            raise TinyLMError(
                f"The training data changed since the checkpoint ({state} then, {self.state_dict()} now), "
                "so the run cannot continue exactly; restore the data or start a new run."
            )

    def _size(self) -> int:
        raise NotImplementedError


class RandomWindows(_BySteps):
    """nanoGPT-style random windows. Batch `step` is a pure function of (seed, step), so the
    sampler's whole state is the step number, and each rank takes its slice of one global batch."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        total_steps: int = 0,
    ):
        check_length(tokens, block_size, "train")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size, self.total_steps = seed, rank, world_size, total_steps

    def batch(self, step: int, micro: int = 0) -> Batch:
        """Micro-batch `micro` of optimizer step `step` for this rank."""
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return windows(self.tokens, mine, self.block_size)

    def _size(self) -> int:
        return len(self.tokens)


class SlidingWindowDataset(Dataset):
    """The tutorial's epoch dataset: every position i gives (tokens[i:i+T], tokens[i+1:i+T+1]) once."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int = 1) -> None:
        check_length(tokens, block_size, "train")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        x, y = windows(self.tokens, np.array([i * self.stride]), self.block_size)
        return x[0], y[0]


class EpochWindows:
    """Shuffled passes over a SlidingWindowDataset as a BatchSource: step k of an epoch takes global
    batches k*grad_accum ... k*grad_accum + grad_accum - 1 of that epoch's permutation (a pure function of
    the seed, so resuming mid-epoch needs only the step number); ranks take slices of one global batch."""

    def __init__(
        self,
        dataset: SlidingWindowDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        epochs: int = 1,
        grad_accum: int = 1,
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.epochs, self.grad_accum = rank, world_size, epochs, grad_accum
        self._order: tuple[int, np.ndarray] | None = None
        if self.batches_per_epoch < grad_accum:
            raise TinyLMError(
                f"--grad-accum ({grad_accum}) is larger than the {self.batches_per_epoch} batches of one epoch; "
                "lower --grad-accum or --batch-size, or use more text."
            )
        self.steps_per_epoch = self.batches_per_epoch // grad_accum
        self.total_steps = epochs * self.steps_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the ragged tail is dropped so every rank steps together)."""
        return max(1, len(self.dataset) // (self.batch_size * self.world_size))

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return self._order[1]

    def window_batch(self, epoch: int, index: int) -> Batch:
        """Global batch `index` of epoch `epoch` (0-based), this rank's slice."""
        size = self.batch_size * self.world_size
        chunk = self.order(epoch)[index * size : (index + 1) * size]
        mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return windows(self.dataset.tokens, mine * self.dataset.stride, self.dataset.block_size)

    def batch(self, step: int, micro: int = 0) -> Batch:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.window_batch(epoch, k * self.grad_accum + micro)

    def epoch_of(self, step: int) -> float | None:
        return step / self.steps_per_epoch

    def epoch_done(self, step: int) -> int | None:
        return step // self.steps_per_epoch if step and step % self.steps_per_epoch == 0 else None

    def evaluates_at(self, step: int, eval_interval: int) -> bool:
        return self.epoch_done(step) is not None

    def label(self, step: int) -> str:
        # After the last step the bar shows the last epoch, never "Epoch N+1/N".
        return f"Epoch {min(step // self.steps_per_epoch + 1, self.epochs)}/{self.epochs}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "EpochWindows", "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _BySteps.load_state_dict(self, state)  # type: ignore[arg-type]


Example = tuple[list[int], list[int]]  # (input ids, labels with IGNORE on prompt tokens)


def pad_batch(examples: list[Example], block_size: int) -> Batch:
    """Right-pad examples to (B, block_size); padded labels are IGNORE."""
    x = torch.zeros(len(examples), block_size, dtype=torch.long)
    y = torch.full((len(examples), block_size), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(labels)] = torch.tensor(labels)
    return x, y


class PairBatches(_BySteps):
    """Random prompt/response examples per step, a pure function of (seed, step, micro); each rank
    takes its slice of one global batch, like RandomWindows."""

    def __init__(
        self,
        examples: list[Example],
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        total_steps: int = 0,
    ) -> None:
        if not examples:
            raise TinyLMError("There are no prompt/response examples to train on.")
        self.examples, self.block_size, self.batch_size, self.seed = examples, block_size, batch_size, seed
        self.rank, self.world_size, self.total_steps = rank, world_size, total_steps

    def batch(self, step: int, micro: int = 0) -> Batch:
        picks = np.random.default_rng([self.seed, step, micro]).integers(
            0, len(self.examples), self.batch_size * self.world_size
        )
        mine = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return pad_batch([self.examples[i] for i in mine], self.block_size)

    def _size(self) -> int:
        return len(self.examples)


def token_batches(
    data: TokenData,
    block_size: int,
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    advice: str = ADVICE,
) -> tuple[BatchSource, list[Batch]]:
    """The training source a config asks for (epochs of sliding windows, or random windows by step)
    and a fixed set of validation batches, so successive estimates are comparable."""
    train_tokens, val_tokens = data.split("train"), data.split("val")
    check_length(train_tokens, block_size, "train", advice)
    check_length(val_tokens, block_size, "validation", advice)
    source: BatchSource
    if cfg.epochs > 0:
        dataset = SlidingWindowDataset(train_tokens, block_size, cfg.window_stride)
        source = EpochWindows(
            dataset, cfg.batch_size, cfg.seed, rank, world_size, epochs=cfg.epochs, grad_accum=cfg.grad_accum
        )
    else:
        source = RandomWindows(
            train_tokens, block_size, cfg.batch_size, cfg.seed, rank, world_size, total_steps=cfg.max_steps
        )
    val = RandomWindows(val_tokens, block_size, cfg.batch_size, cfg.seed + 1, rank, world_size)
    return source, [val.batch(0, i) for i in range(cfg.eval_batches)]
