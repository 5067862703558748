"""KV memory for serving: a pool of fixed-size blocks, the tensors behind app/engine/block_manager.py.

Layout: k, v of shape (layers, num_blocks, block_size, kv_heads, head_dim). Position p of a sequence lives
in block `block_table[p // block_size]` at offset `p % block_size`; as one flat index over the pool (a
"slot", as vLLM calls it) that is `block * block_size + offset`, so a layer's cache reads as a flat
(num_blocks * block_size, kv_heads, head_dim) table that a step writes and gathers by slot.
Block 0 is scratch (never allocated): padded rows of static decode steps write there.
"""
from __future__ import annotations

import torch

from app.engine.model import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, device: str | torch.device,
                 dtype: torch.dtype):
        shape = (args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim)
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
        """One layer's k, v as (num_blocks * block_size, kv_heads, head_dim), indexed by slot."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])

    def write_prefix(self, block: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> None:
        """Positions start..end-1 of a task prefix (k, v: (layers, kv_heads, P, head_dim), on any device)
        -> the first end - start offsets of the block (start is a multiple of the block size)."""
        n = end - start
        self.k[:, block, :n] = k[:, :, start:end].transpose(1, 2).to(self.k.device, self.k.dtype)
        self.v[:, block, :n] = v[:, :, start:end].transpose(1, 2).to(self.v.device, self.v.dtype)


def slots_of(tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """tables (R, blocks) -> the slots of positions 0..length-1 of each row, (R, length)."""
    index = torch.arange(length, device=tables.device)
    return tables[:, index // block_size] * block_size + index % block_size
