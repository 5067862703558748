"""KV memory for serving: one slot per running sequence, and the attention that reads and writes it.

Layout: k, v of shape (layers, slots, kv_heads, max_seq_len + 1, head_dim). A sequence owns one slot; its
positions 0..P-1 hold its task prefix (copied in at admission from the task's pinned K,V, never
recomputed), its text follows from position P. The last position (`scratch`) is never read: the rows of
a static-shape decode step that belong to no decoding sequence write their K,V there. Decode cost depends
on the batch size and the longest sequence, never on how many distinct tasks are in the batch: a row is
a row whatever its prefix.

A step's tokens are one flat list (prefill chunks and decode tokens of any sequences, B=1, T=N), so the
projections and MLPs run once over exactly the real tokens, with no padding. Attention then splits:
all decode tokens together in one SDPA call over their slots, all prefill chunks in another (padded; on
CUDA) or one call per chunk (CPU).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine.decode_attention import decode_attention
from app.engine.model import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_slots: int, max_seq_len: int, device: str, dtype: torch.dtype):
        shape = (args.num_layers, num_slots, args.num_kv_heads, max_seq_len + 1, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.scratch = max_seq_len  # a position no sequence reaches
        self._free = list(range(num_slots))  # a heap: the lowest free slot first keeps the live ones dense

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def bytes_per_slot(cls, args: ModelArgs, max_seq_len: int, dtype: torch.dtype) -> int:
        return cls.bytes_per_token(args, dtype) * (max_seq_len + 1)  # + the scratch position

    @classmethod
    def slots_for_budget(cls, args: ModelArgs, max_seq_len: int, budget_bytes: int, dtype: torch.dtype) -> int:
        return int(budget_bytes // cls.bytes_per_slot(args, max_seq_len, dtype))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def write_prefix(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (layers, kv_heads, P, head_dim) -> positions 0..P-1 of the slot."""
        P = k.shape[2]
        self.k[:, slot, :, :P] = k
        self.v[:, slot, :, :P] = v


@dataclass
class PrefillChunk:
    slot: int
    offset: int  # where its tokens start in the step's flat token list
    length: int
    start_pos: int  # cache position of its first token


class CachedAttention:
    """attend() for one step over the cache: decode tokens first in the flat list, then prefill chunks."""

    def __init__(self, cache: KVCache, slots: list[int], positions: list[int], num_decode: int,
                 chunks: list[PrefillChunk], batch_chunks: bool | None = None):
        """slots, positions: per token of the step, as host lists (read here without a device sync).
        batch_chunks: all prefill chunks in one padded attention call (None: on CUDA, where each call costs
        ~10 kernel launches a layer) or one call per chunk (CPU, where padding costs more than calls:
        the padded call measured 2-3x slower per layer there)."""
        device = cache.k.device
        self.cache, self.num_decode, self.chunks = cache, num_decode, chunks
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)
        if num_decode:
            first = slots[0]
            # Dense slots (the common case) are a view of the cache; others are gathered.
            dense = slots[:num_decode] == list(range(first, first + num_decode))
            self.dec_range = (first, first + num_decode) if dense else None
            self.dec_slots = self.slots[:num_decode]
            self.dec_len = max(positions[:num_decode]) + 1
            dec_pos = self.positions[:num_decode]
            self.dec_mask = (torch.arange(self.dec_len, device=device)[None, :] <= dec_pos[:, None])[:, None, None]
        self.batch_chunks = device.type == "cuda" if batch_chunks is None else batch_chunks
        if chunks and self.batch_chunks:
            # Padded to the longest chunk: padded row i*T + t is token t of chunk i (past a chunk's end it
            # repeats its last token; those rows are dropped).
            T = max(c.length for c in chunks)
            self.chunk_len, self.chunk_keys = T, max(c.start_pos + c.length for c in chunks)
            self.chunk_slots = torch.tensor([c.slot for c in chunks], device=device)
            self.pad_index = torch.tensor([c.offset + min(t, c.length - 1) for c in chunks for t in range(T)],
                                          device=device)
            self.unpad_index = torch.tensor([i * T + t for i, c in enumerate(chunks) for t in range(c.length)],
                                            device=device)
            query_pos = torch.tensor([c.start_pos for c in chunks], device=device)[:, None] + \
                torch.arange(T, device=device)
            self.chunk_mask = torch.arange(self.chunk_keys, device=device) <= query_pos[..., None]  # (C, T, keys)
            self._grouped_mask: torch.Tensor | None = None  # the mask per grouped query row, built at layer 0
        elif chunks:
            self.chunk_masks = [  # None: causal from position 0, no prefix
                None if c.start_pos == 0 else
                torch.arange(c.start_pos + c.length, device=device)[None, :]
                <= torch.arange(c.start_pos, c.start_pos + c.length, device=device)[:, None]
                for c in chunks
            ]

    def attend(self, layer, q, k, v):
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # (slots, KVH, S, D)
        kc[self.slots, :, self.positions] = k[0]
        vc[self.slots, :, self.positions] = v[0]
        parts = []
        D = self.num_decode
        if D:
            L = self.dec_len
            if self.dec_range is not None:
                keys, values = kc[slice(*self.dec_range), :, :L], vc[slice(*self.dec_range), :, :L]
            else:
                keys, values = kc[self.dec_slots, :, :L], vc[self.dec_slots, :, :L]
            # One query per row: the query heads sharing a KV head become that head's query "sequence",
            # (D, KVH, H/KVH, hd), so SDPA needs no GQA expansion (5x faster on CPU than enable_gqa).
            kv_heads = keys.shape[1]
            qd = q[0, :D].reshape(D, kv_heads, -1, q.shape[-1])
            out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self.dec_mask)
            parts.append(out.reshape(D, -1, q.shape[-1]))  # (D, H, hd)
        if self.chunks:
            attend_chunks = self._attend_chunks_padded if self.batch_chunks else self._attend_each_chunk
            parts.append(attend_chunks(kc, vc, q))
        return torch.cat(parts, 0)[None]

    def _attend_each_chunk(self, kc, vc, q):
        """q (1, N, H, hd) of the whole step -> (prefill tokens, H, hd), in the flat list's order."""
        parts = []
        for c, mask in zip(self.chunks, self.chunk_masks):
            end = c.start_pos + c.length
            qc = q[:, c.offset:c.offset + c.length].transpose(1, 2)  # (1, H, n, hd)
            keys, values = kc[c.slot:c.slot + 1, :, :end], vc[c.slot:c.slot + 1, :, :end]
            out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True)
            parts.append(out[0].transpose(0, 1))  # (n, H, hd)
        return torch.cat(parts, 0)

    def _attend_chunks_padded(self, kc, vc, q):
        """q (1, N, H, hd) of the whole step -> (prefill tokens, H, hd), in the flat list's order."""
        q = q[0]
        C, T, keys_len = len(self.chunks), self.chunk_len, self.chunk_keys
        kv_heads, hd = kc.shape[1], q.shape[-1]
        groups = q.shape[1] // kv_heads
        # As in decode, the query heads sharing a KV head become one longer query sequence of that head:
        # (C, KVH, G*T, hd). SDPA then needs no GQA expansion and its memory-efficient kernel takes the mask.
        qp = q[self.pad_index].view(C, T, kv_heads, groups, hd).permute(0, 2, 3, 1, 4).reshape(C, kv_heads, -1, hd)
        if self._grouped_mask is None:
            self._grouped_mask = self.chunk_mask[:, None, None].expand(C, 1, groups, T, keys_len) \
                .reshape(C, 1, groups * T, keys_len)
        keys, values = kc[self.chunk_slots, :, :keys_len], vc[self.chunk_slots, :, :keys_len]
        out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=self._grouped_mask)
        out = out.view(C, kv_heads, groups, T, hd).permute(0, 3, 1, 2, 4).reshape(C * T, -1, hd)
        return out[self.unpad_index]


class SlotDecodeAttention:
    """attend() for a static-shape decode step: row r of the batch is slot r of the cache, one token each.

    Shapes depend only on (rows, length), never on which slots are live, so the step can be captured
    once as a CUDA graph and replayed. positions (rows,) is a device tensor read at run time: a decoding
    slot's position, or `cache.scratch` for a row with no decoding sequence (its output is dropped).
    With `kernel` (CUDA) each row reads only its own keys (app/engine/decode_attention.py); with SDPA
    every row reads the first `length` positions of its slot, masked past its own position.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor, length: int, kernel: bool):
        rows = positions.shape[0]
        self.cache, self.length, self.kernel = cache, length, kernel
        self.rows = torch.arange(rows, device=positions.device)
        self.positions = positions
        limit = torch.where(positions == cache.scratch, 0, positions)  # an idle row attends position 0
        if kernel:
            self.lengths = (limit + 1).to(torch.int32)
        else:
            self.mask = (torch.arange(length, device=positions.device)[None, :] <= limit[:, None])[:, None, None]

    def attend(self, layer, q, k, v):
        """q (rows, 1, H, hd), k/v (rows, 1, KVH, hd) -> (rows, 1, H, hd)."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, self.positions] = k[:, 0]
        vc[self.rows, :, self.positions] = v[:, 0]
        if self.kernel:
            return decode_attention(q[:, 0], kc, vc, self.rows, self.lengths)[:, None]
        rows, kv_heads = q.shape[0], k.shape[2]
        keys, values = kc[:rows, :, :self.length], vc[:rows, :, :self.length]
        qd = q.reshape(rows, kv_heads, -1, q.shape[-1])  # query heads grouped per KV head, as CachedAttention
        out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=self.mask)
        return out.reshape(rows, 1, -1, q.shape[-1])
