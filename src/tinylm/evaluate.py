"""Held-out loss, perplexity, and bits per token / character / byte over whole token streams."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.data import IGNORE
from tinylm.errors import TinyLMError
from tinylm.progress import progress_bar

SHOW_AFTER = 3.0  # seconds of evaluation before a progress bar appears


@dataclass
class EvalResult:
    """Summed negative log-likelihood (nats) over `tokens` predicted tokens, and the text they cover."""

    nll: float
    tokens: int
    chars: int = 0
    bytes: int = 0
    max_tokens: int | None = None  # the token budget it was given (None: every token)

    @property
    def loss(self) -> float:
        return self.nll / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / self.chars if self.chars else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    def summary(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_char": self.bits_per_char,
            "bits_per_byte": self.bits_per_byte,
            **asdict(self),
        }


def plan_windows(n_tokens: int, block_size: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, length, skip) windows covering every target once: non-overlapping by default; with a
    stride < block_size, windows overlap and only each window's last (new) targets are scored."""
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise TinyLMError(f"--stride ({stride}) must be between 1 and the context length ({block_size}).")
    plan, scored_until, start = [], 0, 0
    while start < n_tokens - 1:
        length = min(block_size, n_tokens - 1 - start)
        plan.append((start, length, max(0, scored_until - start)))
        scored_until = start + length
        if scored_until >= n_tokens - 1:
            break
        start += stride
    return plan


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    block_size: int,
    batch_size: int = 16,
    stride: int | None = None,
    chars: int = 0,
    n_bytes: int = 0,
    autocast: ContextManager | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every token of `tokens` (after the first) given its preceding context in the window, or
    only the first `max_tokens` of them; chars and n_bytes describe the whole of `tokens`."""
    if len(tokens) < 2:
        raise TinyLMError("Need at least two tokens to evaluate.")
    whole = len(tokens) - 1  # predicted tokens: the first token is never predicted
    if max_tokens is not None:
        if max_tokens < 1:
            raise TinyLMError(f"The token budget must be at least 1, not {max_tokens}.")
        tokens = tokens[: max_tokens + 1]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    plan = plan_windows(len(tokens), block_size, stride)
    nll, count = 0.0, 0
    batches = range(0, len(plan), batch_size)
    bar = progress_bar(len(batches), desc="Evaluating", enabled=progress, delay=SHOW_AFTER)
    for b in batches:
        group = plan[b : b + batch_size]
        width = max(length for _, length, _ in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for row, (start, length, skip) in enumerate(group):
            chunk = torch.from_numpy(np.asarray(tokens[start : start + length + 1], dtype=np.int64))
            x[row, :length] = chunk[:-1]
            y[row, skip:length] = chunk[1 + skip :]
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(x)
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((y != IGNORE).sum())
        bar.update(1)
    bar.close()
    model.train(was_training)
    scored = count / whole
    return EvalResult(nll, count, round(chars * scored), round(n_bytes * scored), max_tokens)


def scored_tokens(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Targets that carry a loss in these (x, y) batches (labels other than IGNORE)."""
    return sum(int((y != IGNORE).sum()) for _, y in batches)


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    autocast: ContextManager | None = None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """Average cross-entropy over a few (x, y) batches (IGNORE labels skipped): the quick estimate used
    during training, with a progress bar once it takes more than a few seconds. None when `stop()` says so
    before a batch (an interrupted run leaves its evaluation to the resumed one)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    bar = progress_bar(len(batches), desc="Validating", enabled=progress, delay=SHOW_AFTER)
    for x, y in batches:
        if stop is not None and stop():
            bar.close()
            model.train(was_training)
            return None
        with autocast or contextlib.nullcontext():
            logits = model(x.to(device))
        losses.append(
            F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE).item()
        )
        bar.update(1)
    bar.close()
    model.train(was_training)
    return sum(losses) / max(1, len(losses))
