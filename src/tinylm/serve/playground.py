"""Data for the web playground: the run card and the attention of a generation."""

from __future__ import annotations

import json
from typing import Any

from tinylm.checkpoint import LoadedRun
from tinylm.config import SampleConfig, to_dict
from tinylm.model.transformer import parameter_summary
from tinylm.viz import generation_attention

# the sampling fields the page has inputs for; their starting values are SampleConfig's, the one home of defaults
PAGE_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def _curve(rows: list[dict], key: str, limit: int = 400) -> list[list[float]]:
    """[step, value] pairs of rows holding `key`, thinned evenly to at most `limit` points."""
    points = [[r["step"], r[key]] for r in rows if key in r and "step" in r]
    stride = max(1, -(-len(points) // limit))
    thinned = points[::stride]
    if points and thinned[-1] is not points[-1]:
        thinned.append(points[-1])
    return thinned


def run_card(run: LoadedRun, name: str) -> dict[str, Any]:
    """Config, parameter count, validation loss and loss curves of the served run."""
    path = run.path / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    val_loss = next((r["val_loss"] for r in reversed(evals) if "val_loss" in r), run.meta.get("val_loss"))
    return {
        "model": name,
        "path": str(run.path),
        "tokenizer": run.tokenizer.kind,
        "vocab_size": run.tokenizer.vocab_size,
        "parameters": parameter_summary(run.model)["parameters"],
        "config": to_dict(run.record.model),
        "train": to_dict(run.record.train),
        "step": run.meta.get("step"),
        "val_loss": val_loss,
        "train_curve": _curve(train, "loss"),
        "val_curve": _curve(evals, "val_loss"),
        "sampling": {k: getattr(SampleConfig(), k) for k in PAGE_SAMPLING},  # the page's starting values
    }


def attention_data(run: LoadedRun, prompt: str, n_tokens: int) -> dict[str, Any]:
    """Greedy tokens after `prompt` and, per token, its attention (n_layer, n_head, S) over the positions."""
    context, generated, steps = generation_attention(run.model, run.tokenizer, prompt, n_tokens)
    return {
        "context": context,
        "generated": generated,
        "attention": [[[[round(float(w), 4) for w in head] for head in layer] for layer in s] for s in steps],
    }
