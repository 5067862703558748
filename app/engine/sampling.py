"""Next-token choice for a batch of rows, each with its own parameters.

Greedy rows take the argmax. Sampled rows apply temperature, top-k and top-p, then draw with their own
torch.Generator when a seed is given, so a seeded request gives the same tokens whatever else shares its
batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to report per token (0: only the chosen one)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob) alternatives


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) -> logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> list[TokenChoice]:
    """logits (R, V), one row per request -> one TokenChoice per row."""
    if all(p.greedy and p.logprobs is None for p in params):  # the common case: one argmax, one sync
        return [TokenChoice(t) for t in logits.argmax(-1).tolist()]
    logits = logits.float()
    chosen = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        chosen[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i])[0]
    chosen_list = chosen.tolist()
    if all(p.logprobs is None for p in params):
        return [TokenChoice(t) for t in chosen_list]
    logprobs = logits.log_softmax(-1)
    out = []
    for i, (p, t) in enumerate(zip(params, chosen_list)):
        if p.logprobs is None:
            out.append(TokenChoice(t))
            continue
        top = None
        if p.logprobs > 0:
            values, ids = logprobs[i].topk(p.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        out.append(TokenChoice(t, float(logprobs[i, t]), top))
    return out
