"""Figures: the training-progress plot from a run's metrics."""
from __future__ import annotations

import json
from pathlib import Path

from tinylm.errors import TinyLMError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TinyLMError(f"{run_dir} has no metrics.jsonl; is it a tinylm run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_progress(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """The tutorial's figure: training loss over steps, validation loss over epochs (or steps), plus the lr curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    epochs = [r for r in rows if r["type"] == "epoch"]
    if not train:
        raise TinyLMError(f"{run_dir} has no training rows to plot yet.")
    fig, (ax_train, ax_val, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_train.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", linewidth=1)
    ax_train.set(title="Training loss", xlabel="step", ylabel="loss")
    if epochs:
        ax_val.plot([r["epoch"] for r in epochs], [r["val_loss"] for r in epochs], "o-", color="tab:orange", label="validation")
        ax_val.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], "s--", color="tab:blue", label="train (epoch average)")
        ax_val.set(xlabel="epoch")
        ax_val.legend()
    else:
        ax_val.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange")
        ax_val.set(xlabel="step")
    ax_val.set(title="Validation loss", ylabel="loss")
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set(title="Learning rate", xlabel="step", ylabel="lr")
    for ax in (ax_train, ax_val, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
