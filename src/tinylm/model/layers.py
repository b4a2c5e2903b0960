"""Transformer building blocks: norms, rotary embeddings, causal attention, MLPs, Mixture-of-Experts."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.config import ModelConfig
from tinylm.errors import TinyLMError

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, head_dim)

# Roles a module marks on its own parameters, read from outside the model (init, optimizer split).
RESIDUAL_OUT = (
    "residual_out"  # writes into the residual stream: initialised with std 0.02 / sqrt(2 * n_layer)
)
HIDDEN_MATRIX = "hidden_matrix"  # a 2-D weight inside the blocks: what Muon orthogonalizes


def mark(module: nn.Module, *roles: str, param: str = "weight") -> nn.Module:
    """Tag `module`'s own parameter `param` with roles (RESIDUAL_OUT, HIDDEN_MATRIX); returns the module."""
    marks = dict(getattr(module, "param_roles", {}))
    marks[param] = marks.get(param, frozenset()) | frozenset(roles)
    module.param_roles = marks
    return module


def parameters_with_role(model: nn.Module, role: str) -> list[nn.Parameter]:
    """Every parameter some module of `model` marked with `role` (each once)."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, roles in getattr(module, "param_roles", {}).items():
            p = module._parameters.get(name)  # an own, unparametrized parameter
            if role in roles and p is not None:
                found[id(p)] = p
    return list(found.values())


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts: decoding pays per op
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/head_dim), (head_dim/2,), float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_at(positions: torch.Tensor, inv_freq: torch.Tensor) -> Rope:
    """cos and sin of position * frequency for any positions (T,) or (B, T) -> (..., T, head_dim).

    The rotate-half layout of LLaMA/HF; computed from the positions, so it has no length limit.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hd)
    return angles.cos(), angles.sin()


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> Rope:
    """cos and sin for positions 0..max_len-1, (max_len, head_dim)."""
    return rope_at(torch.arange(max_len), rope_frequencies(head_dim, theta))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys by their positions (Su et al., 2021).

    cos and sin are (T, hd) when every row shares its positions, or (B, T, hd) per row.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


_EMPTY = torch.iinfo(torch.long).max  # position of a slot never written: later than every query


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, (B, n_kv_head, max_len, head_dim).

    Every slot remembers the position of the key it holds (`pos`, (B, max_len)); a query attends to
    the slots whose position is <= its own, so slots left over from a longer earlier sequence (or from
    a row further ahead in the same batch) are ignored without clearing. The position-p key goes to
    slot p; with `rolling=True` to slot p % max_len, so the cache keeps the last max_len keys with
    their original positions (the oldest is overwritten). A rolling cache takes either a prefix
    starting at position 0 of at most max_len tokens or one token at a time after it.
    """

    def __init__(
        self,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        rolling: bool = False,
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.rolling = rolling
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        empty = torch.full((batch, max_len), _EMPTY, dtype=torch.long, device=device)
        self.register_buffer("pos", empty, persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(
        self, positions: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v (B, Hkv, T, hd) at `positions` (T,) or (B, T), per row; an int is the shared
        positions start..start+T-1 (eager decoding: the same meaning, known on the host).

        Returns the keys and values to attend to (B, Hkv, S, hd) and the boolean attention mask
        (B, 1, T, S), True where a slot holds a key at a position <= the query's: for a tensor all
        max_len slots; for an int the filled prefix, with None where causal attention is the mask.
        """
        if isinstance(positions, int):
            return self._write_prefix(positions, k, v)
        B, H, T, D = k.shape
        slots = positions % self.max_len if self.rolling else positions
        if positions.dim() == 1:  # shared by every row: an index_put that inductor does in place
            self.k[:, :, slots] = k.to(self.k.dtype)
            self.v[:, :, slots] = v.to(self.v.dtype)
            self.pos[:, slots] = positions
        else:
            index = slots[:, None, :, None].expand(B, H, T, D)
            self.k.scatter_(2, index, k.to(self.k.dtype))
            self.v.scatter_(2, index, v.to(self.v.dtype))
            self.pos.scatter_(1, slots, positions)
        positions = positions.expand(B, T)
        mask = self.pos[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, max_len)
        return self.k, self.v, mask

    def check_chunk(self, positions: torch.Tensor) -> None:
        """Refuse a chunk of several tokens (tensor positions) that a rolling cache cannot hold in one step: its
        later tokens would overwrite keys its earlier ones attend to. One host sync per chunk (the model
        checks once, before its layers); single tokens and plain caches cost nothing."""
        if self.rolling and positions.size(-1) > 1:
            last = int(positions.max())
            if last >= self.max_len:
                raise self._chunk_error(positions.size(-1), f"reaching position {last}")

    def _chunk_error(self, T: int, where: str) -> TinyLMError:
        return TinyLMError(
            f"A chunk of {T} tokens {where} does not fit a rolling KV cache of {self.max_len} in one step; "
            f"feed the tokens past position {self.max_len - 1} one at a time."
        )

    def _write_prefix(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """update() for the shared positions start..start+T-1, without scatter or mask.

        The eager decoding path: slots 0..start-1 must already hold this sequence's positions
        0..start-1 (prefill from 0, then one token at a time). Returns only the filled prefix of the
        keys and values, (B, Hkv, S, hd), and a mask only where SDPA's is_causal cannot express it
        (T > 1 after position 0); a rolling cache past max_len returns all slots, unmasked.
        """
        T, end = k.size(2), start + k.size(2)
        if self.rolling and T == 1:
            slot, end = start % self.max_len, min(end, self.max_len)
        elif start == 0 or not self.rolling:
            slot = start
            if end > self.max_len:
                raise TinyLMError(f"Positions up to {end - 1} do not fit a KV cache of {self.max_len}.")
        elif end > self.max_len:  # later tokens of the chunk would overwrite keys its earlier ones attend to
            raise self._chunk_error(T, f"at positions {start}..{end - 1}")
        else:  # a rolling cache given several tokens after position 0, still inside it: the general path
            return self.update(torch.arange(start, end, device=k.device), k, v)
        self.k[:, :, slot : slot + T] = k
        self.v[:, :, slot : slot + T] = v
        if T == 1:
            self.pos[:, slot : slot + 1].fill_(start)
        else:
            self.pos[:, slot : slot + T] = torch.arange(start, end, device=k.device)
        mask = None
        if T > 1 and start > 0:
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=start)
        return self.k[:, :, :end], self.v[:, :, :end], mask

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop-1 that shares this cache's storage (e.g. to prefill one row)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.rolling = self.rolling
        for name in ("k", "v", "pos"):
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view

    def reset(self) -> None:
        """Forget every key (the stored values stay but are never attended to)."""
        self.pos.fill_(_EMPTY)


def cache_rows(caches: list[KVCache], start: int, stop: int) -> list[KVCache]:
    """Row views start..stop-1 of every layer's cache, sharing storage."""
    return [c.rows(start, stop) for c in caches]


def position_mask(positions: torch.Tensor) -> torch.Tensor:
    """Causal mask (B or 1, 1, T, T) for tokens at `positions` (T,) or (B, T) attending to each other."""
    p = positions if positions.dim() == 2 else positions[None]
    return p[:, None, None, :] <= p[:, None, :, None]


class CausalSelfAttention(nn.Module):
    """Multi-head (optionally grouped-query) causal self-attention through F.scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.wq = mark(nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias), HIDDEN_MATRIX)
        self.wk = mark(nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias), HIDDEN_MATRIX)
        self.wv = mark(nn.Linear(cfg.n_embd, kv_dim, bias=cfg.bias), HIDDEN_MATRIX)
        self.wo = mark(nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias), HIDDEN_MATRIX, RESIDUAL_OUT)
        self.qk_norm_eps = cfg.norm_eps if cfg.qk_norm else None  # QK-norm: None = off
        # value embeddings (modded-nanogpt): v <- value_mix[0] * v + value_mix[1] * ve, learned from (0.5, 0.5)
        self.value_mix = nn.Parameter(torch.empty(2)) if value_embed else None  # set by init_rules
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.record_weights = False  # set from outside (viz) to keep the attention probabilities
        self.weights: torch.Tensor | None = None  # (B, n_head, T, S) when recorded

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: KVCache | None = None,
        pos: torch.Tensor | int | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) at positions `pos` -> (B, T, C); `ve` (B, T, kv_dim): a value embedding to mix in.

        pos: (T,) or (B, T) positions, or an int start for the shared positions start..start+T-1
        (None = 0). With a cache the new keys are written at their positions and each query attends
        to every cached key at a position <= its own (an int start: the filled prefix of the cache,
        KVCache.update); without one, the T tokens attend causally to each other.
        """
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm_eps is not None:  # bounds the attention logits (modded-nanogpt's QK-norm)
            q = F.rms_norm(q, (self.head_dim,), eps=self.qk_norm_eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.qk_norm_eps)
        if ve is not None and self.value_mix is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            v = self.value_mix[0] * v + self.value_mix[1] * ve
        if rope is not None:
            # queries and keys rotate together: one set of elementwise ops per layer, not two
            q, k = apply_rope(torch.cat([q, k], dim=1), *rope).split([self.n_head, self.n_kv_head], dim=1)
        mask = None  # None: plain causal attention over these T tokens (SDPA's is_causal)
        if pos is None:
            pos = 0
        if cache is not None:
            k, v, mask = cache.update(pos, k, v)  # (B, Hkv, S, hd), mask (B, 1, T, S) or None
        elif not isinstance(pos, int):
            mask = position_mask(pos)
        if self.record_weights:
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = self._attend_explicitly(q, k, v, mask)
        else:  # grouped-query attention without copying the cache: SDPA shares each kv head
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        y = self.wo(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return self.resid_drop(y) if self.training else y  # no module call per layer when decoding

    def _attend_explicitly(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        T, S = q.size(2), k.size(2)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        self.weights = probs.detach()
        return probs.to(v.dtype) @ v


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The non-gated activations: tanh-approximated GELU (GPT-2), or ReLU squared (So et al., 2021)."""
    if kind == "relu2":
        return F.relu(h).square()
    return F.gelu(h, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT), SwiGLU (LLaMA) or ReLU². Returns (output, None): no aux loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu, self.kind = cfg.mlp == "swiglu", cfg.mlp
        hidden = cfg.hidden_dim
        if self.swiglu:
            self.w1 = mark(nn.Linear(cfg.n_embd, hidden, bias=cfg.bias), HIDDEN_MATRIX)  # gate
            self.w3 = mark(nn.Linear(cfg.n_embd, hidden, bias=cfg.bias), HIDDEN_MATRIX)  # up
            self.w2 = mark(nn.Linear(hidden, cfg.n_embd, bias=cfg.bias), HIDDEN_MATRIX, RESIDUAL_OUT)  # down
        else:
            self.fc = mark(nn.Linear(cfg.n_embd, hidden, bias=cfg.bias), HIDDEN_MATRIX)
            self.proj = mark(nn.Linear(hidden, cfg.n_embd, bias=cfg.bias), HIDDEN_MATRIX, RESIDUAL_OUT)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.swiglu:
            y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        else:
            y = self.proj(activation(self.fc(x), self.kind))
        return (self.drop(y) if self.training else y), None


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward (Shazeer et al., 2017; Switch/Mixtral routing).

    A linear gate scores the experts; each token goes to its top-k, weighted by a softmax over the
    chosen experts' scores. Tokens are sorted by expert so each expert runs one matmul on all of its
    tokens (no loop over tokens, none dropped). Returns (output, load-balancing loss).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, C, H = cfg.n_expert, cfg.n_embd, cfg.hidden_dim
        self.n_expert, self.top_k, self.kind = E, cfg.n_expert_active, cfg.mlp  # w3 is not None: SwiGLU
        self.gate = mark(nn.Linear(C, E, bias=False), HIDDEN_MATRIX)
        self.w1 = nn.Parameter(torch.empty(E, C, H))  # in-projection (gate of SwiGLU)
        self.w3 = nn.Parameter(torch.empty(E, C, H)) if cfg.mlp == "swiglu" else None  # SwiGLU up-projection
        self.w2 = nn.Parameter(torch.empty(E, H, C))  # out-projection
        mark(self, RESIDUAL_OUT, param="w2")  # 3-D experts stay with AdamW: no HIDDEN_MATRIX
        self.drop = nn.Dropout(cfg.dropout)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For (N, C) tokens: chosen experts (N, k), their weights (N, k), router probabilities (N, E)."""
        logits = self.gate(x).float()  # (N, E)
        top_logits, experts = logits.topk(self.top_k, dim=-1)
        return experts, top_logits.softmax(dim=-1), logits.softmax(dim=-1)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its (n, C) tokens."""
        h = x @ self.w1[e]
        h = F.silu(h) * (x @ self.w3[e]) if self.w3 is not None else activation(h, self.kind)
        return h @ self.w2[e]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        experts, weights, probs = self.route(flat)
        if not self.training and flat.size(0) <= GATHER_MAX_TOKENS:
            # decode sizes: gather each token's chosen experts' weights (fixed shapes, no sort, no sync)
            return self._gathered(flat, experts, weights).view(B, T, C), probs.new_zeros(())
        assignment = experts.flatten()  # (N*k,) expert of each (token, slot)
        order = assignment.argsort(stable=True)
        token = order // self.top_k  # token of each sorted slot
        counts = torch.bincount(assignment, minlength=self.n_expert)
        out = self._sorted_experts(flat[token], counts)  # (N*k, C)
        out = out * weights.flatten()[order, None].to(out.dtype)
        y = torch.zeros_like(flat).index_add_(0, token, out.to(flat.dtype))
        return self.drop(y.view(B, T, C)), load_balancing_loss(probs, counts, self.n_expert)

    def _sorted_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert outputs for tokens x (n, C) sorted by expert, counts (E,) per expert.

        One grouped matmul per weight where PyTorch has it for this device (no host sync); else
        one matmul per expert on its slice (which needs the counts on the host).
        """
        if not torch.compiler.is_compiling() and _grouped_mm_works(x.device.type, x.dtype):
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, self.w1.to(x.dtype), offs=offs)
            if self.w3 is not None:
                h = F.silu(h) * torch._grouped_mm(x, self.w3.to(x.dtype), offs=offs)
            else:
                h = activation(h, self.kind)
            return torch._grouped_mm(h, self.w2.to(x.dtype), offs=offs)
        chunks = x.split(counts.tolist())
        return torch.cat([self.expert_forward(e, chunk) for e, chunk in enumerate(chunks)])

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(N, C) output from per-token gathered expert weights: cheap when N * k is small (decoding)."""
        h = torch.einsum("nc,nkch->nkh", x, self.w1[experts])
        h = (
            F.silu(h) * torch.einsum("nc,nkch->nkh", x, self.w3[experts])
            if self.w3 is not None
            else activation(h, self.kind)
        )
        out = torch.einsum("nkh,nkhc->nkc", h, self.w2[experts])
        return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)


GATHER_MAX_TOKENS = 8  # MoE inputs of at most this many tokens (decoding) use the gathered path


@functools.cache
def _grouped_mm_works(device: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (it is new and not on every device)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(5, 8, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(2, 8, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 5], device=device, dtype=torch.int32)
            y = torch._grouped_mm(x, w, offs=offs)
            y.backward(torch.ones_like(y))
            ref = torch.cat([x[:2].detach() @ w[0].detach(), x[2:].detach() @ w[1].detach()])
            return bool(torch.allclose(y.detach(), ref, atol=1e-2, rtol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e * P_e; equals 1.0 for perfectly uniform routing."""
    fraction = counts.float() / counts.sum().clamp(min=1)  # f_e: share of routed slots
    return n_expert * (fraction.detach() * probs.mean(dim=0)).sum()
