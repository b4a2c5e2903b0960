"""OpenAI request bodies for /v1/completions and /v1/chat/completions (plus tinylm's extensions).

Sampling fields left out take SampleConfig's defaults (the CLI's); ranges with fixed bounds are checked
here, the limits an operator sets (`tinylm serve --max-tokens-limit`, ...) by the server before any work.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tinylm.config import MAX_PENALTY, MIN_PENALTY

# Strict types (no "9" for 9), no NaN or Infinity, unknown fields ignored as OpenAI's own server does.
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False  # a last chunk with usage and no choices


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: SampleConfig.max_new_tokens; may exceed the context
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # 0 = greedy; tiny ones are refused
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None  # choice i samples with (seed + i) modulo 2**64
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    top_k: int | None = Field(None, ge=0)  # 0 = off
    repetition_penalty: float | None = Field(None, ge=MIN_PENALTY, le=MAX_PENALTY)
    retrieval: bool | None = None  # with `tinylm serve --index`: retrieve passages (default on)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]  # "" starts from the end-of-text token
    logprobs: int | None = Field(None, ge=0)  # alternatives reported per token
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class AttentionRequest(BaseModel):
    """The playground's attention heatmap: greedy tokens after `prompt` and where each one looked."""

    model_config = STRICT

    prompt: str
    n_tokens: int = Field(8, ge=1, le=64)
