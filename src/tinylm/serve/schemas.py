"""OpenAI request bodies for /v1/completions and /v1/chat/completions (plus tinylm's extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # a last chunk with usage and no choices


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored as OpenAI's own server does."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = None  # choice i samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions
    top_k: int = Field(0, ge=0)  # 0 = off
    repetition_penalty: float = Field(1.0, gt=0.0)
    retrieval: bool | None = None  # with `tinylm serve --index`: retrieve passages (default on)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(..., min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)  # alternatives reported per token
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class AttentionRequest(BaseModel):
    """The playground's attention heatmap: greedy tokens after `prompt` and where each one looked."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str
    n_tokens: int = Field(8, ge=1, le=64)
