"""The model's forward passes over rows of shared KV caches: prefill one row, decode many rows at once."""

from __future__ import annotations

import torch
import torch.nn as nn

from tinylm.model import cache_rows


class BatchedForward:
    """One set of caches with a row per sequence; a decode step is one forward over rows 0..span-1.

    Rows that hold no sequence (or one decoded by re-encoding, `crop`) are fed a parked token at position
    0: their caches are free, and a new sequence overwrites every position it attends to before it
    attends to it, so nothing leaks between sequences (the caches mask by stored key position). With
    `rolling` (RoPE models) each row keeps its last block_size keys at their positions, so a row may
    decode past the context one token per step.
    """

    def __init__(self, model: nn.Module, max_batch: int, rolling: bool = False) -> None:
        self.model = model
        self.caches = model.make_caches(max_batch, rolling=rolling)
        self.views: dict[tuple[int, int], list] = {}  # row ranges of the caches, made once each

    def _rows(self, start: int, stop: int) -> list:
        if (start, stop) not in self.views:
            self.views[start, stop] = cache_rows(self.caches, start, stop)
        return self.views[start, stop]

    def prefill(self, row: int, idx: torch.Tensor) -> torch.Tensor:
        """Encode a prompt (1, T), T <= block_size, into row `row` from position 0; logits (1, V) of its end."""
        return self.model(idx, caches=self._rows(row, row + 1), pos=0)[:, -1]  # as generate() prefills

    def decode(self, span: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed rows 0..span-1 one token each (span,) at its position (span,); next-token logits (span, V)."""
        caches = self.caches if span == len(self.caches[0].k) else self._rows(0, span)
        return self.model(tokens[:, None], caches=caches, pos=positions[:, None])[:, -1]

    def crop(self, windows: torch.Tensor) -> torch.Tensor:
        """Re-encode each row's last block_size tokens (n, block_size) without a cache; logits (n, V).

        The cropping rule of generate() past the context of a model with learned positions."""
        return self.model(windows)[:, -1]
