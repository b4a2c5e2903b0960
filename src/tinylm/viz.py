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
        ax_val.plot(
            [r["epoch"] for r in epochs],
            [r["val_loss"] for r in epochs],
            "o-",
            color="tab:orange",
            label="validation",
        )
        ax_val.plot(
            [r["epoch"] for r in epochs],
            [r["train_loss"] for r in epochs],
            "s--",
            color="tab:blue",
            label="train (epoch average)",
        )
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


def visualize_generation_attention(
    model, tokenizer, prompt: str, n_tokens: int = 5, out: str | Path = "attention.png"
) -> Path:
    """One panel per generated token: a (layer, head) x context heatmap of where it looked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context, generated, steps = generation_attention(model, tokenizer, prompt, n_tokens)
    n_layer, n_head = steps[0].shape[:2]
    width = len(context) + n_tokens
    fig, axes = plt.subplots(
        n_tokens,
        1,
        figsize=(max(8, 0.35 * width + 2), (0.22 * n_layer * n_head + 1.2) * n_tokens),
        squeeze=False,
    )
    show = lambda s: repr(s)[1:-1].replace(" ", "␣") or "∅"
    for i, (ax, weights) in enumerate(zip(axes[:, 0], steps)):
        grid = weights.reshape(n_layer * n_head, -1).float().numpy()
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        labels = [show(t) for t in (context + generated)[: grid.shape[1]]]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(
            range(n_layer * n_head), [f"L{l}H{h}" for l in range(n_layer) for h in range(n_head)], fontsize=6
        )
        ax.set_title(f"token {i + 1}: attention when predicting {show(generated[i])!r}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
