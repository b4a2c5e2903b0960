"""Batches drawn from token arrays: random windows, epochs of sliding windows, prompt/response pairs."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from tinylm.config import TrainConfig
from tinylm.data.shards import ShardedTokens, TokenData
from tinylm.errors import TinyLMError

Tokens = np.ndarray | ShardedTokens  # one split: a memmap, or shards read as one sequence

IGNORE = -100  # label of positions that carry no loss (padding, prompt tokens)

ADVICE = "use more text, a smaller --val-fraction, or a smaller block_size (--set block_size=N)"


def check_length(tokens: Tokens, block_size: int, split: str, advice: str = ADVICE) -> None:
    """A split must hold at least one full window of block_size + 1 tokens."""
    if len(tokens) < block_size + 1:
        raise TinyLMError(
            f"The {split} split has {len(tokens)} tokens, shorter than one context window ({block_size + 1}); "
            f"{advice}."
        )


def windows(tokens: Tokens, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        tokens: Tokens,
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

    def __init__(self, tokens: Tokens, block_size: int, stride: int = 1) -> None:
        check_length(tokens, block_size, "train")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        x, y = windows(self.tokens, np.array([i * self.stride]), self.block_size)
        return x[0], y[0]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-spread hash of uint64 values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowOrder:
    """A seeded permutation of range(n) evaluated only where asked, in memory proportional to the
    positions asked for: a 4-round Feistel network over the smallest power of four >= n (a bijection
    of that range) with cycle walking (values >= n are encrypted again until they fall inside, which
    keeps it a bijection of range(n)). The epoch order of every window is then a pure function of
    (seed, epoch), with no array of n indices."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self.half = max(1, (max(n, 2) - 1).bit_length() + 1) // 2  # bits per Feistel half
        keys = np.random.default_rng([seed, epoch, 0x5EED]).integers(
            0, 2**63, size=self.ROUNDS, dtype=np.int64
        )
        self.keys = keys.astype(np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> half, x & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right + key) & mask)
        return (left << half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The window indices at these positions of the order (int64, same shape)."""
        with np.errstate(over="ignore"):
            out = self._encrypt(np.asarray(positions, dtype=np.uint64))
            outside = out >= np.uint64(self.n)
            while outside.any():
                out[outside] = self._encrypt(out[outside])
                outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


class EpochWindows:
    """Shuffled passes over a SlidingWindowDataset as a BatchSource: step k of an epoch takes global
    batches k*grad_accum ... k*grad_accum + grad_accum - 1 of that epoch's order (a WindowOrder: a pure
    function of (seed, epoch), computed per batch in O(batch) memory, so resuming mid-epoch needs only
    the step number); ranks take slices of one global batch."""

    ORDER = "feistel"  # how epoch orders are drawn; checkpoints record it so a resume reads the same windows

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
        self._order: WindowOrder | None = None
        self._order_epoch = -1
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

    def order(self, epoch: int) -> WindowOrder:
        """Epoch `epoch`'s order of the windows: order(epoch)(positions) -> window indices."""
        if self._order is None or self._order_epoch != epoch:  # one cached: a step reads one epoch
            self._order, self._order_epoch = WindowOrder(len(self.dataset), self.seed, epoch), epoch
        return self._order

    def window_batch(self, epoch: int, index: int) -> Batch:
        """Global batch `index` of epoch `epoch` (0-based), this rank's slice."""
        first = index * self.batch_size * self.world_size + self.rank * self.batch_size
        mine = self.order(epoch)(np.arange(first, first + self.batch_size))
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
        return {"kind": "EpochWindows", "seed": self.seed, "size": len(self.dataset), "order": self.ORDER}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and state.get("kind") == "EpochWindows" and "order" not in state:
            raise TinyLMError(
                "This checkpoint was written by an older tinylm, which ordered each epoch's windows "
                "differently, so the run cannot continue exactly; finish it with that version or start a new run."
            )
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
    and a fixed set of validation batches (eval_batches, or eval_tokens' worth), so successive estimates
    are comparable."""
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
    return source, [val.batch(0, i) for i in range(eval_batches(cfg, block_size, world_size))]


def eval_batches(cfg: TrainConfig, block_size: int, world_size: int = 1) -> int:
    """Validation batches per estimate: eval_batches, or as many whole batches as eval_tokens needs."""
    if cfg.eval_tokens <= 0:
        return cfg.eval_batches
    per_batch = cfg.batch_size * block_size * world_size
    return max(1, -(-cfg.eval_tokens // per_batch))
