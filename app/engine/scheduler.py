"""Waiting and running queues and their KV blocks: who runs in the next step, and how each advances after it.

Continuous batching: every step, each running sequence past its prompt decodes one token; prompts are
prefilled in chunks within a per-step token budget; new requests join while KV blocks are free. Order is
first come, first served: the queue head is never skipped, so a long prompt is not starved, and chunked
prefill keeps it from stalling the decoders behind it.

Memory is paged (app/engine/block_manager.py, which owns the hashing and the allocation): admission takes
blocks for the tokens a request has (after reusing every cached block of its longest cached prefix), and
decoding takes one more block every block_size tokens. When a decoding sequence needs a block and none is
free, the most recently admitted running sequence is preempted: its blocks are released (they stay cached),
it goes back to the front of the queue with the tokens it generated, and is recomputed when admitted again.

`schedule()` decides a step; `postprocess()` is the one place a sequence advances after it: counters,
sampled tokens, finish decisions, prefix-cache registration and freeing blocks.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from app.engine.block_manager import BlockManager
from app.engine.request import FinishReason, Task
from app.engine.sampling import TokenChoice
from app.engine.sequence import Sequence, Status

@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, text tokens this step)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [seq for seq, _ in self.prefill]

    def halves(self) -> tuple[ScheduledStep, ScheduledStep]:
        """The same work split in two steps of about half the sequences each (to find a failing one)."""
        seqs = self.sequences
        first = set(seqs[:len(seqs) // 2])
        return self._subset(first.__contains__), self._subset(lambda seq: seq not in first)

    def _subset(self, keep) -> ScheduledStep:
        return ScheduledStep([s for s in self.decode if keep(s)], [(s, n) for s, n in self.prefill if keep(s)])


@dataclass
class StepResult:
    tokens: dict[int, TokenChoice] = field(default_factory=dict)  # request_id -> next token
    probs: dict[int, torch.Tensor] = field(default_factory=dict)  # request_id -> label probabilities (CPU)
    # request_id -> (first prompt token index, the log-probabilities of that token and the next ones)
    prompt_logprobs: dict[int, tuple[int, list[TokenChoice]]] = field(default_factory=dict)
    num_tokens: int = 0  # tokens that went through the model

    def merge(self, other: StepResult) -> StepResult:
        self.tokens.update(other.tokens)
        self.probs.update(other.probs)
        self.prompt_logprobs.update(other.prompt_logprobs)
        self.num_tokens += other.num_tokens
        return self


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_num_seqs: int, eos_ids: frozenset[int]):
        self.blocks = blocks
        self.max_batched_tokens, self.max_num_seqs, self.eos_ids = max_batched_tokens, max_num_seqs, eos_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- deciding a step ---------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        preempted_before = self.num_preemptions
        for seq in list(self.running):  # oldest first: the youngest are preempted first
            if seq.status == Status.RUNNING and not seq.in_prefill and self._make_room_to_decode(seq):
                step.decode.append(seq)
        budget = self.max_batched_tokens - len(step.decode)
        for seq in self.running:  # prompts already admitted but not fully prefilled, oldest first
            if seq.in_prefill and budget > 0:
                n = min(seq.prefill_target - seq.num_cached, budget)
                step.prefill.append((seq, n))
                budget -= n
        if self.num_preemptions != preempted_before:  # memory is short: admitting now would thrash
            return step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.running.append(seq)
            n = min(seq.prefill_target - seq.num_cached, budget)
            step.prefill.append((seq, n))
            budget -= n
        return step

    def _make_room_to_decode(self, seq: Sequence) -> bool:
        """A block for the position this decode step writes, preempting the youngest running sequences if
        none is free. False if seq itself was preempted."""
        while not self.blocks.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.may_append(seq)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue with what it generated; its blocks stay cached for its return."""
        self.running.remove(seq)
        self.blocks.deallocate(seq)
        seq.status, seq.num_cached, seq.head_probs = Status.WAITING, 0, []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, seq: Sequence) -> bool:
        """Blocks for every position the sequence has; False if they do not fit now."""
        if not self.blocks.can_allocate(seq):
            return False
        self.blocks.allocate(seq)
        seq.status = Status.RUNNING
        if seq.scheduled_time is None:
            seq.scheduled_time = time.monotonic()
        return True

    # ---- after a step ------------------------------------------------------------------------------
    def postprocess(self, step: ScheduledStep, result: StepResult, failed: set[Sequence]) -> list[Sequence]:
        """Advance every sequence of the step that did not fail; returns those with something new for the
        client (a token, head probabilities, an end). Finished sequences release their blocks."""
        changed = []
        for seq in step.decode:
            if seq not in failed:
                seq.num_cached += 1
        for seq, n in step.prefill:
            if seq not in failed:
                seq.num_cached += n
        for seq in step.sequences:
            if seq in failed or seq.status != Status.RUNNING:
                continue
            seq.prefix_copies = []
            self.blocks.hash_blocks(seq)
            if seq.request_id in result.prompt_logprobs:
                first, choices = result.prompt_logprobs[seq.request_id]
                if first == len(seq.prompt_choices) + 1:  # not again when a preempted prompt is recomputed
                    seq.prompt_choices += choices
            if seq.task == Task.GENERATE:
                choice = result.tokens.get(seq.request_id)
                if choice is None:
                    continue
                seq.append_token(choice, self.eos_ids)
            elif seq.request_id in result.probs:
                seq.head_probs.append(result.probs[seq.request_id])
                if seq.in_prefill:
                    continue
                seq.finish_reason = FinishReason.STOP
            if seq.finish_reason is not None:
                self.finish(seq)
            changed.append(seq)
        return changed

    def finish(self, seq: Sequence) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.blocks.deallocate(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
