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


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Muon's quintic, the same at every iteration (Jordan et al., 2024)
# Polar Express (Amsel et al., 2025, arXiv:2505.16932): one quintic per iteration, optimal for 5 iterations
# with a 2% safety margin, as published (and used by modded-nanogpt); the input is scaled by 1 / (1.02 |g|_F).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(g: torch.Tensor, steps: int = 5, method: str = "newton-schulz") -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, batched over leading dimensions: the quintic Newton-Schulz
    iteration of Muon (Jordan et al., 2024), or Polar Express's per-iteration quintics (its first `steps`).
    bf16 on GPUs; float32 elsewhere (CPU bf16 matmuls are slow)."""
    polar = method == "polar-express"
    coefficients = POLAR_EXPRESS[:steps] if polar else [NEWTON_SCHULZ] * steps
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    x = x / (norm * 1.02 + 1e-6) if polar else x / (norm + 1e-7)
    batched = x.dim() == 3
    x = x if batched else x.unsqueeze(0)
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    x = x if batched else x.squeeze(0)
    return (x.mT if tall else x).to(g.dtype)


def normuon_scale(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al., 2025): divide each row (output neuron) of the orthogonalized update (..., m, n)
    by the root of its running mean square (second_moment (..., m, 1), updated in place), then restore
    the update's Frobenius norm, so the learning rate keeps Muon's meaning."""
    norm = update.norm(dim=(-2, -1), keepdim=True)
    second_moment.lerp_(update.square().mean(dim=-1, keepdim=True), 1 - beta2)
    scaled = update / (second_moment.sqrt() + 1e-10)
    return scaled * (norm / (scaled.norm(dim=(-2, -1), keepdim=True) + 1e-10))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weights: Nesterov momentum, then the update is
    replaced by its nearest semi-orthogonal matrix, scaled by sqrt(max(1, rows / cols)). Decoupled weight decay.
    Same-shaped matrices are orthogonalized together in one batched iteration. `method` picks the
    orthogonalizer ("newton-schulz" or "polar-express"); normuon=True adds NorMuon's per-neuron scaling."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        method: str = "newton-schulz",
        normuon: bool = False,
        beta2: float = 0.95,
    ) -> None:
        if any(p.dim() != 2 for p in params):
            raise TinyLMError("Muon optimizes 2-D weight matrices only.")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps}
        super().__init__(params, {**defaults, "method": method, "normuon": normuon, "beta2": beta2})

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
                update = orthogonalize(nesterov, group["ns_steps"], group["method"])
                if group["normuon"]:
                    update = self._normuon(params, update, group["beta2"])
                update = update.unbind(0)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                torch._foreach_add_(params, update, alpha=-group["lr"] * scale)

    def _normuon(self, params: list[torch.Tensor], update: torch.Tensor, beta2: float) -> torch.Tensor:
        """`normuon_scale` of the stacked updates (k, m, n), with each matrix's (m, 1) second moment."""
        for p in params:
            if "second_moment" not in self.state[p]:
                self.state[p]["second_moment"] = torch.zeros_like(p[:, :1], dtype=torch.float32)
        second = torch.stack([self.state[p]["second_moment"] for p in params])
        scaled = normuon_scale(update.float(), second, beta2)
        for p, s in zip(params, second.unbind(0)):
            self.state[p]["second_moment"].copy_(s)
        return scaled.to(update.dtype)


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
        self.muon = Muon(
            hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_steps=cfg.ns_steps,
            method=cfg.orthogonalizer, normuon=cfg.normuon, beta2=cfg.normuon_beta2,
        )  # fmt: skip
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
        # the settings come from this run's config: a state saved before a setting existed lacks its key
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.muon.param_groups]
        self.muon.load_state_dict(state["muon"])
        for group, kept in zip(self.muon.param_groups, settings):
            group.update(kept)
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


def batch_shape_at(step: int, cfg: TrainConfig, batch_size: int, block_size: int) -> tuple[int, int]:
    """(sequences, tokens per sequence) of step `step`'s micro-batches under the batch-size and
    sequence-length ramps: linear from batch_size_start / block_size_start to full size at ramp_steps,
    sequence lengths in multiples of 8 (0 = that ramp is off; full size from ramp_steps on)."""
    progress = min(1.0, step / cfg.ramp_steps) if cfg.ramp_steps else 1.0
    rows, length = batch_size, block_size
    if cfg.batch_size_start:
        rows = math.floor(cfg.batch_size_start + (batch_size - cfg.batch_size_start) * progress + 0.5)
    if cfg.block_size_start:
        length = cfg.block_size_start + (block_size - cfg.block_size_start) * progress
        length = min(block_size, max(cfg.block_size_start, 8 * math.floor(length / 8 + 0.5)))
    return rows, length
