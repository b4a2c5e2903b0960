"""Figures: training progress from a run's metrics, and attention maps while generating."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError

MAX_FIGSIZE = (16.0, 10.0)  # inches at DPI: 1,600 x 1,000 pixels, a laptop screen
DPI = 100


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TinyLMError(f"{run_dir} has no metrics.jsonl; is it a tinylm run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); weight 0 returns the values."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def _by_step(rows: list[dict], kind: str) -> list[dict]:
    """Rows of one type, one per step (a resumed session's repeat wins), in step order."""
    return list({r["step"]: r for r in rows if r.get("type") == kind}.values())


def training_figure(rows: list[dict]) -> Any:
    """Loss (raw, smoothed, validation) over steps with epochs marked, and the learning rate below."""
    import matplotlib.pyplot as plt

    train = sorted(_by_step(rows, "train"), key=lambda r: r["step"])
    if not train:
        raise TinyLMError("The run has no training rows to plot yet.")
    evals = sorted(_by_step(rows, "eval") or _by_step(rows, "epoch"), key=lambda r: r["step"])
    epochs = sorted(_by_step(rows, "epoch"), key=lambda r: r["step"])
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    smoothed = smooth(losses, weight=min(0.95, 1 - 10 / len(losses)) if len(losses) > 10 else 0.0)
    fig, (ax, ax_lr) = plt.subplots(
        2,
        1,
        figsize=(10, 6.5),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
        dpi=DPI,
        layout="constrained",
    )
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss")
    ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="training loss (smoothed)")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            markersize=7,
            linewidth=2,
            label="validation loss",
        )
        last = evals[-1]
        ax.annotate(
            f"{last['val_loss']:.3f}",
            (last["step"], last["val_loss"]),
            textcoords="offset points",
            xytext=(0, -16),
            ha="center",
            color="tab:orange",
        )
    shown = smoothed + [r["val_loss"] for r in evals]
    lo, hi = min(shown + losses), max(shown)
    pad = max(0.05 * (hi - lo), 0.02 * abs(hi), 1e-3)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set(ylabel="loss (nats per token)", title="Training progress")
    ax.legend(loc="upper right")
    _mark_epochs(ax, epochs, steps[-1])
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:green", linewidth=1.5)
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_ylim(bottom=0)
    for a in (ax, ax_lr):
        a.grid(alpha=0.3)
    return fig


def _mark_epochs(ax: Any, epochs: list[dict], last_step: int) -> None:
    """Dotted lines at epoch ends and an 'epoch' axis on top with one integer tick per epoch."""
    if not epochs:
        return
    bounds = [0] + [r["step"] for r in epochs]
    for step in bounds[1:]:
        if step < last_step:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b) / 2 for a, b in zip(bounds, bounds[1:])], [str(int(r["epoch"])) for r in epochs])
    top.set_xlabel("epoch")


def plot_training_progress(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Save the training-progress figure of RUN_DIR (default RUN_DIR/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig = training_figure(read_metrics(run_dir))
    except TinyLMError as exc:  # name the run, once
        msg = str(exc)
        raise TinyLMError(msg if msg.startswith(str(run_dir)) else f"{run_dir}: {msg}") from None
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def generation_attention(
    model, tokenizer, prompt: str, n_tokens: int = 5
) -> tuple[list[str], list[str], list]:
    """Greedily generate n_tokens with the KV cache, recording each new token's attention.

    Returns (context token strings, generated token strings, per step a (n_layer, n_head, S) tensor of
    the attention from the position that predicts that token over all S positions before it).
    """
    import torch

    from tinylm.generate import encode_prompt

    attns = [block.attn for block in model.blocks]
    ids = encode_prompt(tokenizer, prompt, model.cfg.block_size)
    if len(ids) + n_tokens > model.cfg.block_size:
        raise TinyLMError(
            f"Prompt plus {n_tokens} tokens exceeds the context ({model.cfg.block_size}); shorten the prompt."
        )
    device = next(model.parameters()).device
    caches = model.make_caches(1, len(ids) + n_tokens)
    for a in attns:
        a.record_weights = True
    steps, generated = [], []
    try:
        with torch.no_grad():
            x, pos = torch.tensor([ids], device=device), 0
            for _ in range(n_tokens):
                end = pos + x.size(1)
                logits = model(x, caches=caches, pos=torch.arange(pos, end, device=device))
                steps.append(torch.stack([a.weights[0, :, -1, :end] for a in attns]).cpu())  # (L, H, S)
                pos = end
                nxt = int(logits[0, -1].argmax())
                generated.append(nxt)
                x = torch.tensor([[nxt]], device=device)
    finally:
        for a in attns:
            a.record_weights, a.weights = False, None
    labels = [tokenizer.decode([i]) for i in ids + generated]
    return labels[: len(ids)], labels[len(ids) :], steps


def _show_token(text: str) -> str:
    """A token as a readable tick label: visible spaces and newlines, at most 8 characters."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "∅"
    return shown if len(shown) <= 8 else shown[:7] + "…"


def _attention_grid(steps: list, n_context: int) -> Any:
    """(n_layer, n_head, n_tokens, S) array: row i is generated token i's attention, NaN past its position."""
    import numpy as np

    n_layer, n_head = steps[0].shape[:2]
    total = n_context + len(steps) - 1
    grid = np.full((n_layer, n_head, len(steps), total), np.nan)
    for i, w in enumerate(steps):
        grid[:, :, i, : w.shape[-1]] = w.float().numpy()
    return grid


def attention_figure(context: list[str], generated: list[str], steps: list, average: bool = False) -> Any:
    """Layers x heads grid (plus each layer's mean), or one averaged map: generated tokens x positions."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import PowerNorm

    grid = np.ma.masked_invalid(_attention_grid(steps, len(context)))
    if average:
        grid = grid.mean(axis=(0, 1), keepdims=True)
    n_layer, n_head, n_tok, n_pos = grid.shape
    cols = n_head + 1 if n_head > 1 else 1
    cell_w, cell_h = max(0.1, 0.14 * n_pos), 0.22 * n_tok
    width = min(MAX_FIGSIZE[0], max(6.0, cols * (cell_w + 0.5) + 2.0))
    height = min(MAX_FIGSIZE[1], max(3.0, n_layer * (cell_h + 0.9) + 1.5))
    fig, axes = plt.subplots(
        n_layer, cols, figsize=(width, height), dpi=DPI, squeeze=False, layout="constrained"
    )
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # white: positions after the token
    x_labels = [_show_token(t) for t in (context + generated)[:n_pos]]
    y_labels = [f"→ {_show_token(t)}" for t in generated]
    every = max(1, math.ceil(n_pos / 40))
    rotation = 0 if max(len(t) for t in x_labels) <= 2 else 90
    for layer in range(n_layer):
        for col in range(cols):
            ax = axes[layer, col]
            is_mean = cols > 1 and col == n_head
            data = grid[layer].mean(axis=0) if is_mean else grid[layer, col]
            image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm)
            title = "averaged" if average else ("mean of heads" if is_mean else f"L{layer} H{col}")
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(0, n_pos, every))
            ax.set_yticks(range(n_tok))
            ax.set_xticklabels(
                x_labels[::every] if layer == n_layer - 1 else [], fontsize=7, rotation=rotation
            )
            ax.set_yticklabels(y_labels if col == 0 else [], fontsize=7)
    scope = "mean over layers and heads" if average else "rows: layers, columns: heads"
    fig.suptitle(f"Attention while generating ({scope}); each row: the token being predicted", fontsize=10)
    fig.supxlabel("context position (token)", fontsize=9)
    bar = fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    bar.set_label("attention weight (square-root scale)")
    return fig


def visualize_generation_attention(
    model, tokenizer, prompt: str, n_tokens: int = 5, out: str | Path = "attention.png", average: bool = False
) -> Path:
    """Save where each generated token looked: a layers x heads grid of maps, or their average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context, generated, steps = generation_attention(model, tokenizer, prompt, n_tokens)
    fig = attention_figure(context, generated, steps, average)
    out = Path(out)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
