"""KV memory bookkeeping in blocks: a free list, reference counts and a hash -> block map. No tensors.

The KV cache is a pool of blocks of `block_size` positions (app/engine/kv_cache.py holds the tensors). A
sequence owns a block table: block j holds its positions [j*B, (j+1)*B). Positions 0..P-1 are its task
prompt's virtual tokens, its text follows.

Sharing (prefix caching) goes by content. Every full block has a hash chained over everything before it,
rooted in the sequence's task prompt identity (the same text after two prompts, or after two versions of
one prompt, has different K,V and never shares a block):
  - blocks of virtual positions only: hash(previous, "virtual", j); their K,V are copied from the prompt's
    prefix when the block is first made, so every request of the task references the same blocks;
  - blocks holding text: hash(previous, their token ids); registered once their K,V are computed.
A block whose reference count drops to 0 keeps its hash and waits in the free list, least recently freed
first: a new request may still find and revive it, and a fresh allocation evicts the oldest one.

The scheduler decides who runs; this decides where their K,V go: `can_allocate`/`allocate` at admission,
`can_append`/`may_append` before a decode step, `hash_blocks` after a step, `deallocate` at the end.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from app.engine.sequence import Sequence

SCRATCH_BLOCK = 0  # never handed out: padded rows of static decode steps write their K,V here


def chain_hash(previous: bytes, content: bytes) -> bytes:
    # A keyed-strength hash, not Python's hash(): a client must not be able to craft text that collides
    # with another client's cached prefix.
    return hashlib.blake2b(previous + content, digest_size=16).digest()


def token_bytes(tokens: list[int]) -> bytes:
    return array("q", tokens).tobytes()


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the static steps' scratch block)")
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Unreferenced blocks, least recently freed first; those with a hash are still cached.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks) if b != SCRATCH_BLOCK)
        self.num_cached_free = 0  # free blocks that still have a hash (counted, so any thread may read it)
        self.query_tokens = 0  # prefix-cache lookups, in tokens (as vLLM counts them)
        self.hit_tokens = 0

    # ---- capacity ----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # ---- a sequence's blocks -----------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether blocks for every position the sequence has fit now, after reusing its cached prefix."""
        hits = self._cached_prefix(seq)
        fresh = self.blocks_needed(seq.prefix_len + len(seq.token_ids)) - len(hits)
        reviving = sum(1 for b in hits if self.ref_counts[b] == 0)
        return fresh <= self.num_free - reviving

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every position the sequence has (call can_allocate first), reusing its longest cached
        prefix. Positions of the task prompt in fresh blocks are queued for copying (seq.prefix_copies)."""
        B, P = self.block_size, seq.prefix_len
        hit_blocks = self._cached_prefix(seq)
        hits = len(hit_blocks)
        fresh = self.blocks_needed(P + len(seq.token_ids)) - hits
        for block in hit_blocks:
            self._take_cached(block)
        seq.block_table = hit_blocks + [self._take_new() for _ in range(fresh)]
        seq.num_registered = hits
        for j in range(hits, min(fresh + hits, self.blocks_needed(P))):  # fresh blocks holding virtual positions
            block, end = seq.block_table[j], min(P, (j + 1) * B)
            seq.prefix_copies.append((block, j * B, end))
            if end == (j + 1) * B:  # all virtual: complete once copied, shareable at once
                self._register(block, seq.block_hashes[j])
                seq.num_registered = j + 1
        seq.num_cached = max(0, hits * B - P)
        self.query_tokens += len(seq.token_ids)
        self.hit_tokens += seq.num_cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether the position the next decode step writes has a block, or one can be taken."""
        return not self._needs_block(seq) or bool(self.free)

    def may_append(self, seq: Sequence) -> None:
        """A block for the position the next decode step writes, if its last block is full."""
        if self._needs_block(seq):
            seq.block_table.append(self._take_new())

    def hash_blocks(self, seq: Sequence) -> None:
        """After a step: full blocks whose K,V are now all computed become reusable by their hash."""
        if not seq.reuses_cached_text:
            return
        computed = (seq.prefix_len + seq.num_cached) // self.block_size
        hashes = self._full_block_hashes(seq)
        for j in range(seq.num_registered, min(computed, len(hashes))):
            self._register(seq.block_table[j], hashes[j])
        seq.num_registered = max(seq.num_registered, computed)

    def deallocate(self, seq: Sequence) -> None:
        """The sequence lets go of its blocks (they stay cached until evicted)."""
        self._release(seq.block_table)
        seq.block_table, seq.num_registered, seq.prefix_copies = [], 0, []

    def _needs_block(self, seq: Sequence) -> bool:
        return seq.prefix_len + seq.num_cached >= len(seq.block_table) * self.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks of the sequence's longest cached prefix. A hit may cover virtual positions
        always, text only where the text's K,V are enough (not tagging), and never the block of the last
        token to compute: its hidden state is needed."""
        B, P = self.block_size, seq.prefix_len
        hashes = self._full_block_hashes(seq)
        reusable = len(hashes) if seq.reuses_cached_text else P // B
        reusable = min(reusable, (P + seq.prefill_target - 1) // B)
        blocks = []
        for h in hashes[:reusable]:  # a hit stops at the first miss
            block = self._cached(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _full_block_hashes(self, seq: Sequence) -> list[bytes]:
        """Chained hashes of the sequence's full blocks, rooted in its task prompt's identity (extends
        seq.block_hashes as its tokens grow)."""
        B, P = self.block_size, seq.prefix_len
        tokens = seq.token_ids
        hashes = seq.block_hashes
        for j in range(len(hashes), (P + len(tokens)) // B):
            previous = hashes[-1] if hashes else seq.cache_root
            start, end = j * B, (j + 1) * B
            content = b"virtual%d" % j if end <= P else token_bytes(tokens[max(0, start - P):end - P])
            hashes.append(chain_hash(previous, content))
        return hashes

    # ---- blocks ------------------------------------------------------------------------------------
    def _cached(self, block_hash: bytes) -> int | None:
        return self.hash_to_block.get(block_hash) if self.enable_caching else None

    def _take_cached(self, block: int) -> None:
        """One more reference to a cached block (revived from the free list if nobody held it)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
            self.num_cached_free -= 1
        self.ref_counts[block] += 1

    def _take_new(self) -> int:
        """A fresh block: the least recently freed one, its old hash (if any) forgotten."""
        if not self.free:
            raise NoFreeBlocks("no free KV block")
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            self.num_cached_free -= 1
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _register(self, block: int, block_hash: bytes) -> None:
        """The block's K,V are complete: other sequences may reuse it by this hash (first writer wins)."""
        if self.enable_caching and self.block_hash[block] is None and block_hash not in self.hash_to_block:
            self.block_hash[block] = block_hash
            self.hash_to_block[block_hash] = block

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each; unreferenced blocks go to the free list's recent end, last block
        first, so that a sequence's earlier (more shareable) blocks are evicted last."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.num_cached_free += self.block_hash[block] is not None
