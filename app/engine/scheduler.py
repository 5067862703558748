"""Waiting and running queues: who runs in the next step, and how many of their tokens.

Continuous batching: every step, each running sequence past its prompt decodes one token; prompts
are prefilled in chunks within a per-step token budget; new requests join whenever a KV slot is free.
Order is first come, first served: the queue head is never skipped, so a long prompt is not starved,
and chunked prefill keeps it from stalling the decoders behind it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from app.engine.kv_cache import KVCache
from app.engine.sequence import Sequence, Status


class Overloaded(RuntimeError):
    """The waiting queue is full."""


@dataclass
class ScheduledStep:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    admitted: list[Sequence] = field(default_factory=list)  # got a slot this step: write their prefix

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
        return ScheduledStep([s for s in self.decode if keep(s)], [(s, n) for s, n in self.prefill if keep(s)],
                             [s for s in self.admitted if keep(s)])


class Scheduler:
    def __init__(self, cache: KVCache, max_waiting: int, max_batched_tokens: int):
        self.cache = cache
        self.max_waiting, self.max_batched_tokens = max_waiting, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"the server is at capacity ({self.max_waiting} requests waiting); retry later")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_batched_tokens
        for seq in self.running:
            if not seq.in_prefill:
                step.decode.append(seq)
        budget -= len(step.decode)
        for seq in self.running:  # prompts already admitted but not fully prefilled, oldest first
            if seq.in_prefill and budget > 0:
                n = min(len(seq.prompt_ids) - seq.num_cached, budget)
                step.prefill.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and self.cache.num_free:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.cache.allocate(), Status.RUNNING
            seq.scheduled_time = time.monotonic()
            self.running.append(seq)
            step.admitted.append(seq)
            n = min(len(seq.prompt_ids), budget)
            step.prefill.append((seq, n))
            budget -= n
        return step

    def finish(self, seq: Sequence) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.cache.free(seq.slot)
            seq.slot = None
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
