"""KV memory for serving: a pool of fixed-size blocks, the tensors behind app/engine/block_manager.py.

Layout: k, v of shape (layers, kv_heads, num_blocks, block_size, head_dim), head-major as llama.cpp and
vLLM's CPU backend keep it. Position p of a sequence lives in block `block_table[p // block_size]` at offset
`p % block_size`; as one flat index over the pool (a "slot", as vLLM calls it) that is
`block * block_size + offset`, so a layer's cache also reads as (kv_heads, num_blocks * block_size, head_dim),
written by slot. Reading a sequence's keys gathers whole blocks, each head's block one contiguous run of
block_size * head_dim values, and yields (kv_heads, positions, head_dim): what attention takes, no transpose.
Block 0 is scratch (never allocated): padded rows of static decode steps write there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.model import ModelArgs


@dataclass
class BlockGather:
    rows: torch.Tensor  # (kv_heads * blocks,) rows of a layer's (kv_heads * num_blocks, block_size * head_dim) view
    shape: tuple[int, ...]  # (kv_heads, ..., blocks * block_size, head_dim)


class KVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, device: str | torch.device,
                 dtype: torch.dtype):
        shape = (args.num_layers, args.num_kv_heads, num_blocks, block_size, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def device(self) -> torch.device:
        return self.k.device

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def blocks_for_budget(cls, args: ModelArgs, block_size: int, budget_bytes: int, dtype: torch.dtype) -> int:
        return int(budget_bytes // (cls.bytes_per_token(args, dtype) * block_size))

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's k, v as (kv_heads, num_blocks * block_size, head_dim), indexed by slot on dim 1."""
        k, v = self.k[layer], self.v[layer]
        return k.flatten(1, 2), v.flatten(1, 2)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (tokens, kv_heads, head_dim) -> the layer's cache at slots (tokens,)."""
        kc, vc = self.flat(layer)
        kc[:, slots] = k.transpose(0, 1)
        vc[:, slots] = v.transpose(0, 1)

    def plan_gather(self, tables: torch.Tensor) -> BlockGather:
        """tables (..., blocks) -> what `gather` reads, computed once per step for all layers."""
        kv_heads, num_blocks, block_size, head_dim = self.k.shape[1:]
        heads = torch.arange(kv_heads, device=tables.device).view(-1, *[1] * tables.dim()) * num_blocks
        return BlockGather((heads + tables).flatten(),
                           (kv_heads, *tables.shape[:-1], tables.shape[-1] * block_size, head_dim))

    def gather(self, layer: int, plan: BlockGather) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's k, v at every position of the planned tables' blocks, block by block:
        (kv_heads, ..., blocks * block_size, head_dim). One index_select of whole blocks (each head's block is
        one contiguous row of block_size * head_dim values): 2-3x the speed of advanced indexing on CPU."""
        k, v = self.k[layer], self.v[layer]
        rows = k.shape[0] * k.shape[1]
        return (torch.index_select(k.view(rows, -1), 0, plan.rows).view(plan.shape),
                torch.index_select(v.view(rows, -1), 0, plan.rows).view(plan.shape))

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's k, v as strided views (num_blocks, block_size, kv_heads, head_dim), for the decode kernel."""
        return self.k[layer].permute(1, 2, 0, 3), self.v[layer].permute(1, 2, 0, 3)

    def write_prefix(self, block: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> None:
        """Positions start..end-1 of a task prefix (k, v: (layers, kv_heads, P, head_dim), on any device)
        -> the first end - start offsets of the block (start is a multiple of the block size)."""
        n = end - start
        self.k[:, :, block, :n] = k[:, :, start:end].to(self.k.device, self.k.dtype)
        self.v[:, :, block, :n] = v[:, :, start:end].to(self.v.device, self.v.dtype)


def slots_of(tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """tables (R, blocks) -> the slots of positions 0..length-1 of each row, (R, length)."""
    index = torch.arange(length, device=tables.device)
    return tables[:, index // block_size] * block_size + index % block_size
