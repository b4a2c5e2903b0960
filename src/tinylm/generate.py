"""Autoregressive sampling: small pure logit filters, a KV-cache decode loop, text streaming."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tinylm.config import SampleConfig
from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide (B, V) logits by the temperature."""
    return logits / temperature


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf; k = 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p  # the first token always has before == 0 < p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens in `previous` (B, T): positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(-1, previous)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, previous, seen)


def select_next(
    logits: torch.Tensor, cfg: SampleConfig, previous: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose the next token (B,) from (B, V) logits: penalty, then greedy or filtered sampling."""
    logits = apply_repetition_penalty(logits.float(), previous, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(apply_temperature(logits, cfg.temperature), cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def decode_one_token(
    model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor, caches: list
) -> torch.Tensor:
    """Logits (B, V) for one new token (B, 1) at positions input_pos ((1,) or (B, 1)): fixed shapes,
    so it can be captured as a CUDA graph with torch.compile(mode="reduce-overhead")."""
    return model(token, caches=caches, pos=input_pos)[:, -1]


def compiled_decode(model: nn.Module) -> object:
    """decode_one_token compiled (CUDA graphs on GPU); the model is an argument, so one per mode serves all models."""
    return _compiled_step("reduce-overhead" if next(model.parameters()).is_cuda else "default")


@functools.cache
def _compiled_step(mode: str) -> object:
    return torch.compile(decode_one_token, mode=mode, fullgraph=True)


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    cfg: SampleConfig,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) for each of cfg.max_new_tokens steps after the prompt idx (B, T).

    With the KV cache each step feeds one new position. Once the sequence outgrows the context,
    the most recent block_size tokens are re-encoded each step (the tutorial's cropping rule), so
    cached and uncached decoding give identical tokens. `compile` compiles the one-token step
    (decode_one_token; CUDA graphs on a GPU).
    """
    step_fn = compiled_decode(model) if compile else decode_one_token
    block = model.cfg.block_size
    seq = idx
    caches = model.make_caches(idx.size(0)) if use_cache else None
    generator = make_generator(cfg.seed, idx.device)
    cached = 0  # positions already held in the caches
    for _ in range(cfg.max_new_tokens):
        if caches is None:
            logits = model(seq[:, -block:])
        else:
            if seq.size(1) > block:
                cached = 0  # re-encode the last block_size tokens from position 0
            new = seq[:, -block:] if cached == 0 else seq[:, cached:]
            positions = torch.arange(cached, cached + new.size(1), device=new.device)
            if new.size(1) == 1:
                logits = step_fn(model, new, positions, caches)[:, None]
            else:
                logits = model(new, caches=caches, pos=positions)
            cached += new.size(1)
        nxt = select_next(logits[:, -1], cfg, seq, generator)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        yield nxt


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """Prompt ids; an empty prompt starts from the end-of-text (or newline) token; long prompts keep their end."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    if len(ids) > block_size:
        warnings.warn(
            f"Prompt has {len(ids)} tokens, more than the context of {block_size}; keeping the last {block_size}."
        )
        ids = ids[-block_size:]
    return ids


@dataclass
class Generation:
    """One finished sample."""

    prompt: str
    text: str  # the continuation only
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _truncate_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stream(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    use_cache: bool = True,
    stop_at_eot: bool = True,
) -> Iterator[str]:
    """Yield pieces of the continuation as they are generated (whole characters only)."""
    for piece, _ in _pieces(model, tokenizer, prompt, cfg, use_cache, stop_at_eot):
        yield piece


def _pieces(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig, use_cache: bool, stop_at_eot: bool
) -> Iterator[tuple[str, int]]:
    """(new text, tokens generated so far) as decoding goes."""
    device = next(model.parameters()).device
    idx = torch.tensor([encode_prompt(tokenizer, prompt, model.cfg.block_size)], device=device)
    eot = tokenizer.eot_id if (stop_at_eot and tokenizer.kind != "char") else None
    ids: list[int] = []
    emitted, text = "", ""
    for nxt in generate_tokens(model, idx, cfg, use_cache):
        token = int(nxt[0])
        if eot is not None and token == eot:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            continue
        text, stopped = _truncate_at_stop(text, cfg.stop)
        if stopped:
            break
        safe = len(text) - _pending_stop_prefix(text, cfg.stop)  # hold back a possible start of a stop string
        if safe > len(emitted):
            yield text[len(emitted) : safe], len(ids)
            emitted = text[:safe]
    text = text.rstrip("\ufffd")
    if len(text) > len(emitted):
        yield text[len(emitted) :], len(ids)


def _collect_until_stop(
    tokens: Iterator[torch.Tensor],
    tokenizer: Tokenizer,
    cfg: SampleConfig,
    eot: int | None,
    rows: int,
    bar: tqdm,
) -> list[list[int]]:
    """Token ids per row, each row ending at end-of-text or once its text holds a stop string."""
    ids: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for nxt in tokens:
        bar.update(1)
        for row, token in enumerate(nxt.tolist()):
            if done[row]:
                continue
            if token == eot:
                done[row] = True
                continue
            ids[row].append(token)
            if cfg.stop and _truncate_at_stop(tokenizer.decode(ids[row][-64:]), cfg.stop)[1]:
                done[row] = True
        if all(done):
            break
    return ids


def _pending_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max(
        (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | list[str] = "",
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 0.95,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
    stop: tuple[str, ...] | list[str] = (),
    seed: int | None = None,
    num_samples: int = 1,
    use_cache: bool = True,
    progress: bool = False,
    compile: bool = False,
) -> list[Generation]:
    """Continue one prompt or a list of prompts (any lengths), `num_samples` times each, in batches.

    Prompts of equal token length decode together as one batch; the same seed gives the same texts.
    Results come in order: prompt 0's samples, then prompt 1's, ...
    """
    cfg = SampleConfig(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed, tuple(stop)
    )
    if num_samples < 1:
        raise TinyLMError(f"num_samples ({num_samples}) must be at least 1.")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = [
        (p, encode_prompt(tokenizer, p, model.cfg.block_size)) for p in prompts for _ in range(num_samples)
    ]
    groups: dict[int, list[int]] = {}
    for i, (_, ids) in enumerate(rows):
        groups.setdefault(len(ids), []).append(i)
    results: list[Generation | None] = [None] * len(rows)
    device = next(model.parameters()).device
    for members in groups.values():
        idx = torch.tensor([rows[i][1] for i in members], device=device)
        texts, counts, seconds = _decode_batch(model, tokenizer, idx, cfg, use_cache, progress, compile)
        for i, text, n in zip(members, texts, counts):
            results[i] = Generation(rows[i][0], text, n, seconds)
    return results  # type: ignore[return-value]


def _decode_batch(
    model: nn.Module,
    tokenizer: Tokenizer,
    idx: torch.Tensor,
    cfg: SampleConfig,
    use_cache: bool,
    progress: bool,
    compile: bool = False,
) -> tuple[list[str], list[int], float]:
    """Texts and token counts of a batch of equal-length prompts, each cut at end-of-text or a stop string."""
    eot = tokenizer.eot_id if tokenizer.kind != "char" else None
    start = time.perf_counter()
    bar = tqdm(total=cfg.max_new_tokens, desc="Generating", disable=not progress, leave=False)
    tokens = generate_tokens(model, idx, cfg, use_cache, compile=compile)
    if eot is None and not cfg.stop:  # nothing ends a row early: keep tokens on the device, sync once
        steps = []
        for nxt in tokens:
            steps.append(nxt)
            bar.update(1)
        ids = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(idx.size(0))]
    else:
        ids = _collect_until_stop(tokens, tokenizer, cfg, eot, idx.size(0), bar)
    bar.close()
    texts, counts = [], []
    for row_ids in ids:
        text = _truncate_at_stop(tokenizer.decode(row_ids), cfg.stop)[0]
        texts.append(text.rstrip("\ufffd"))
        counts.append(len(row_ids))
    return texts, counts, time.perf_counter() - start
