"""A training run's loss histories (per logged step, per evaluation, per epoch) and the little a checkpoint
needs to continue them: the histories themselves live in metrics.jsonl, so a checkpoint stays the same size
however long the run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LossHistory:
    """What a run's loss did, as metrics.jsonl records it; returned in the run's TrainResult."""

    train_losses: list[dict] = field(default_factory=list)  # {step, loss}: the logged steps (log_interval)
    val_losses: list[dict] = field(default_factory=list)  # {step, epoch, loss}
    epoch_losses: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_loss}
    last_train: float | None = None  # the latest step's loss
    epoch_sum: float = 0.0  # the current epoch's step losses, summed in step order
    epoch_steps: int = 0  # ... and counted

    def add_train(self, step: int, loss: float, logged: bool = True) -> None:
        """Step `step`'s loss; kept in `train_losses` when the step is logged."""
        self.last_train = loss
        self.epoch_sum += loss
        self.epoch_steps += 1
        if logged:
            self.train_losses.append({"step": step, "loss": loss})

    def add_val(self, step: int, epoch: float | None, loss: float) -> None:
        self.val_losses.append({"step": step, "epoch": epoch, "loss": loss})

    def end_epoch(self, epoch: int, val_loss: float) -> float:
        """Record epoch `epoch` (1-based) as the average loss of its steps and `val_loss`; return the average."""
        average = self.epoch_sum / max(self.epoch_steps, 1)
        self.epoch_losses.append({"epoch": epoch, "train_loss": average, "val_loss": val_loss})
        self.epoch_sum, self.epoch_steps = 0.0, 0
        return average

    def last_val(self) -> float | None:
        return self.val_losses[-1]["loss"] if self.val_losses else None

    def evaluated_at(self, step: int) -> bool:
        return bool(self.val_losses) and self.val_losses[-1]["step"] == step

    def to_dict(self) -> dict[str, list[dict]]:
        """The three histories (what TrainResult carries)."""
        return {
            "train_losses": self.train_losses,
            "val_losses": self.val_losses,
            "epoch_losses": self.epoch_losses,
        }

    def resume_state(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue: a fixed handful of numbers, never the histories."""
        last = self.val_losses[-1] if self.val_losses else None
        return {
            "last_train": self.last_train,
            "epoch_sum": self.epoch_sum,
            "epoch_steps": self.epoch_steps,
            "last_val": dict(last) if last else None,
        }

    @classmethod
    def resumed(cls, state: dict[str, Any], rows: Iterable[dict[str, Any]] = ()) -> LossHistory:
        """The history of a run resumed from a checkpoint's `resume_state`, with the histories read back from
        its metrics.jsonl `rows` (those up to the checkpoint's step)."""
        h = cls(
            last_train=state.get("last_train"), epoch_sum=state["epoch_sum"], epoch_steps=state["epoch_steps"]
        )
        for row in rows:
            if row.get("type") == "train":
                h.train_losses.append({"step": row["step"], "loss": row["loss"]})
            elif row.get("type") == "eval":
                h.add_val(row["step"], row.get("epoch"), row["val_loss"])
            elif row.get("type") == "epoch":
                h.epoch_losses.append(
                    {"epoch": row["epoch"], "train_loss": row["train_loss"], "val_loss": row["val_loss"]}
                )
        last = state.get("last_val")
        if last and not h.evaluated_at(last["step"]):  # metrics.jsonl lost or cut: the checkpoint decides
            h.val_losses.append(dict(last))
        return h

    @classmethod
    def from_old_checkpoint(cls, raw: dict[str, Any], epoch_of: Callable[[int], float | None]) -> LossHistory:
        """The history a checkpoint of an earlier version stored whole (`state["history"]`)."""
        h = cls(*(list(raw.get(k, [])) for k in ("train_losses", "val_losses", "epoch_losses")))
        if h.train_losses:
            step = h.train_losses[-1]["step"]
            h.last_train = h.train_losses[-1]["loss"]
            epoch = epoch_of(step)
            if epoch is not None:  # the steps of the epoch in progress
                done = int(epoch)
                current = [r["loss"] for r in h.train_losses if (epoch_of(r["step"]) or 0) > done]
                h.epoch_sum, h.epoch_steps = sum(current), len(current)
        return h
