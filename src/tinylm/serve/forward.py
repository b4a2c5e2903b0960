"""The model's forward pass over rows of shared KV caches: prefill one row, decode many rows at once."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from tinylm.model import cache_rows


class RowForward(Protocol):
    """Forward passes over numbered rows, each row one sequence with its own KV cache."""

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        """Encode a prompt (1, T) into row `row` from position 0; logits (1, V) of its last position."""
        ...

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token (n,) per row at its position (n,); next-token logits (n, V)."""
        ...


class BatchedForward:
    """One set of caches with a row per sequence; a decode step is one forward over rows 0..max(rows).

    Rows between active ones (finished sequences) are fed a dummy token at position 0: their caches
    are free, and a new sequence overwrites every position it attends to, so nothing leaks between
    sequences (the caches mask by stored key position).
    """

    def __init__(self, model: nn.Module, max_batch: int) -> None:
        self.model = model
        self.caches = model.make_caches(max_batch)
        self.device = next(model.parameters()).device

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.size(1), device=self.device)
        return self.model(idx, caches=cache_rows(self.caches, row, row + 1), pos=positions)[:, -1]

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        span = max(rows) + 1
        index = torch.tensor(rows, device=self.device)
        idx = torch.zeros(span, 1, dtype=torch.long, device=self.device).index_copy_(
            0, index, tokens[:, None]
        )
        pos = torch.zeros(span, 1, dtype=torch.long, device=self.device).index_copy_(
            0, index, positions[:, None]
        )
        caches = self.caches if span == len(self.caches[0].k) else cache_rows(self.caches, 0, span)
        return self.model(idx, caches=caches, pos=pos)[index, -1]  # (n, V)


class SerialForward:
    """One batch-1 cache per row and one forward pass per row: serving one sequence at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.caches: dict[int, list] = {}
        self.device = next(model.parameters()).device

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        self.caches[row] = self.model.make_caches(1)
        return self.model(idx, caches=self.caches[row], pos=torch.arange(idx.size(1), device=self.device))[
            :, -1
        ]

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = [
            self.model(tokens[i].view(1, 1), caches=self.caches[row], pos=positions[i].view(1))[:, -1]
            for i, row in enumerate(rows)
        ]
        return torch.cat(out)


def make_forward(model: nn.Module, max_batch: int, batched: bool = True) -> RowForward:
    """Rows decoded together in one forward pass, or (batched=False) one after another."""
    return BatchedForward(model, max_batch) if batched else SerialForward(model)
