"""Autoregressive sampling: small pure logit filters, a KV-cache decode loop, text streaming."""

from __future__ import annotations

import functools
import os
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


def filter_top_k(logits: torch.Tensor, k: int | torch.Tensor, max_k: int = 0) -> torch.Tensor:
    """Keep the k largest logits per row, set the rest to -inf; k = 0 or k >= V keeps all.

    k is one int for every row, or a (B, 1) tensor of per-row k's (V or more = off) whose largest below V
    is `max_k` (known on the host, so no sync is needed to size the topk)."""
    vocab = logits.size(-1)
    if isinstance(k, int):
        if k <= 0 or k >= vocab:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    else:
        if max_k <= 0:
            return logits
        values = torch.topk(logits, max_k, dim=-1).values  # (B, max_k), largest first
        kth = values.gather(-1, k.clamp(1, max_k) - 1)
        kth = kth.masked_fill(k >= vocab, float("-inf"))  # rows with top-k off keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (at least one).

    p is one float for every row or a (B, 1) tensor (inf = off for that row)."""
    if isinstance(p, float | int) and p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False  # the most likely token stays, even for a p that rounds to 0 in float32
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on the tokens marked in `seen` (B, V): positive logits / penalty, negative * penalty."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def seen_tokens(previous: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) mask of the tokens present in `previous` (B, T)."""
    seen = torch.zeros(previous.size(0), vocab_size, dtype=torch.bool, device=previous.device)
    return seen.scatter_(-1, previous, True) if previous.numel() else seen


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens in `previous` (B, T): positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    return penalize(logits, seen_tokens(previous, logits.size(-1)), penalty)


@dataclass
class RowSampling:
    """Per-row sampling settings as tensors, so rows with different SampleConfigs sample in one batch.

    Built once per generation (generate) or per change of the batch (the server); the host-side fields
    pick the filters to run, so choosing them needs no look at the tensors (no sync).
    """

    temperature: torch.Tensor  # (B, 1) float32; 1 for greedy rows
    top_k: torch.Tensor  # (B, 1) long; V where top-k is off
    top_p: torch.Tensor  # (B, 1) float32; inf where nucleus filtering is off
    penalty: torch.Tensor  # (B, 1) float32; 1 = off
    greedy: torch.Tensor  # (B,) bool
    max_k: int  # the largest k in use below V; 0 = no row filters by top-k
    nucleus: bool  # some row filters by top-p
    penalize: bool  # some row has a repetition penalty
    n_greedy: int  # rows that decode greedily

    @classmethod
    def of(cls, cfgs: list[SampleConfig], vocab_size: int, device: torch.device) -> RowSampling:
        """The settings of rows decoded with `cfgs` (one per row)."""
        ks = [c.top_k if c.do_sample and 0 < c.top_k < vocab_size else vocab_size for c in cfgs]
        ps = [c.top_p if c.do_sample and c.top_p < 1.0 else float("inf") for c in cfgs]
        column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
        return cls(
            temperature=column([c.temperature if c.do_sample else 1.0 for c in cfgs], torch.float32),
            top_k=column(ks, torch.long),
            top_p=column(ps, torch.float32),
            penalty=column([c.repetition_penalty for c in cfgs], torch.float32),
            greedy=torch.tensor([not c.do_sample for c in cfgs], dtype=torch.bool, device=device),
            max_k=max((k for k in ks if k < vocab_size), default=0),
            nucleus=any(p < 1.0 for p in ps),
            penalize=any(c.repetition_penalty != 1.0 for c in cfgs),
            n_greedy=sum(not c.do_sample for c in cfgs),
        )


def sample_rows(
    logits: torch.Tensor,
    rows: RowSampling,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from (B, V) logits, each row by its own settings; -1 where a row's numbers are not finite.

    Repetition penalty on the tokens in `seen` (B, V), then the argmax (greedy rows) or temperature, top-k,
    top-p and a draw. The draw is torch.multinomial's own: the argmax of probs / Exp(1) noise, the noise
    drawn from one generator for all rows (as multinomial does) or from each row's own generator (a list,
    None for greedy rows), so a row samples the token it would sample decoded alone.
    """
    logits = logits.float()
    if rows.penalize and seen is not None:
        logits = penalize(logits, seen, rows.penalty)
    batch = logits.size(0)
    if rows.n_greedy == batch:
        return logits.argmax(dim=-1).masked_fill(logits.isnan().any(dim=-1), -1)
    scaled = filter_top_k(logits / rows.temperature, rows.top_k, rows.max_k)
    if rows.nucleus:
        scaled = filter_top_p(scaled, rows.top_p)
    probs = scaled.softmax(dim=-1)
    if isinstance(generator, list):
        noise = torch.empty_like(probs)
        for i, gen in enumerate(generator):
            if gen is not None:
                noise[i].exponential_(generator=gen)
    else:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    tokens = (probs / noise).argmax(dim=-1)
    bad = probs.isnan().any(dim=-1)
    if rows.n_greedy:
        tokens = torch.where(rows.greedy, logits.argmax(dim=-1), tokens)
        bad = torch.where(rows.greedy, logits.isnan().any(dim=-1), bad)
    return tokens.masked_fill(bad, -1)


def select_next(
    logits: torch.Tensor, cfg: SampleConfig, previous: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose the next token (B,) from (B, V) logits: penalty, then greedy or filtered sampling (-1: not finite)."""
    rows = RowSampling.of([cfg] * logits.size(0), logits.size(-1), logits.device)
    seen = seen_tokens(previous, logits.size(-1)) if rows.penalize else None
    return sample_rows(logits, rows, seen, generator)


def decode_dtype(name: str, device: torch.device) -> torch.dtype:
    """Weight dtype for decoding: auto is bf16 on GPUs with bf16 and on CPUs with bf16 units, else fp32."""
    from tinylm.runtime import cpu_has_bf16, resolve_dtype

    if name == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        return torch.float16  # a weight cast, not mixed-precision training: allowed for decoding
    return resolve_dtype(name, device)


SEED_RANGE = 2**64  # torch.Generator seeds are 64-bit; any integer seed is reduced modulo this


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed` modulo 2**64 (negative seeds wrap as torch's own do), or randomly (None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % SEED_RANGE)
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
    block, vocab = model.cfg.block_size, model.cfg.vocab_size
    generator = make_generator(cfg.seed, idx.device)
    rows = RowSampling.of([cfg] * idx.size(0), vocab, idx.device)
    seen = seen_tokens(idx, vocab) if rows.penalize else None  # the prompt counts as already present
    invalid = torch.zeros((), dtype=torch.bool, device=idx.device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        nonlocal invalid
        nxt = sample_rows(logits, rows, seen, generator)
        invalid = invalid | (nxt < 0).any()  # checked once at the end: no host sync per step
        if seen is not None:
            seen.scatter_(-1, nxt.clamp(min=0)[:, None], True)
        return nxt

    if not use_cache:
        seq = idx
        for _ in range(cfg.max_new_tokens):
            nxt = pick(model(seq[:, -block:])[:, -1])
            seq = torch.cat([seq, nxt.clamp(min=0)[:, None]], dim=1)
            yield nxt
        _check_finite(invalid)
        return
    caches = model.decode_caches(idx.size(0), rolling=cfg.rolling_cache)
    window, length = idx[:, -block:], idx.size(1)
    crops = not cfg.rolling_cache and length + cfg.max_new_tokens > block  # the cropping rule will apply
    # Eager forwards take int positions (KVCache.update: the filled prefix, no masks); the
    # compiled step takes a position tensor, so one graph serves every position.
    logits = model(window, caches=caches, pos=0)[:, -1]
    for step in range(cfg.max_new_tokens):
        nxt = pick(logits)
        fed = nxt.clamp(min=0)[:, None]
        length += 1
        if crops:  # the last block_size tokens, re-encoded once past the context
            window = torch.cat([window[:, -(block - 1) :], fed], dim=1)
        yield nxt
        if step + 1 == cfg.max_new_tokens:
            break
        if length > block and not cfg.rolling_cache:  # re-encode the last block_size tokens
            logits = model(window, caches=caches, pos=0)[:, -1]
        elif compile:
            position = torch.full((1,), length - 1, dtype=torch.long, device=idx.device)
            logits = compiled_decode(model)(model, fed.contiguous(), position, caches)
        else:
            logits = model(fed, caches=caches, pos=length - 1)[:, -1]
    _check_finite(invalid)


NOT_FINITE = "The model's next-token scores were not finite (NaN or infinite logits); its weights are broken."


def _check_finite(invalid: torch.Tensor) -> None:
    if bool(invalid):
        raise TinyLMError(NOT_FINITE)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt starts from the end-of-text (or newline) token."""
    ids = tokenizer.encode(prompt) if prompt else []
    return ids or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """prompt_ids, of which a prompt longer than the context keeps its last block_size (with a warning)."""
    ids = prompt_ids(tokenizer, prompt)
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
    cuts = [text.find(s) for s in stops if s in text]
    return min(cuts) if cuts else -1


def _pending_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning (not the whole) of a stop string."""
    best = 0
    for stop in stops:
        i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while i != -1:  # left to right: the first start that matches is the longest for this stop
            if stop.startswith(text[i:]):
                best = max(best, len(text) - i)
                break
            i = text.find(stop[0], i + 1)
    return best


MAX_HELD_TOKENS = 8  # tokens a TextDecoder waits for the rest of a character (UTF-8 needs at most 4 bytes)


class TextDecoder:
    """Token ids to text one token at a time, at a cost per token independent of the text's length.

    Each push decodes only the tokens since the last shown one (plus that one, so decoders that depend on
    context agree) and returns the text they add once it ends in a whole character: byte-level tokens that
    split a character are held until it is complete. The pieces add up to tokenizer.decode(all ids) for
    valid UTF-8; invalid bytes show as replacement characters after MAX_HELD_TOKENS tokens.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decoding starts here: the last token already shown (context for the decoder)
        self.read = 0  # tokens before this index are shown

    def push(self, token: int) -> str:
        """Add one token; the new text (possibly "" while a character is incomplete)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") and len(self.ids) - self.read < MAX_HELD_TOKENS:
            return ""
        shown = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        self.prefix, self.read = self.read, len(self.ids)
        # the new text, after what was shown; should a later token change shown text (a character shown as
        # a replacement after MAX_HELD_TOKENS, then completed), only what follows the common start is new
        return text[len(os.path.commonprefix([shown, text])) :]


class RowText:
    """The text of one row as its tokens arrive: ends at end-of-text or before the first stop string.

    push() returns the text that is final so far (whole characters, never a possible start of a
    stop string); the one place where stop strings and end-of-text are handled, for generate,
    stream and the server. Per token it decodes and searches only the new text and what is held back,
    so its cost does not grow with the text's length.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = (), eot: int | None = None) -> None:
        self.decoder = TextDecoder(tokenizer)
        self.stops, self.eot = tuple(s for s in stops if s), eot
        self.pieces: list[str] = []  # text returned so far
        self.held = ""  # decoded text not returned yet: it may begin a stop string
        self.done = False

    @property
    def ids(self) -> list[int]:
        """The generated token ids (before any stop string cut; without the end-of-text token)."""
        return self.decoder.ids

    @property
    def text(self) -> str:
        """The text so far (cut at a stop string once one appears), held-back text included."""
        return "".join(self.pieces) + self.held

    def push(self, token: int) -> str:
        """Add one generated token; return the newly final text ("" when none)."""
        if self.done:
            return ""
        if token == self.eot:
            self.done = True
            return self.finish()
        new = self.decoder.push(token)
        if not new:
            return ""
        window = self.held + new  # a stop string can only start in the held text (or later)
        cut = _first_stop(window, self.stops)
        if cut >= 0:
            self.held, self.done = window[:cut], True
            return self.finish()
        end = len(window) - _pending_stop_prefix(window, self.stops)
        self.held = window[end:]
        return self._emit(window[:end])

    def finish(self) -> str:
        """The text not returned yet (at the end of decoding)."""
        piece, self.held = self.held, ""
        return self._emit(piece)

    def load(self, ids: list[int], text: str) -> None:
        """Take a whole row decoded at once (nothing ends it early: no per-token work was needed)."""
        self.decoder.ids, self.pieces, self.held = list(ids), [], text.rstrip("\ufffd")

    def _emit(self, piece: str) -> str:
        if piece:
            self.pieces.append(piece)
        return piece


def end_of_text(tokenizer: Tokenizer, stop_at_eot: bool = True) -> int | None:
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
    live: bool = False,
) -> Iterator[tuple[list[str], list[RowText]]]:
    """The one decode path: after prompts idx (B, T), per step the new final text of each row.

    Yields (pieces, rows) per generated token and once more at the end; stops early when every
    row has ended (end-of-text or a stop string). generate() and stream() both run on it. Unless
    `live` (stream()), a row nothing can end early is decoded once at the end, with no host sync per token.
    """
    eot = end_of_text(tokenizer, stop_at_eot)
    rows = [RowText(tokenizer, cfg.stop, eot) for _ in range(idx.size(0))]
    if eot is None and not cfg.stop and not live:  # nothing ends a row early: no per-token text work
        steps = []  # tokens stay on the device until the end: no host sync per token
        for nxt in generate_tokens(model, idx, cfg, use_cache, compile=compile):
            steps.append(nxt)
            yield [""] * len(rows), rows
        for row, ids in zip(rows, torch.stack(steps, dim=1).tolist() if steps else [[]] * len(rows)):
            row.load(ids, tokenizer.decode(ids))
        yield [row.finish() for row in rows], rows
        return
    for nxt in generate_tokens(model, idx, cfg, use_cache, compile=compile):
        tokens = nxt.tolist()
        if min(tokens) < 0:
            raise TinyLMError(NOT_FINITE)
        yield [row.push(token) for row, token in zip(rows, tokens)], rows
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
    for pieces, _ in decode_texts(model, tokenizer, idx, cfg, use_cache, compile, stop_at_eot, live=True):
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
