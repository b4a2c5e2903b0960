"""The second tutorial's applications: text completion, story generation and simple Q&A."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tinylm.generate import generate
from tinylm.tokenizer import Tokenizer

STORY_PROMPT = "Write a short story about {theme}. Once upon a time,"
QA_PROMPT = "Q: {question}\nA:"


def complete_text(
    model: nn.Module, tokenizer: Tokenizer, text: str, max_new_tokens: int = 50, **sampling: Any
) -> str:
    """The prompt followed by its continuation."""
    return text + generate(model, tokenizer, text, max_new_tokens=max_new_tokens, **sampling)[0].text


def generate_story(
    model: nn.Module, tokenizer: Tokenizer, theme: str, max_new_tokens: int = 200, **sampling: Any
) -> str:
    """A story from the tutorial's prompt: "Write a short story about {theme}. Once upon a time,"."""
    sampling.setdefault("temperature", 0.8)
    return complete_text(model, tokenizer, STORY_PROMPT.format(theme=theme), max_new_tokens, **sampling)


def answer_question(
    model: nn.Module, tokenizer: Tokenizer, question: str, max_new_tokens: int = 50, **sampling: Any
) -> str:
    """The answer after "Q: {question}\\nA:", up to the end of its line."""
    sampling.setdefault("temperature", 0.7)
    sampling.setdefault("stop", ("\n",))
    answer = generate(
        model, tokenizer, QA_PROMPT.format(question=question), max_new_tokens=max_new_tokens, **sampling
    )[0].text
    return answer.strip()
