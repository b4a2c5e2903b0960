"""Autoregressive sampling: small pure logit filters, a KV-cache decode loop, text streaming."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from tinylm.config import SampleConfig, sample_config
from tinylm.errors import TinyLMError
from tinylm.progress import progress_bar
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


def decode_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weight dtype for decoding: auto is bf16 on GPUs with bf16 and on CPUs with bf16 units, else fp32."""
    from tinylm.runtime import cpu_has_bf16, resolve_dtype

    if name == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        return torch.float16  # a weight cast, not mixed-precision training: allowed for decoding
    return resolve_dtype(name, device)


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
    """decode_one_token compiled (CUDA graphs on GPU, a C++ wrapper on CPU); the model is an argument, so one
    per device kind serves all models."""
    device = next(model.parameters()).device.type
    return _compiled_step({"cuda": "reduce-overhead", "cpu": "cpp-wrapper"}.get(device, "default"))


@functools.cache
def _compiled_step(mode: str) -> object:
    if mode == "cpp-wrapper":  # kernels launched from C++, not Python: 1.1-1.3x per CPU step (RESULTS.md)
        return torch.compile(decode_one_token, fullgraph=True, options={"cpp_wrapper": True})
    return torch.compile(decode_one_token, mode=mode, fullgraph=True)


def warm_up(model: nn.Module, batch: int, rolling: bool = False) -> None:
    """Compile the decode step for `batch` rows before anything is timed (inductor caches it on disk)."""
    caches = model.decode_caches(batch, rolling=rolling)
    device = next(model.parameters()).device
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():  # writes position 0, which every prefill overwrites
        compiled_decode(model)(model, token, torch.zeros(1, dtype=torch.long, device=device), caches)


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: torch.Tensor,
    cfg: SampleConfig,
    use_cache: bool = True,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token (B,) for each of cfg.max_new_tokens steps after the prompt idx (B, T).

    With the KV cache (the model's own, reused across calls) the prompt is prefilled once, then
    each step feeds one token at its position through decode_one_token (compiled with `compile`,
    CUDA graphs on a GPU). Past the context, by default the most recent block_size tokens are
    re-encoded each step (the tutorial's cropping rule), so cached and uncached decoding give
    identical tokens; with cfg.rolling_cache (RoPE models) the cache keeps the last block_size keys
    at their original positions and decoding stays one token per step.
    """
    if cfg.rolling_cache and not use_cache:
        raise TinyLMError("rolling_cache needs the KV cache (use_cache=True).")
    if cfg.max_new_tokens == 0:
        return
    block = model.cfg.block_size
    generator = make_generator(cfg.seed, idx.device)
    if not use_cache:
        seq = idx
        for _ in range(cfg.max_new_tokens):
            nxt = select_next(model(seq[:, -block:])[:, -1], cfg, seq, generator)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            yield nxt
        return
    caches = model.decode_caches(idx.size(0), rolling=cfg.rolling_cache)
    seq, prompt = idx, idx[:, -block:]
    # Eager forwards take int positions (KVCache.update: the filled prefix, no masks); the
    # compiled step takes a position tensor, so one graph serves every position.
    logits = model(prompt, caches=caches, pos=0)[:, -1]
    for step in range(cfg.max_new_tokens):
        nxt = select_next(logits, cfg, seq, generator)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        yield nxt
        if step + 1 == cfg.max_new_tokens:
            break
        if seq.size(1) > block and not cfg.rolling_cache:  # re-encode the last block_size tokens
            logits = model(seq[:, -block:], caches=caches, pos=0)[:, -1]
        elif compile:
            position = torch.full((1,), seq.size(1) - 1, dtype=torch.long, device=idx.device)
            logits = compiled_decode(model)(model, nxt[:, None].contiguous(), position, caches)
        else:
            logits = model(nxt[:, None], caches=caches, pos=seq.size(1) - 1)[:, -1]


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
    ids: list[int] = field(default_factory=list)  # the generated token ids (before any stop string cut)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in text, or -1."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else -1


def _pending_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    return max(
        (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
        default=0,
    )


class RowText:
    """The text of one row as its tokens arrive: ends at end-of-text or before the first stop string.

    push() returns the text that is final so far (whole characters, never a possible start of a
    stop string); the one place where stop strings and end-of-text are handled, for generate,
    stream and the server.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = (), eot: int | None = None) -> None:
        self.tokenizer, self.stops, self.eot = tokenizer, stops, eot
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of self.text already returned
        self.done = False

    def push(self, token: int) -> str:
        """Add one generated token; return the newly final text ("" when none)."""
        if self.done:
            return ""
        if token == self.eot:
            self.done = True
            return self.finish()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        cut = _first_stop(text, self.stops)
        if cut >= 0:
            self.text, self.done = text[:cut], True
            return self.finish()
        self.text = text
        return self._take(len(text) - _pending_stop_prefix(text, self.stops))

    def finish(self) -> str:
        """The text not returned yet (at the end of decoding)."""
        self.text = self.text.rstrip("\ufffd")
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece


def _eot(tokenizer: Tokenizer, stop_at_eot: bool = True) -> int | None:
    """The end-of-text id that ends a row (a character vocabulary has none that ends text)."""
    return tokenizer.eot_id if (stop_at_eot and tokenizer.kind != "char") else None


def decode_texts(
    model: nn.Module,
    tokenizer: Tokenizer,
    idx: torch.Tensor,
    cfg: SampleConfig,
    use_cache: bool = True,
    compile: bool = False,
    stop_at_eot: bool = True,
) -> Iterator[tuple[list[str], list[RowText]]]:
    """The one decode path: after prompts idx (B, T), per step the new final text of each row.

    Yields (pieces, rows) per generated token and once more at the end; stops early when every
    row has ended (end-of-text or a stop string). generate() and stream() both run on it.
    """
    eot = _eot(tokenizer, stop_at_eot)
    rows = [RowText(tokenizer, cfg.stop, eot) for _ in range(idx.size(0))]
    if eot is None and not cfg.stop:  # nothing ends a row early: no per-token text work is needed
        steps = []  # tokens stay on the device until the end: no host sync per token
        for nxt in generate_tokens(model, idx, cfg, use_cache, compile=compile):
            steps.append(nxt)
            yield [""] * len(rows), rows
        for row, ids in zip(rows, torch.stack(steps, dim=1).tolist() if steps else [[]] * len(rows)):
            row.ids, row.text = ids, tokenizer.decode(ids)
        yield [row.finish() for row in rows], rows
        return
    for nxt in generate_tokens(model, idx, cfg, use_cache, compile=compile):
        yield [row.push(token) for row, token in zip(rows, nxt.tolist())], rows
        if all(row.done for row in rows):
            break
    yield [row.finish() for row in rows], rows


def stream(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig | None = None,
    *,
    use_cache: bool = True,
    stop_at_eot: bool = True,
    compile: bool = False,
    **options: Any,
) -> Iterator[str]:
    """Yield pieces of the continuation of one prompt as they are generated (whole characters only).

    Sampling comes from `cfg` with any SampleConfig field given in `options` replacing its value.
    """
    cfg = sample_config(cfg, **options)
    device = next(model.parameters()).device
    idx = torch.tensor([encode_prompt(tokenizer, prompt, model.cfg.block_size)], device=device)
    for pieces, _ in decode_texts(model, tokenizer, idx, cfg, use_cache, compile, stop_at_eot):
        if pieces[0]:
            yield pieces[0]


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | list[str] = "",
    cfg: SampleConfig | None = None,
    *,
    num_samples: int = 1,
    use_cache: bool = True,
    progress: bool = False,
    compile: bool = False,
    **options: Any,
) -> list[Generation]:
    """Continue one prompt or a list of prompts (any lengths), `num_samples` times each, in batches.

    Sampling comes from `cfg` (default SampleConfig()) with any SampleConfig field given as a
    keyword replacing its value, e.g. generate(model, tok, "ROMEO:", max_new_tokens=50, seed=0).
    Prompts of equal token length decode together as one batch; the same seed gives the same texts.
    Results come in order: prompt 0's samples, then prompt 1's, ...
    """
    cfg = sample_config(cfg, **options)
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
    bar = progress_bar(cfg.max_new_tokens * len(groups), desc="Generating", enabled=progress, delay=1.0)
    for members in groups.values():
        idx = torch.tensor([rows[i][1] for i in members], device=device)
        if compile and use_cache:
            warm_up(model, idx.size(0), cfg.rolling_cache)  # compiling is not part of the timed decode
        start = time.perf_counter()
        texts: list[RowText] = []
        for _, rows_so_far in decode_texts(model, tokenizer, idx, cfg, use_cache, compile):
            texts = rows_so_far
            bar.update(1)
        seconds = time.perf_counter() - start
        for i, row in zip(members, texts):
            results[i] = Generation(rows[i][0], row.text, len(row.ids), seconds, row.ids)
    bar.close()
    return results  # type: ignore[return-value]
