"""Request bodies. Field limits live here, so a bad request is a 422 that names the field."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.sampling import SamplingParams


class SamplingFields(BaseModel):
    """The engine's sampling fields, shared by every generating route."""
    max_tokens: int = Field(16, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=5, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    seed: int | None = Field(None, description="same seed, same output, whatever shares the batch")
    stop: str | list[str] | None = Field(None, description="stop strings (up to 4)")
    ignore_eos: bool = False

    def sampling_params(self, logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=[s for s in stop if s][:4],
                              ignore_eos=self.ignore_eos, logprobs=logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(SamplingFields):
    model: str = Field("base", description="'base' or the name of a generate prompt")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


class CompletionRequest(SamplingFields):
    model: str = Field("base", description="'base' or the name of a generate prompt")
    prompt: str = Field(min_length=1)
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(False, description="only false is supported")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = None
