"""The second tutorial's applications: text completion, story generation and simple Q&A."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tinylm.config import APP_SAMPLING, sample_config
from tinylm.generate import generate
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
    """The answer after "Q: {question}\\nA:", up to the end of its line."""
    cfg = sample_config(APP_SAMPLING["ask"], **options)
    return generate(model, tokenizer, QA_PROMPT.format(question=question), cfg)[0].text.strip()


APPS = {"complete": complete_text, "story": generate_story, "ask": answer_question}
