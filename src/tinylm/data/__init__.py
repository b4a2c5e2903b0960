"""The data layer: sources (readers) -> shards (tokens on disk) -> batches (what training draws)."""

from tinylm.data.batches import (
    ADVICE,
    IGNORE,
    Batch,
    BatchSource,
    EpochWindows,
    Example,
    PairBatches,
    RandomWindows,
    SlidingWindowDataset,
    check_length,
    pad_batch,
    token_batches,
    windows,
)
from tinylm.data.shards import TokenData, prepare, token_dtype
from tinylm.data.sources import BUILTINS, Source, cache_dir, load_source, read_text_file

__all__ = [
    "ADVICE", "BUILTINS", "IGNORE", "Batch", "BatchSource", "EpochWindows", "Example", "PairBatches",
    "RandomWindows", "SlidingWindowDataset", "Source", "TokenData", "cache_dir", "check_length",
    "load_source", "pad_batch", "prepare", "read_text_file", "token_batches", "token_dtype", "windows",
]  # fmt: skip
