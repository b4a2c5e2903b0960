"""The data layer: sources (readers) -> splits -> encoding -> shards (tokens on disk) -> batches (what
training draws); `prepare` (build) runs the first four."""

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
    WindowOrder,
    check_length,
    eval_batches,
    pad_batch,
    token_batches,
    windows,
)
from tinylm.data.build import prepare
from tinylm.data.shards import ShardedTokens, TokenData
from tinylm.data.sources import BUILTINS, Input, cache_dir, read_chunks, read_text_file, resolve_inputs
from tinylm.tokenizer import token_dtype

__all__ = [
    "ADVICE", "BUILTINS", "IGNORE", "Batch", "BatchSource", "EpochWindows", "Example", "Input", "PairBatches",
    "RandomWindows", "ShardedTokens", "SlidingWindowDataset", "TokenData", "WindowOrder", "cache_dir",
    "check_length", "eval_batches", "pad_batch", "prepare", "read_chunks", "read_text_file", "resolve_inputs", "token_batches",
    "token_dtype", "windows",
]  # fmt: skip
