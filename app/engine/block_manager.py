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
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

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
        self.query_tokens = 0  # prefix-cache lookups, in tokens (as vLLM counts them)
        self.hit_tokens = 0

    # ---- capacity ----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self.free if self.block_hash[b] is not None)

    # ---- lookups -----------------------------------------------------------------------------------
    def cached(self, block_hash: bytes) -> int | None:
        return self.hash_to_block.get(block_hash) if self.enable_caching else None

    def count_hits(self, hashes: list[bytes]) -> int:
        """How many of these leading block hashes are cached (a hit stops at the first miss)."""
        n = 0
        for h in hashes:
            if self.cached(h) is None:
                break
            n += 1
        return n

    # ---- references --------------------------------------------------------------------------------
    def take_cached(self, block: int) -> None:
        """One more reference to a cached block (revived from the free list if nobody held it)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def take_new(self) -> int:
        """A fresh block: the least recently freed one, its old hash (if any) forgotten."""
        if not self.free:
            raise NoFreeBlocks("no free KV block")
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def register(self, block: int, block_hash: bytes) -> None:
        """The block's K,V are complete: other sequences may reuse it by this hash (first writer wins)."""
        if self.enable_caching and self.block_hash[block] is None and block_hash not in self.hash_to_block:
            self.block_hash[block] = block_hash
            self.hash_to_block[block_hash] = block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each; unreferenced blocks go to the free list's recent end, last block
        first, so that a sequence's earlier (more shareable) blocks are evicted last."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
