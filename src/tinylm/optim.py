"""AdamW with weight decay on matrices only, and the learning-rate schedule as a pure function."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tinylm.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay tensors with 2+ dimensions (matrices, embeddings, expert weights); not biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel on GPUs."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device_type == "cuda",
    )


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from lr/warmup to lr over warmup_steps, then
    cosine: half-cosine decay to min_lr_ratio * lr at the last step;
    constant: lr;
    wsd: lr until the final decay_fraction of the run, then linear decay to min_lr_ratio * lr.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = total_steps - int(cfg.decay_fraction * total_steps)
        if step < decay_start:
            return peak
        progress = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return peak + (floor - peak) * min(1.0, progress)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
