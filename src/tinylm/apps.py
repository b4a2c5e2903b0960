"""The second tutorial's applications: text completion, story generation and simple Q&A."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tinylm.config import APP_SAMPLING, SampleConfig, sample_config
from tinylm.errors import TinyLMError
from tinylm.generate import NOT_FINITE, TextDecoder, encode_prompt, end_of_text, generate, generate_tokens
from tinylm.tokenizer import Tokenizer

STORY_PROMPT = "Write a short story about {theme}. Once upon a time,"
QA_PROMPT = "Q: {question}\nA:"


def complete_text(model: nn.Module, tokenizer: Tokenizer, text: str, **options: Any) -> str:
    """The prompt followed by its continuation; options are SampleConfig fields."""
    cfg = sample_config(APP_SAMPLING["complete"], **options)
    return text + generate(model, tokenizer, text, cfg)[0].text


def generate_story(model: nn.Module, tokenizer: Tokenizer, theme: str, **options: Any) -> str:
    """A story from the tutorial's prompt: "Write a short story about {theme}. Once upon a time,"."""
    prompt = STORY_PROMPT.format(theme=theme)
    return (
        prompt + generate(model, tokenizer, prompt, sample_config(APP_SAMPLING["story"], **options))[0].text
    )


def answer_question(model: nn.Module, tokenizer: Tokenizer, question: str, **options: Any) -> str:
    """The answer after "Q: {question}\\nA:": the first non-empty line the model writes."""
    cfg = sample_config(APP_SAMPLING["ask"], **options)
    return first_line(model, tokenizer, QA_PROMPT.format(question=question), cfg)


@torch.no_grad()
def first_line(model: nn.Module, tokenizer: Tokenizer, prompt: str, cfg: SampleConfig) -> str:
    """The first non-empty line of the continuation of `prompt`, stripped: blank lines before it are skipped
    (a model often starts its answer with a newline), then it ends at a newline or one of cfg.stop, within
    cfg.max_new_tokens tokens in all. The tokens come from the one decode loop, as generate's do; each new
    piece is searched only where a stop string could newly end."""
    stops = tuple(s for s in ("\n", *cfg.stop) if s)
    idx = torch.tensor(
        [encode_prompt(tokenizer, prompt, model.cfg.block_size)], device=next(model.parameters()).device
    )
    decoder, eot = TextDecoder(tokenizer), end_of_text(tokenizer)
    line, scanned = "", 0  # the answer so far (leading blank space skipped), and how much of it was searched
    for nxt in generate_tokens(model, idx, cfg):
        token = int(nxt[0])
        if token < 0:
            raise TinyLMError(NOT_FINITE)
        if token == eot:
            break
        piece = decoder.push(token)
        line = line + piece if line else piece.lstrip()
        cuts = [i for i in (line.find(s, max(0, scanned - len(s) + 1)) for s in stops) if i >= 0]
        if cuts:
            return line[: min(cuts)].strip()
        scanned = len(line)
    return line.strip()


APPS = {"complete": complete_text, "story": generate_story, "ask": answer_question}
