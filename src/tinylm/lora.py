"""LoRA (Hu et al., 2021): low-rank adapters wrapped around chosen linear layers, from outside the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.errors import TinyLMError
from tinylm.model.transformer import Init, mark_init

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "fc", "proj", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are."""

    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # scale: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the adapter's input
    targets: tuple[
        str, ...
    ] = ()  # linear layers (by attribute name) to adapt; () = attention and MLP projections
    experts: bool = False  # also adapt Mixture-of-Experts expert weights (one low-rank update per expert)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise TinyLMError(f"LoRA rank ({self.rank}) must be a positive integer.")
        self.targets = tuple(self.targets)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T, with the base layer frozen and B = 0 at start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        mark_init(mark_init(self, Init(bound=1 / math.sqrt(base.in_features)), "lora_a"), Init(), "lora_b")
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight includes the adapter's update."""
        layer = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=self.base.weight.device,
            dtype=self.base.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.base.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.base.bias is not None:
                layer.bias.copy_(self.base.bias)
        return layer


class ExpertLoRA(nn.Module):
    """A parametrization of batched expert weights W (E, n, m): W + (alpha / r) * A[e] @ B[e], B = 0 at start."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        E, n, m = weight.shape
        self.lora_a = nn.Parameter(torch.randn(E, n, rank, device=weight.device) / math.sqrt(n))
        self.lora_b = nn.Parameter(torch.zeros(E, rank, m, device=weight.device))
        mark_init(mark_init(self, Init(std=1 / math.sqrt(n)), "lora_a"), Init(), "lora_b")  # as drawn above
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + torch.bmm(self.lora_a, self.lora_b) * self.scale


def _expert_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every 3-D expert weight (MoE w1 / w2 / w3)."""
    return [
        (m, n)
        for m in model.modules()
        for n in ("w1", "w2", "w3")
        if isinstance(getattr(m, n, None), torch.Tensor) and getattr(m, n).dim() == 3
    ]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze the model and wrap every nn.Linear whose attribute name is in cfg.targets (and experts if asked)."""
    available = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    targets = cfg.targets or tuple(t for t in DEFAULT_TARGETS if t in available)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise TinyLMError(
            f"No linear layer named {', '.join(unknown)} in this model; LoRA targets can be: {', '.join(available)}."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(child, cfg.rank, cfg.alpha, cfg.dropout))
    if cfg.experts:
        from torch.nn.utils import parametrize

        experts = _expert_modules(model)
        if not experts:
            raise TinyLMError(
                "LoRA on experts was asked for, but this model has no Mixture-of-Experts layers."
            )
        for module, name in experts:
            parametrize.register_parametrization(
                module, name, ExpertLoRA(getattr(module, name), cfg.rank, cfg.alpha)
            )
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (small enough to share on their own)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a" in k or ".lora_b" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, leaving a plain model that trains as usual."""
    from torch.nn.utils import parametrize

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
