"""The decoder-only transformer: GPT (Radford et al., 2019) or LLaMA (Touvron et al., 2023) flavoured."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelConfig
from tinylm.errors import TinyLMError
from tinylm.model.layers import (
    MLP,
    RESIDUAL_OUT,
    CausalSelfAttention,
    KVCache,
    MoE,
    RMSNorm,
    Rope,
    make_norm,
    parameters_with_role,
    rope_at,
    rope_frequencies,
)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, value_embed)
        self.norm2 = make_norm(cfg)
        self.ff = MoE(cfg) if cfg.n_expert else MLP(cfg)
        # embed_skip (modded-nanogpt): x <- x0_mix[0] * x + x0_mix[1] * x0 first, learned from (1, 0)
        self.x0_mix = nn.Parameter(torch.empty(2)) if cfg.embed_skip else None  # LEARNED_MIXES

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        cache: KVCache | None = None,
        pos: torch.Tensor | int | None = None,
        x0: torch.Tensor | None = None,
        ve: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, the MoE load-balancing loss, or None for a dense MLP); x0 (B, T, C) is the token
        embedding (embed_skip), ve (B, T, kv_dim) this layer's value embedding (value_embeds)."""
        if self.x0_mix is not None and x0 is not None:
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        x = x + self.attn(self.norm1(x), rope, cache, pos, ve)
        h, aux = self.ff(self.norm2(x))
        return x + h, aux


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    Positions are one type everywhere: a LongTensor `pos`, (T,) shared by every row or (B, T) per
    row (rows of one batch may stand at different positions); eager decoding may pass an int start
    instead (positions start..start+T-1, attending to the filled prefix of the cache, no masks; a
    compiled step passes a tensor, which does not recompile per position). Decoding keeps keys and values in
    `make_caches(batch)` (one KVCache per layer); each forward writes its tokens' keys at their
    positions and attends to cached keys at positions <= each query's own, so a cache can be reused
    for a new sequence without clearing it. `cache_rows(caches, i, j)` gives row views sharing
    storage, so one row can be prefilled alone with a (1, T) forward.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise TinyLMError("ModelConfig.vocab_size must be set (it normally comes from the tokenizer).")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.value_embeds = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, kv_dim) for _ in range(cfg.value_embeds)
        )
        self.value_tables = tuple(value_table(i, cfg) for i in range(cfg.n_layer))  # per layer, or None
        self.blocks = nn.ModuleList(Block(cfg, table is not None) for table in self.value_tables)
        # U-net skips: block i's output is added, times skip_weights[half-1-i], to block n_layer-1-i's input
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layer // 2)) if cfg.unet_skips else None
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.position == "rope":  # its values come from reset_buffers
            self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.grad_checkpointing = False  # switched on from outside by the trainer
        if self.tok_emb.weight.device.type != "meta":  # on meta the caller gives memory, then values
            self.reset_buffers()
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Every parameter by `init_rules`, drawn per (seed, name) (seed None: one draw from torch's generator)."""
        init_parameters(self, int(torch.randint(0, 2**62, ())) if seed is None else seed)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies), e.g. after `to_empty`."""
        if self.cfg.position == "rope":
            freqs = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta)
            self.rope_inv_freq = freqs.to(self.rope_inv_freq.device)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        caches: list[KVCache] | None = None,
        pos: torch.Tensor | int | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) for tokens idx (B, T) at positions `pos`; with return_aux, also the MoE loss.

        pos: LongTensor (T,) or (B, T), or an int start meaning start..start+T-1 shared by every row
        (with caches: positions 0..start-1 must already be in them); None means 0..T-1. With
        `caches` (from make_caches) the new keys and values are written into them at those positions
        and each token attends to every cached key at a position <= its own; without caches the T
        tokens attend causally to each other. Learned position embeddings need positions <
        block_size (RoPE has no such limit, which rolling caches use).
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise TinyLMError(
                f"Sequence of {T} tokens is longer than the model's context ({self.cfg.block_size}); crop it."
            )
        pos = 0 if pos is None else pos
        positions = torch.arange(pos, pos + T, device=idx.device) if isinstance(pos, int) else pos
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            if isinstance(pos, int) and pos + T > self.cfg.block_size:
                raise TinyLMError(
                    f"Position {pos + T - 1} is past the learned positions ({self.cfg.block_size})."
                )
            x = x + self.pos_emb(positions)  # (T, C) or (B, T, C)
        rope = self.rope(positions) if self.pos_emb is None else None
        x = self.drop(x) if self.training else x
        aux = torch.zeros((), device=idx.device) if return_aux else None
        x0 = x if self.cfg.embed_skip else None
        values = [table(idx) for table in self.value_embeds]  # (B, T, kv_dim) each
        if caches and not isinstance(pos, int):  # once per chunk, for every layer's cache alike
            caches[0].check_chunk(positions)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = self._unet(i, x, skips)
            table = self.value_tables[i]
            ve = values[table] if table is not None else None
            if self.grad_checkpointing and self.training:
                x, block_aux = checkpoint(block, x, rope, None, pos, x0, ve, use_reentrant=False)
            else:
                x, block_aux = block(x, rope, caches[i] if caches else None, pos, x0, ve)
            if aux is not None and block_aux is not None:  # summed only when asked (not when decoding)
                aux = aux + block_aux
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return (logits, aux) if return_aux else logits

    def _unet(self, i: int, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Block i's input with U-net skips: the first half pushes its inputs' successors, the last half pops."""
        if self.skip_weights is None:
            return x
        half, n = self.skip_weights.numel(), self.cfg.n_layer
        if 0 < i <= half:  # x is block i-1's output
            skips.append(x)
        if i >= n - half:
            x = x + self.skip_weights[i - (n - half)] * skips.pop()
        return x

    def rope(self, positions: torch.Tensor) -> Rope:
        """RoPE cos and sin for positions (T,) or (B, T) -> (..., T, head_dim)."""
        return rope_at(positions, self.rope_inv_freq)

    def make_caches(
        self,
        batch: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        rolling: bool = False,
    ) -> list[KVCache]:
        """One preallocated KV cache per layer for `batch` rows of up to max_len positions (block_size).

        rolling=True keeps the last max_len keys of an unbounded sequence instead (RoPE models only).
        """
        if rolling and self.pos_emb is not None:
            raise TinyLMError(
                "A rolling KV cache needs RoPE positions; learned position embeddings end at the context."
            )
        param = self.tok_emb.weight
        length = max_len or self.cfg.block_size
        dtype = dtype or param.dtype
        kv, hd = self.cfg.kv_heads, self.cfg.head_dim
        return [KVCache(batch, kv, length, hd, dtype, param.device, rolling) for _ in self.blocks]

    def decode_caches(self, batch: int, rolling: bool = False) -> list[KVCache]:
        """The model's own block_size caches for `batch` rows, made once and reused by later calls.

        Reuse needs no clearing (stale slots are masked by position) and keeps the same tensors
        for a compiled decode step (no recompiles; CUDA graphs replay). One decode at a time:
        concurrent decoders (the server) make their own with make_caches.
        """
        param = self.tok_emb.weight
        key = (batch, rolling, param.dtype, param.device)
        held = self.__dict__.get("_decode_caches")
        if held is None or held[0] != key:
            held = (key, self.make_caches(batch, rolling=rolling))
            self.__dict__["_decode_caches"] = held  # a plain attribute: not part of the module tree
        return held[1]


# ----- initialisation: the rules, and draws that any shard can make alone --------------------------
INIT_BLOCK = 1 << 20  # elements per independently seeded block of draws


@dataclass(frozen=True)
class Init:
    """How a parameter starts: N(0, std) draws if std > 0, else U(-bound, bound) if bound > 0, else the
    given `values` element by element if any, else all `value`."""

    std: float = 0.0
    bound: float = 0.0
    value: float = 0.0
    values: tuple[float, ...] = ()


# the speedrun options' learned mixing weights and where they start: value embeddings mix v and ve
# half and half, embed_skip starts at the block's own input, U-net skips at weight 1
LEARNED_MIXES = {
    "value_mix": Init(values=(0.5, 0.5)),
    "x0_mix": Init(values=(1.0, 0.0)),
    "skip_weights": Init(value=1.0),
}


def mark_init(module: nn.Module, init: Init, param: str = "weight") -> nn.Module:
    """Give `module`'s own parameter `param` its own start (e.g. LoRA's zero B), overriding the defaults."""
    module.param_inits = {**getattr(module, "param_inits", {}), param: init}
    return module


def init_rules(model: Transformer) -> dict[str, Init]:
    """The initialisation of every parameter, by name (the one place these rules live): a start a module
    marked with `mark_init`; else zero biases, unit norm weights, and N(0, 0.02) matrices, embeddings and
    experts, with weights marked RESIDUAL_OUT at 0.02 / sqrt(2 * n_layer) (GPT-2); with `zero_init` those
    and an untied head start at zero (every block the identity, the head uniform); LEARNED_MIXES."""
    cfg = model.cfg
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    residual = {id(p) for p in parameters_with_role(model, RESIDUAL_OUT)}
    rules = {}
    for name, p in model.named_parameters():
        path, _, own = name.rpartition(".")
        owner = model.get_submodule(path)
        if own in getattr(owner, "param_inits", {}):
            rules[name] = owner.param_inits[own]
        elif own == "bias":
            rules[name] = Init(value=0.0)
        elif isinstance(owner, (nn.LayerNorm, RMSNorm)):
            rules[name] = Init(value=1.0)
        elif own in LEARNED_MIXES:
            rules[name] = LEARNED_MIXES[own]
        elif cfg.zero_init and (id(p) in residual or name == "lm_head.weight"):  # a tied head is tok_emb's
            rules[name] = Init(value=0.0)
        elif p.dim() >= 2:
            rules[name] = Init(std=residual_std if id(p) in residual else 0.02)
        else:
            raise TinyLMError(f"No initialisation rule for parameter {name}; add one in init_rules.")
    return rules


def init_values(init: Init, numel: int, start: int, stop: int, key: str) -> torch.Tensor:
    """Elements [start, stop) of a parameter's flattened initial values (float32, CPU). Draws come in
    blocks of INIT_BLOCK elements, each from a generator seeded by (key, block), so a shard is drawn
    without the rest and every shard agrees with the whole."""
    if init.std <= 0 and init.bound <= 0:
        return (
            torch.tensor(init.values[start:stop]) if init.values else torch.full((stop - start,), init.value)
        )
    out = torch.empty(stop - start)
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1):
        lo, hi = block * INIT_BLOCK, min(numel, (block + 1) * INIT_BLOCK)
        digest = hashlib.blake2b(f"{key}/{block}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        values = torch.empty(hi - lo)
        if init.std > 0:
            values.normal_(0.0, init.std, generator=gen)
        else:
            values.uniform_(-init.bound, init.bound, generator=gen)
        a, b = max(start, lo), min(stop, hi)
        out[a - start : b - start] = values[a - lo : b - lo]
    return out


Local = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def init_parameters(model: Transformer, seed: int, local: Local | None = None) -> None:
    """Set every parameter to its initial values for `seed`: the same numbers on any device and under any
    sharding. `local(p)` gives the part of p this process holds and its offset in p's flattened elements
    (default: all of p)."""
    rules = init_rules(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            part, offset = local(p) if local is not None else (p, 0)
            if part.numel():
                values = init_values(rules[name], p.numel(), offset, offset + part.numel(), f"{seed}/{name}")
                part.copy_(values.view(part.shape))


def value_table(layer: int, cfg: ModelConfig) -> int | None:
    """Which value-embedding table layer `layer` mixes in: table i for layer i and for layer
    n_layer - value_embeds + i (the first and the last value_embeds layers); None for the others."""
    k, n = cfg.value_embeds, cfg.n_layer
    if layer < k:
        return layer
    if layer >= n - k:
        return layer - (n - k)
    return None


def parameter_summary(model: nn.Module) -> dict:
    """Trainable tensors and parameters, in total and per top-level module (blocks summed per part)."""
    seen: set[int] = set()
    parts: OrderedDict[str, dict[str, int]] = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        segments = name.split(".")
        key = ".".join(["blocks.*", segments[2]]) if segments[0] == "blocks" else segments[0]
        entry = parts.setdefault(key, {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += p.numel()
    total = {
        "tensors": sum(e["tensors"] for e in parts.values()),
        "parameters": sum(e["parameters"] for e in parts.values()),
    }
    return {**total, "modules": dict(parts)}


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Turns torch.nn.init's functions on meta tensors into no-ops: a tensor on the meta device has no values
    to draw, and drawing them there runs PyTorch's Python reference kernels, whose first use imports
    TorchDynamo (about a second of every command's start-up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device: shapes only, no memory, no initial values (memory and values come
    later: tinylm.checkpoint.materialise, then init_parameters or loaded weights)."""
    with torch.device("meta"), _SkipInit():
        yield
