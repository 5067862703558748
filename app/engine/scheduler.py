"""Waiting and running queues and their KV blocks: who runs in the next step, and how each advances after it.

Continuous batching: every step, each running sequence past its prompt decodes one token; prompts are
prefilled in chunks within a per-step token budget; new requests join while KV blocks are free. Order is
first come, first served: the queue head is never skipped, so a long prompt is not starved, and chunked
prefill keeps it from stalling the decoders behind it.

Memory is paged (app/engine/block_manager.py): admission takes blocks for the tokens a request has (after
reusing every cached block of its longest cached prefix), and decoding takes one more block every
block_size tokens. When a decoding sequence needs a block and none is free, the most recently admitted
running sequence is preempted: its blocks are released (they stay cached), it goes back to the front of
the queue with the tokens it generated, and is recomputed when admitted again.

`schedule()` decides a step; `postprocess()` is the one place a sequence advances after it: counters,
sampled tokens, finish decisions, prefix-cache registration and freeing blocks.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from app.engine.block_manager import BlockManager, chain_hash, token_bytes
from app.engine.sampling import TokenChoice
from app.engine.sequence import Sequence, Status
from prompt_store.format import Task


class Overloaded(RuntimeError):
    """The waiting queue is full."""


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
        self.blocks, self.block_size = blocks, blocks.block_size
        self.max_batched_tokens, self.max_num_seqs, self.eos_ids = max_batched_tokens, max_num_seqs, eos_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, positions: int) -> int:
        return -(-positions // self.block_size)

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
        position = seq.prefix_len + seq.num_cached
        if position < len(seq.block_table) * self.block_size:
            return True
        while not self.blocks.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.block_table.append(self.blocks.take_new())
        return True

    def preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue with what it generated; its blocks stay cached for its return."""
        self.running.remove(seq)
        self._release(seq)
        seq.status, seq.num_cached, seq.head_probs = Status.WAITING, 0, []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, seq: Sequence) -> bool:
        """Blocks for every position the sequence has, reusing its longest cached prefix; False if they do
        not fit now. Positions of the task prompt in fresh blocks are queued for copying (prefix_copies)."""
        B, P = self.block_size, seq.prefix_len
        tokens = seq.token_ids
        hashes = self._full_block_hashes(seq)
        # A hit may cover virtual positions always, text only where the text's K,V are enough (not tagging),
        # and never the block of the last token to compute: its hidden state is needed.
        reusable = len(hashes) if seq.reuses_cached_text else P // B
        reusable = min(reusable, (P + seq.prefill_target - 1) // B)
        hits = self.blocks.count_hits(hashes[:reusable])
        hit_blocks = [self.blocks.cached(h) for h in hashes[:hits]]
        fresh = self.blocks_needed(P + len(tokens)) - hits
        reviving = sum(1 for b in hit_blocks if self.blocks.ref_counts[b] == 0)
        if fresh > self.blocks.num_free - reviving:
            return False
        for block in hit_blocks:
            self.blocks.take_cached(block)
        seq.block_table = hit_blocks + [self.blocks.take_new() for _ in range(fresh)]
        seq.num_registered = hits
        for j in range(hits, min(fresh + hits, self.blocks_needed(P))):  # fresh blocks holding virtual positions
            block, end = seq.block_table[j], min(P, (j + 1) * B)
            seq.prefix_copies.append((block, j * B, end))
            if end == (j + 1) * B:  # all virtual: complete once copied, shareable at once
                self.blocks.register(block, hashes[j])
                seq.num_registered = j + 1
        seq.num_cached = max(0, hits * B - P)
        self.blocks.query_tokens += len(tokens)
        self.blocks.hit_tokens += seq.num_cached
        seq.status = Status.RUNNING
        if seq.scheduled_time is None:
            seq.scheduled_time = time.monotonic()
        return True

    def _full_block_hashes(self, seq: Sequence) -> list[bytes]:
        """Chained hashes of the sequence's full blocks (extends seq.block_hashes as its tokens grow)."""
        B, P = self.block_size, seq.prefix_len
        tokens = seq.token_ids
        hashes = seq.block_hashes
        for j in range(len(hashes), (P + len(tokens)) // B):
            previous = hashes[-1] if hashes else seq.cache_root
            start, end = j * B, (j + 1) * B
            content = b"virtual%d" % j if end <= P else token_bytes(tokens[max(0, start - P):end - P])
            hashes.append(chain_hash(previous, content))
        return hashes

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
            self._register_computed_blocks(seq)
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
                seq.finish_reason = "stop"
            if seq.finish_reason is not None:
                self.finish(seq)
            changed.append(seq)
        return changed

    def _register_computed_blocks(self, seq: Sequence) -> None:
        """Full blocks whose K,V are now all computed become reusable by their hash."""
        if not seq.reuses_cached_text:
            return
        computed = (seq.prefix_len + seq.num_cached) // self.block_size
        hashes = self._full_block_hashes(seq)
        for j in range(seq.num_registered, min(computed, len(hashes))):
            self.blocks.register(seq.block_table[j], hashes[j])
        seq.num_registered = max(seq.num_registered, computed)

    def finish(self, seq: Sequence) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_registered, seq.prefix_copies = [], 0, []
