"""Turns a scheduled step into one forward pass, then samples tokens and applies task heads.

The runner owns every tensor and only runs the model: sequences are read here, never advanced (that is
Scheduler.postprocess). Its result maps each sequence that needs something back to a TokenChoice
(generation) or label probabilities (tag chunk, classify).
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.engine.attention import PagedAttention, PrefillChunk
from app.engine.decode_graphs import StaticDecoder
from app.engine.kv_cache import KVCache
from app.engine.model import Transformer
from app.engine.native_attention import NativeKernels
from app.engine.logits import adjust_logits
from app.engine.sampling import LOGPROB_FLOOR, TokenChoice, sample, sanitize
from app.engine.scheduler import ScheduledStep, StepResult
from app.engine.sequence import Sequence
from app.engine.request import Task

# Not cuDNN: it builds an execution plan for every new shape (~0.4 s each on an H200), and the padded
# shapes of prefill steps are new almost every step. The memory-efficient kernel needs no plan.
EAGER_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, static: StaticDecoder | None = None,
                 eos_ids: frozenset[int] = frozenset(), native: NativeKernels | None = None):
        """static: runs the decode-only steps (CUDA graphs); steps with prefill always run eagerly.
        eos_ids: the tokens `min_tokens` holds back. native: the CPU's C kernels for the eager steps' KV
        writes and decode attention (app/engine/native_attention.py); None: torch's."""
        self.model, self.cache, self.static, self.eos_ids = model, cache, static, eos_ids
        self.native = native
        self.device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device=self.device)  # reseeded for every seeded draw (sampling.py)

    def slot(self, seq: Sequence, position: int) -> int:
        B = self.cache.block_size
        return seq.block_table[position // B] * B + position % B

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> StepResult:
        for seq in step.sequences:  # task-prompt positions of freshly allocated blocks
            for block, start, end in seq.prefix_copies:
                self.cache.write_prefix(block, seq.prompt.k, seq.prompt.v, start, end)
        # decode rows longest first: attention groups them by length in runs of this order (attention.py)
        decode = sorted(step.decode, key=lambda seq: seq.prefix_len + seq.num_cached, reverse=True)
        tokens, positions, slots = [], [], []
        for seq in decode:
            tokens.append(seq.token_ids[seq.num_cached])
            positions.append(seq.prefix_len + seq.num_cached)
            slots.append(self.slot(seq, positions[-1]))
        if self.static is not None and not step.prefill:
            logits = self.static.run(tokens, positions, [seq.block_table for seq in decode])
            choices = self._sample(logits, decode)
            return StepResult(tokens={s.request_id: c for s, c in zip(decode, choices)}, num_tokens=len(tokens))
        chunks = []
        for seq, n in step.prefill:
            start = seq.prefix_len + seq.num_cached
            chunks.append(PrefillChunk(seq.block_table, len(tokens), n, start))
            tokens += seq.token_ids[seq.num_cached:seq.num_cached + n]
            positions += range(start, start + n)
            slots += [self.slot(seq, p) for p in range(start, start + n)]
        attention = PagedAttention(self.cache, slots, positions, [seq.block_table for seq in decode], chunks,
                                   native=self.native)
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        with sdpa_kernel(EAGER_ATTENTION_BACKENDS):
            hidden = self.model(attention.positions[None], attention, tokens=tokens_t[None])[0]  # (N, hidden)

        result = StepResult(num_tokens=len(tokens))
        to_sample: list[tuple[Sequence, int]] = [(seq, i) for i, seq in enumerate(decode)]
        for (seq, n), chunk in zip(step.prefill, chunks):
            last = chunk.offset + n - 1
            completes = seq.num_cached + n == seq.prefill_target
            if seq.task == Task.GENERATE and completes and not seq.output_ids:  # (after a preemption the
                to_sample.append((seq, last))  # next decode step feeds the last generated token)
            elif seq.task == Task.TAG:
                result.probs[seq.request_id] = seq.prompt.head(hidden[chunk.offset:last + 1]).cpu()
            elif seq.task == Task.CLASSIFY and completes:
                result.probs[seq.request_id] = self.classify(seq, hidden[last]).cpu()
            if seq.prompt_logprobs is not None and seq.num_cached < len(seq.prompt_ids):
                result.prompt_logprobs[seq.request_id] = (
                    seq.num_cached + 1, self.prompt_logprobs(seq, hidden[chunk.offset:last + 1]))
        if to_sample:
            logits = self.model.logits(hidden[[row for _, row in to_sample]])
            choices = self._sample(logits, [s for s, _ in to_sample])
            result.tokens = {s.request_id: c for (s, _), c in zip(to_sample, choices)}
        return result

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenChoice]:
        logits = adjust_logits(logits, seqs, self.eos_ids)
        return sample(logits, [s.sampling for s in seqs], [len(s.output_ids) for s in seqs], self.generator)

    def prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> list[TokenChoice]:
        """hidden (n, hidden) of prompt positions num_cached.. -> the log-probability of each next prompt
        token (the model's own, unadjusted), with seq.prompt_logprobs alternatives."""
        start = seq.num_cached
        targets = seq.prompt_ids[start + 1:start + 1 + hidden.shape[0]]  # the last position predicts no prompt token
        logprobs = sanitize(self.model.logits(hidden[:len(targets)])).log_softmax(-1).clamp(min=LOGPROB_FLOOR)
        chosen = logprobs.gather(1, torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None])[:, 0].tolist()
        top = [None] * len(targets)
        if seq.prompt_logprobs > 0:
            values, ids = logprobs.topk(seq.prompt_logprobs, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [TokenChoice(t, lp, alt) for t, lp, alt in zip(targets, chosen, top)]

    def classify(self, seq: Sequence, last_hidden: torch.Tensor) -> torch.Tensor:
        """A sequence head at the last text token, or the LM head's scores of the label words."""
        prompt = seq.prompt
        if prompt.head_weight is not None:
            return prompt.head(last_hidden)
        word_logits = self.model.logits(last_hidden)[prompt.label_token_ids]
        return sanitize(word_logits).softmax(-1)
