"""The optimizers (AdamW; Muon for hidden matrices plus AdamW for the rest) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tinylm.config import TrainConfig
from tinylm.errors import TinyLMError
from tinylm.model.layers import HIDDEN_MATRIX, parameters_with_role


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay tensors with 2+ dimensions (matrices, embeddings, expert weights); not biases or norms."""
    return decay_groups([p for p in model.parameters() if p.requires_grad], weight_decay)


def decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | MuonAdamW:
    """cfg.optimizer: "adamw" over `param_groups` (fused kernel), or "muon" (see `MuonAdamW`).

    With "muon" but no trainable hidden matrix (LoRA: only the adapters train), AdamW trains everything.
    """
    if cfg.optimizer == "muon" and hidden_matrices(model):
        return MuonAdamW(model, cfg)
    return _adamw(param_groups(model, cfg.weight_decay), cfg)


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def hidden_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Trainable weights the model marks HIDDEN_MATRIX: what Muon orthogonalizes.

    The blocks' 2-D projections; not embeddings, the head, norms, biases, 3-D experts or LoRA
    adapters (their factors are small and low-rank, so AdamW trains them).
    """
    return [p for p in parameters_with_role(model, HIDDEN_MATRIX) if p.requires_grad and p.dim() == 2]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, batched over leading dimensions: the quintic Newton-Schulz
    iteration of Muon (Jordan et al., 2024). bf16 on GPUs; float32 elsewhere (CPU bf16 matmuls are slow)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    batched = x.dim() == 3
    x = x if batched else x.unsqueeze(0)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    x = x if batched else x.squeeze(0)
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weights: Nesterov momentum, then the update is
    replaced by its nearest semi-orthogonal matrix, scaled by sqrt(max(1, rows / cols)). Decoupled weight decay.
    Same-shaped matrices are orthogonalized together in one batched iteration."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ) -> None:
        if any(p.dim() != 2 for p in params):
            raise TinyLMError("Muon optimizes 2-D weight matrices only.")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps}
        )

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum" not in self.state[p]:
                        self.state[p]["momentum"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                nesterov = torch.stack(grads).lerp_(torch.stack(bufs), group["momentum"])
                update = orthogonalize(nesterov, group["ns_steps"]).unbind(0)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                torch._foreach_add_(params, update, alpha=-group["lr"] * scale)


class MuonAdamW:
    """`Muon` on `hidden_matrices`, AdamW on the rest (embeddings, head, norms, biases, 3-D experts, LoRA).

    Muon's learning rate is cfg.muon_lr; the schedule scales it with AdamW's through each group's
    "lr_scale" (muon_lr / lr), so one `lr_at` drives both. Looks like one optimizer to the Trainer:
    shared param_groups, step, zero_grad, and one state_dict.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        hidden = hidden_matrices(model)
        if not hidden:
            raise TinyLMError(
                "optimizer muon needs 2-D weight matrices inside the blocks to train; this model has none."
            )
        hidden_ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
        self.adamw = _adamw([g for g in decay_groups(rest, cfg.weight_decay) if g["params"]], cfg)
        self.muon = Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        for group in self.muon.param_groups:
            group["lr_scale"] = cfg.muon_lr / cfg.lr

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise TinyLMError("This optimizer state is not from optimizer muon.")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


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
