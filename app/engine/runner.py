"""Turns a scheduled step into one forward pass, then samples tokens and applies task heads.

The runner owns every tensor; sequences are only read here. Its result maps each sequence that needs
something back to a TokenChoice (generation) or label probabilities (tag chunk, classify).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.engine.decode_graphs import StaticDecoder
from app.engine.kv_cache import CachedAttention, KVCache, PrefillChunk
from app.engine.model import Transformer
from app.engine.sampling import TokenChoice, sample, sanitize
from app.engine.scheduler import ScheduledStep
from app.engine.sequence import Mode, Sequence


# Not cuDNN: it builds an execution plan for every new shape (~0.4 s each on an H200), and the padded
# shapes of prefill steps are new almost every step. The memory-efficient kernel needs no plan.
EAGER_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class StepResult:
    tokens: dict[int, TokenChoice] = field(default_factory=dict)  # request_id -> next token
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # request_id -> label probabilities (CPU)
    num_tokens: int = 0  # tokens that went through the model

    def merge(self, other: StepResult) -> StepResult:
        self.tokens.update(other.tokens)
        self.probs.update(other.probs)
        self.num_tokens += other.num_tokens
        return self


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, static: StaticDecoder | None = None):
        """static: runs the decode-only steps (CUDA graphs); steps with prefill always run eagerly."""
        self.model, self.cache, self.static = model, cache, static
        self.device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=self.device)  # reseeded for every seeded draw (sampling.py)

    def write_prefix(self, seq: Sequence) -> None:
        if seq.prompt is not None:
            self.cache.write_prefix(seq.slot, seq.prompt.k, seq.prompt.v)

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> StepResult:
        tokens, positions, slots = [], [], []
        for seq in step.decode:
            tokens.append(seq.output_ids[-1])
            positions.append(seq.prefix_len + len(seq.prompt_ids) + len(seq.output_ids) - 1)
            slots.append(seq.slot)
        if self.static is not None and not step.prefill:
            logits = self.static.run(tokens, positions, slots)
            choices = self._sample(logits, step.decode)
            return StepResult(tokens={s.request_id: c for s, c in zip(step.decode, choices)}, num_tokens=len(tokens))
        chunks = []
        for seq, n in step.prefill:
            start = seq.prefix_len + seq.num_cached
            chunks.append(PrefillChunk(seq.slot, len(tokens), n, start))
            tokens += seq.prompt_ids[seq.num_cached:seq.num_cached + n]
            positions += range(start, start + n)
            slots += [seq.slot] * n
        attention = CachedAttention(self.cache, slots, positions, len(step.decode), chunks)
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        with sdpa_kernel(EAGER_ATTENTION_BACKENDS):
            hidden = self.model(attention.positions[None], attention, tokens=tokens_t[None])[0]  # (N, hidden)

        result = StepResult(num_tokens=len(tokens))
        to_sample: list[tuple[Sequence, int]] = [(seq, i) for i, seq in enumerate(step.decode)]
        for (seq, n), chunk in zip(step.prefill, chunks):
            last = chunk.offset + n - 1
            completes = seq.num_cached + n == len(seq.prompt_ids)
            if seq.mode == Mode.GENERATE and completes:
                to_sample.append((seq, last))
            elif seq.mode == Mode.TAG:
                result.probs[seq.request_id] = seq.prompt.head(hidden[chunk.offset:last + 1]).cpu()
            elif seq.mode == Mode.CLASSIFY and completes:
                result.probs[seq.request_id] = self.classify(seq, hidden[last]).cpu()
        if to_sample:
            logits = self.model.logits(hidden[[row for _, row in to_sample]])
            choices = self._sample(logits, [s for s, _ in to_sample])
            result.tokens = {s.request_id: c for (s, _), c in zip(to_sample, choices)}
        return result

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenChoice]:
        return sample(logits, [s.sampling for s in seqs], [len(s.output_ids) for s in seqs], self.generator)

    def classify(self, seq: Sequence, last_hidden: torch.Tensor) -> torch.Tensor:
        """A sequence head at the last text token, or the LM head's scores of the label words."""
        prompt = seq.prompt
        if prompt.head_weight is not None:
            return prompt.head(last_hidden)
        word_logits = self.model.logits(last_hidden)[prompt.label_token_ids]
        return sanitize(word_logits).softmax(-1)
