"""The sampling fields of the generating routes, declared once, and the one function that turns them into the
engine's SamplingParams. Each field is named as its SamplingParams field; the limits here are the wire's, so a
bad value is a 400 naming the field before the engine sees it."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from app.engine.sampling import SEED_RANGE, SamplingParams

SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # the engine takes a seed mod 2**64
MAX_STOP_CHARS = 256
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
MaxTokens = Annotated[int, Field(ge=1, le=1 << 20)]
TokenId = Annotated[int, Field(ge=0)]
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a logit_bias key: ASCII digits only (str.isdigit takes any script's)
COPY_SEED_STRIDE = 0xD1B54A32D192ED03  # copy j of a seeded request draws with seed + j * stride: n different answers


class SamplingFields(BaseModel):
    """The sampling fields of every generating route (each route declares max_tokens, whose default differs)."""
    temperature: float = Field(1.0, ge=0, le=5, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False,
                         description="nucleus sampling: keep the smallest set of tokens with this mass")
    top_k: int = Field(0, ge=0, le=1 << 20, description="0: no top-k cut")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX,
                             description="same seed, same output, whatever shares the batch")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description=f"stop strings (up to 4, each up to {MAX_STOP_CHARS} characters), not included in the text")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")


class OpenAISamplingFields(SamplingFields):
    """And those only the OpenAI routes take: OpenAI's penalties and logit_bias, vLLM's extensions."""
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="token id (as a string) -> added to its logit")
    min_tokens: int = Field(0, ge=0, le=1 << 20, description="(vLLM) nothing but max_tokens ends the output sooner")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="(vLLM) tokens that end the output")
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False,
                                      description="(vLLM) above 1: prompt and generated tokens are less likely")

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value):
        for key in value or {}:
            if not TOKEN_ID_KEY.fullmatch(key):
                raise PydanticCustomError("invalid_token", "logit_bias keys are token ids in ASCII digits (at most "
                                                           "10), e.g. {\"1234\": -100}")
        return value


def sampling_params(fields: SamplingFields, max_tokens: int, logprobs: int | None = None,
                    copy: int = 0) -> SamplingParams:
    """The engine's parameters for one sequence of a request. max_tokens: the request's, or the route's default;
    copy: which of a prompt's n copies this is (a seeded copy j draws with seed + j * COPY_SEED_STRIDE)."""
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    seed = None if fields.seed is None else (fields.seed + copy * COPY_SEED_STRIDE) % SEED_RANGE
    more = {}
    if isinstance(fields, OpenAISamplingFields):
        more = dict(presence_penalty=fields.presence_penalty, frequency_penalty=fields.frequency_penalty,
                    logit_bias={int(k): v for k, v in (fields.logit_bias or {}).items()}, min_tokens=fields.min_tokens,
                    stop_token_ids=list(fields.stop_token_ids or []), repetition_penalty=fields.repetition_penalty)
    return SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                          top_k=fields.top_k, seed=seed, stop=[s for s in stop if s], ignore_eos=fields.ignore_eos,
                          logprobs=logprobs, **more)
