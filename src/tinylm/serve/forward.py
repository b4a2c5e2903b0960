"""The model's forward pass over rows of shared KV caches: prefill one row, decode many rows at once."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class RowForward(Protocol):
    """Forward passes over numbered rows, each row one sequence with its own KV cache."""

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        """Encode a prompt (1, T) into row `row` from position 0; logits (1, V) of its last position."""
        ...

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token (n,) per row at its position (n,); next-token logits (n, V)."""
        ...

    def release(self, row: int) -> None:
        """The row's sequence has ended."""
        ...


class SerialForward:
    """One batch-1 cache per row and one forward pass per row: the one-at-a-time reference."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.caches: dict[int, list] = {}

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        self.caches[row] = self.model.make_caches(1)
        return self.model(idx, caches=self.caches[row], pos=0)[:, -1]

    def decode(self, rows: list[int], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = [
            self.model(tokens[i].view(1, 1), caches=self.caches[row], pos=int(positions[i]))[:, -1]
            for i, row in enumerate(rows)
        ]
        return torch.cat(out)

    def release(self, row: int) -> None:
        self.caches.pop(row, None)


def make_forward(model: nn.Module, max_batch: int, batched: bool = True) -> RowForward:
    """The batched forward when the model takes per-row positions, else the serial one."""
    return SerialForward(model)
