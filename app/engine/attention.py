"""Attention over the paged KV cache, for the model's `attend(layer, q, k, v)` hook (app/engine/model.py).

A step's tokens are one flat list (decode tokens of any sequences first, then prefill chunks; B=1, T=N), so
the projections and MLPs run once over exactly the real tokens, with no padding. Each token's K,V are
written to its slot, then attention reads every sequence's keys through its block table:
  - decode tokens (longest first): on CPU with the C kernels (app/engine/native_attention.py), one call a
    layer that reads each row's keys in place through its block table; else in runs of similar length (on
    CPU; one run on CUDA), one SDPA call per run over its gathered keys (padded to its longest, masked);
  - prefill chunks: on CPU with the C kernels, one call a layer for all of them, each chunk over its block
    table (the prefill kernel: a hundred short prompts would otherwise be a hundred SDPA calls a layer, each
    costing more in setup than in arithmetic); else one padded SDPA call for all of them (CUDA, where each
    call costs ~10 kernel launches a layer) or one call per chunk (CPU, where the padded call measured 2-3x
    slower; a chunk that starts at position 0 attends over its own K,V as computed, with nothing to gather).
Keys are gathered block by block in the cache's head-major layout (app/engine/kv_cache.py), which gives
(kv_heads, ..., positions, head_dim) directly; decode attention then runs over (kv_heads, rows) as the batch.
`StaticDecodeAttention` is the decode-only step at fixed shapes that CUDA graphs replay
(app/engine/decode_graphs.py); on CUDA its attention is the Triton kernel that reads the block table itself.
In every path the query heads that share a KV head form one longer query sequence of that head, so SDPA
needs no GQA expansion (5x faster on CPU than enable_gqa).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine.decode_attention import decode_attention
from app.engine.kv_cache import KVCache, slots_of
from app.engine.native_attention import NativeKernels, PrefillPlan


@dataclass
class PrefillChunk:
    table: list[int]  # the sequence's block table
    offset: int  # where its tokens start in the step's flat token list
    length: int
    start_pos: int  # cache position of its first token


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q (R, H, hd) -> (KVH, R, H/KVH, hd): rows batched under each KV head, as the cache gathers keys."""
    return q.reshape(q.shape[0], kv_heads, -1, q.shape[-1]).transpose(0, 1)


def _ungrouped(out: torch.Tensor) -> torch.Tensor:
    """(KVH, R, H/KVH, hd) -> (R, H, hd)."""
    return out.transpose(0, 1).flatten(1, 2)


def _blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def _tables(tables: list[list[int]], device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


def length_groups(lengths: list[int], ratio: float = 1.5, max_groups: int = 4) -> list[tuple[int, int]]:
    """Rows (longest first) -> runs (start, end) of rows of similar length. A run ends where a row is shorter
    than the run's first / ratio, so padding each run to its longest wastes little (rows of 50 and 280 keys
    padded together would each gather and attend over 280); at most max_groups runs, each costing its own
    gather and SDPA call per layer. Rows in another order are still grouped correctly, only less tightly."""
    starts = [0]
    for row in range(1, len(lengths)):
        if lengths[row] * ratio < lengths[starts[-1]] and len(starts) < max_groups:
            starts.append(row)
    return list(zip(starts, starts[1:] + [len(lengths)]))


class DecodeGroup:
    """A run of decode rows of similar length: their keys gathered together, padded to the longest, masked."""

    def __init__(self, cache: KVCache, start: int, end: int, tables: list[list[int]], positions: list[int]):
        B, device = cache.block_size, cache.device
        self.start, self.end = start, end  # the rows start..end-1 of the step's decode rows
        tables, positions = tables[start:end], positions[start:end]
        blocks = _blocks_for(max(positions) + 1, B)
        self.gather = cache.plan_gather(_tables([t[:blocks] for t in tables], device))  # (rows, blocks)
        # (1, rows, 1, L): row d sees its positions 0..positions[d] of the blocks gathered for it
        self.mask = (torch.arange(blocks * B, device=device)[None, :]
                     <= torch.tensor(positions, device=device)[:, None])[None, :, None]

    def attend(self, cache: KVCache, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q (decode rows, H, hd) of the whole step -> (this group's rows, H, hd)."""
        keys, values = cache.gather(layer, self.gather)  # (KVH, rows, L, hd)
        out = F.scaled_dot_product_attention(_grouped(q[self.start:self.end], keys.shape[0]), keys, values,
                                             attn_mask=self.mask)
        return _ungrouped(out)


class PagedAttention:
    """attend() for one eagerly run step: decode tokens first in the flat list, then prefill chunks."""

    def __init__(self, cache: KVCache, write_slots: list[int], positions: list[int],
                 decode_tables: list[list[int]], chunks: list[PrefillChunk], batch_chunks: bool | None = None,
                 native: NativeKernels | None = None):
        """write_slots, positions: per token of the step (host lists); decode_tables: the block table of each
        decode token's sequence. batch_chunks: None picks the padded call on CUDA, per chunk on CPU.
        native (CPU): the C kernels write K,V and attend in place over the block tables, decode rows and
        prefill chunks alike."""
        device, B = cache.device, cache.block_size
        self.cache, self.native = cache, native
        self.num_decode = len(decode_tables)
        self.write_slots = torch.tensor(write_slots, dtype=torch.long, device=device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        if native is not None:
            if self.num_decode:
                self.native_tables = _tables(decode_tables, device)
                self.native_lengths = torch.tensor([p + 1 for p in positions[:self.num_decode]], dtype=torch.int32)
            self.prefill_plan = PrefillPlan.build([c.table for c in chunks], [c.offset for c in chunks],
                                                  [c.length for c in chunks], [c.start_pos for c in chunks],
                                                  native.key_tile, cache.k.shape[1], cache.k.shape[-1]) \
                if chunks else None
            chunks = []
        elif self.num_decode:
            decode_positions = positions[:self.num_decode]
            # on CUDA a group's calls cost more than the padding they save
            runs = length_groups([p + 1 for p in decode_positions], max_groups=4 if device.type == "cpu" else 1)
            self.decode_groups = [DecodeGroup(cache, start, end, decode_tables, decode_positions)
                                  for start, end in runs]
        self.chunks = chunks  # the chunks SDPA attends
        self.batch_chunks = device.type == "cuda" if batch_chunks is None else batch_chunks
        if chunks and self.batch_chunks:
            # Padded to the longest chunk: padded row i*T + t is token t of chunk i (past a chunk's end it
            # repeats its last token; those rows are dropped).
            T = max(c.length for c in chunks)
            self.chunk_len = T
            keys = max(c.start_pos + c.length for c in chunks)
            self.chunk_keys = keys
            self.chunk_gather = cache.plan_gather(_tables([c.table[:_blocks_for(keys, B)] for c in chunks], device))
            self.pad_index = torch.tensor([c.offset + min(t, c.length - 1) for c in chunks for t in range(T)],
                                          device=device)
            self.unpad_index = torch.tensor([i * T + t for i, c in enumerate(chunks) for t in range(c.length)],
                                            device=device)
            query_pos = torch.tensor([c.start_pos for c in chunks], device=device)[:, None] + \
                torch.arange(T, device=device)
            self.chunk_mask = torch.arange(keys, device=device) <= query_pos[..., None]  # (C, T, keys)
            self._grouped_mask: torch.Tensor | None = None  # the mask per grouped query row, built at layer 0
        elif chunks:
            # None: a chunk from position 0 attends over its own K,V of this step, as computed (nothing to
            # gather: the cache holds the same values)
            self.chunk_gathers = [None if c.start_pos == 0 else
                                  cache.plan_gather(torch.tensor(c.table[:_blocks_for(c.start_pos + c.length, B)],
                                                                 device=device)) for c in chunks]
            self.chunk_masks = [  # None: causal from position 0, no prefix
                None if c.start_pos == 0 else
                torch.arange(c.start_pos + c.length, device=device)[None, :]
                <= torch.arange(c.start_pos, c.start_pos + c.length, device=device)[:, None]
                for c in chunks
            ]

    def attend(self, layer, q, k, v):
        if self.native is not None:
            return self._attend_native(layer, q, k, v)
        self.cache.write(layer, self.write_slots, k[0], v[0])
        parts = [group.attend(self.cache, layer, q[0]) for group in self.decode_groups] if self.num_decode else []
        if self.chunks:
            parts.append(self._attend_chunks_padded(layer, q) if self.batch_chunks
                         else self._attend_each_chunk(layer, q, k, v))
        return torch.cat(parts, 0)[None]

    def _attend_native(self, layer, q, k, v):
        """The C kernels: decode rows (the flat list's first) and prefill chunks, each writing its rows of one
        output."""
        k_layer, v_layer = self.cache.k[layer], self.cache.v[layer]
        self.native.write(self.cache, layer, self.write_slots, k[0], v[0])
        out = torch.empty(q.shape[1:], dtype=q.dtype)
        if self.num_decode:
            self.native.decode_attention(q[0, :self.num_decode], k_layer, v_layer, self.native_tables,
                                         self.native_lengths, out=out[:self.num_decode])
        if self.prefill_plan is not None:
            self.native.prefill_attention(q[0], k_layer, v_layer, self.prefill_plan, out)
        return out[None]

    def _attend_each_chunk(self, layer, q, k, v):
        """q (1, N, H, hd), k, v (1, N, KVH, hd) of the whole step -> (prefill tokens, H, hd), in the flat
        list's order."""
        parts = []
        for c, plan, mask in zip(self.chunks, self.chunk_gathers, self.chunk_masks):
            qc = q[:, c.offset:c.offset + c.length].transpose(1, 2)  # (1, H, n, hd)
            if plan is None:
                keys = k[:, c.offset:c.offset + c.length].transpose(1, 2)  # (1, KVH, n, hd)
                values = v[:, c.offset:c.offset + c.length].transpose(1, 2)
            else:
                n = c.start_pos + c.length
                keys, values = (x[None, :, :n] for x in self.cache.gather(layer, plan))  # (1, KVH, n, hd)
            out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)
            parts.append(out[0].transpose(0, 1))  # (n, H, hd)
        return torch.cat(parts, 0)

    def _attend_chunks_padded(self, layer, q):
        """q (1, N, H, hd) of the whole step -> (prefill tokens, H, hd), in the flat list's order."""
        q = q[0]
        C, T = len(self.chunks), self.chunk_len
        keys, values = self.cache.gather(layer, self.chunk_gather)  # (KVH, C, blocks * B, hd)
        keys = keys[:, :, :self.chunk_keys].transpose(0, 1)  # (C, KVH, L, hd)
        values = values[:, :, :self.chunk_keys].transpose(0, 1)
        kv_heads, hd, keys_len = keys.shape[1], q.shape[-1], keys.shape[2]
        groups = q.shape[1] // kv_heads
        # (C, KVH, G*T, hd): the grouped query heads of a KV head as one longer query sequence.
        qp = q[self.pad_index].view(C, T, kv_heads, groups, hd).permute(0, 2, 3, 1, 4).reshape(C, kv_heads, -1, hd)
        if self._grouped_mask is None:
            self._grouped_mask = self.chunk_mask[:, None, None].expand(C, 1, groups, T, keys_len) \
                .reshape(C, 1, groups * T, keys_len)
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=self._grouped_mask)
        out = out.view(C, kv_heads, groups, T, hd).permute(0, 3, 1, 2, 4).reshape(C * T, -1, hd)
        return out[self.unpad_index]


class StaticDecodeAttention:
    """attend() for a static-shape decode step: one token per row, rows padded to a bucket.

    Shapes depend only on (rows, length), never on which blocks are live, so the step can be captured once
    as a CUDA graph and replayed. positions (rows,) and tables (rows, max_blocks) are device tensors read at
    run time; a padded row has position 0 and a table of scratch blocks (its output is dropped). With
    `kernel` (CUDA) each row reads only its own keys through its table (app/engine/decode_attention.py);
    with SDPA every row gathers the first `length` positions of its table, masked past its own position.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor, tables: torch.Tensor, length: int, kernel: bool):
        B = cache.block_size
        self.cache, self.kernel, self.tables = cache, kernel, tables
        rows = torch.arange(positions.shape[0], device=positions.device)
        self.write_slots = tables[rows, positions // B] * B + positions % B
        if kernel:
            self.lengths = (positions + 1).to(torch.int32)
        else:
            self.slots = slots_of(tables, length, B)
            self.mask = (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[None, :, None]

    def attend(self, layer, q, k, v):
        """q (rows, 1, H, hd), k/v (rows, 1, KVH, hd) -> (rows, 1, H, hd)."""
        self.cache.write(layer, self.write_slots, k[:, 0], v[:, 0])
        if self.kernel:
            return decode_attention(q[:, 0], *self.cache.paged(layer), self.tables, self.lengths)[:, None]
        kc, vc = self.cache.flat(layer)
        keys, values = kc[:, self.slots], vc[:, self.slots]  # (KVH, rows, L, hd)
        out = F.scaled_dot_product_attention(_grouped(q[:, 0], keys.shape[0]), keys, values, attn_mask=self.mask)
        return _ungrouped(out)[:, None]
