"""A training run's loss histories: per step, per evaluation and per epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LossHistory:
    """What a run's loss did; saved in its checkpoints and returned in its TrainResult."""

    train_losses: list[dict] = field(default_factory=list)  # {step, loss}
    val_losses: list[dict] = field(default_factory=list)  # {step, epoch, loss}
    epoch_losses: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_loss}

    def add_train(self, step: int, loss: float) -> None:
        self.train_losses.append({"step": step, "loss": loss})

    def add_val(self, step: int, epoch: int, loss: float) -> None:
        self.val_losses.append({"step": step, "epoch": epoch, "loss": loss})

    def end_epoch(self, epoch: int, val_loss: float, epoch_of: Callable[[int], float]) -> float:
        """Record epoch `epoch` (1-based) as its average training loss and `val_loss`; return the average.
        `epoch_of(step)` is the (fractional) number of epochs completed after `step` steps."""
        losses = [r["loss"] for r in self.train_losses if epoch - 1 < epoch_of(r["step"]) <= epoch]
        average = sum(losses) / len(losses)
        self.epoch_losses.append({"epoch": epoch, "train_loss": average, "val_loss": val_loss})
        return average

    def last_val(self) -> float | None:
        return self.val_losses[-1]["loss"] if self.val_losses else None

    def evaluated_at(self, step: int) -> bool:
        return bool(self.val_losses) and self.val_losses[-1]["step"] == step

    def to_dict(self) -> dict[str, list[dict]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LossHistory:
        return cls(**{k: list(raw.get(k, [])) for k in ("train_losses", "val_losses", "epoch_losses")})
