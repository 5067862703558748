"""Decode-only steps at static shapes, captured once as CUDA graphs and replayed.

A decode step of an L-layer model launches about 25 small kernels per layer; run eagerly, the Python and
launch cost of those ~800 launches (32 layers) exceeds the GPU time of the step itself. A CUDA graph
replays the whole step, logits included, as one launch.

A graph needs fixed shapes and fixed addresses, so a step is padded into a bucket (rows, length): rows is a
bucket above the number of decoding sequences, and every row attends the first `length` positions through
its block table, masked past its own position (StaticDecodeAttention with SDPA). With the Triton decode
kernel each row reads only its own keys, so there is one length bucket. Padded rows have position 0 and a
table of scratch blocks: they write into the scratch block and their logits are dropped. Tokens, positions
and block tables live in static buffers that each step fills before the replay; logits land in one static
buffer shared by every graph.

Without graphs (CPU) the same static step runs eagerly: that is how the tests hold it to the dynamic path.
"""
from __future__ import annotations

import logging
import time

import torch

from app.engine.attention import StaticDecodeAttention
from app.engine.block_manager import SCRATCH_BLOCK
from app.engine.kv_cache import KVCache
from app.engine.model import Transformer

log = logging.getLogger(__name__)


def bucket_sizes(limit: int, smallest: int) -> list[int]:
    """smallest, then powers of two and 1.5x powers of two (so padding wastes under a half), up to limit."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        if size >= 16 and size & (size - 1) == 0:  # a power of two: the 1.5x step before the next one
            sizes.append(size * 3 // 2)
        size *= 2
    return sorted({s for s in sizes if s < limit} | {limit})


def _pick(buckets: list[int], need: int) -> int:
    return next(b for b in buckets if b >= need)


class StaticDecoder:
    def __init__(self, model: Transformer, cache: KVCache, max_rows: int, max_seq_len: int, use_graphs: bool,
                 kernel: bool):
        """kernel: decode attention through the Triton kernel (CUDA), else SDPA."""
        device = cache.device
        self.model, self.cache, self.use_graphs, self.kernel = model, cache, use_graphs, kernel
        self.row_buckets = bucket_sizes(max_rows, 1)
        self.length_buckets = [max_seq_len] if kernel else bucket_sizes(max_seq_len, 64)
        self.max_blocks = -(-max_seq_len // cache.block_size)
        self.inputs = torch.zeros(2, max_rows, dtype=torch.long, device=device)  # tokens; positions
        self.tables = torch.full((max_rows, self.max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=device)
        self.logits = torch.empty(max_rows, model.args.vocab_size, dtype=cache.k.dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool shared by all graphs: they never run at the same time

    @torch.inference_mode()
    def run(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode token per sequence (its last token, its position, its block table) -> logits (n, V)."""
        n = len(tokens)
        rows = _pick(self.row_buckets, n)
        length = _pick(self.length_buckets, max(positions) + 1)
        pad = rows - n
        host_inputs = torch.tensor([tokens + [0] * pad, positions + [0] * pad], dtype=torch.long)
        # Only the columns some row uses: a row reads its table only below its own length (the kernel) or
        # masks what lies beyond it (SDPA), so older entries further right are never used.
        width = max(len(t) for t in tables)
        host_tables = torch.tensor([t + [SCRATCH_BLOCK] * (width - len(t)) for t in tables]
                                   + [[SCRATCH_BLOCK] * width] * pad, dtype=torch.long)
        self.inputs[:, :rows].copy_(host_inputs)
        self.tables[:rows, :width].copy_(host_tables)
        if not self.use_graphs:
            self._forward(rows, length)
        else:
            graph = self.graphs.get((rows, length)) or self._capture(rows, length)
            graph.replay()
        return self.logits[:n]

    def _forward(self, rows: int, length: int) -> None:
        tokens, positions = self.inputs[0, :rows], self.inputs[1, :rows]
        attention = StaticDecodeAttention(self.cache, positions, self.tables[:rows], length, self.kernel)
        hidden = self.model(positions[:, None], attention, tokens=tokens[:, None])
        self.model.logits(hidden[:, 0], out=self.logits[:rows])

    def _capture(self, rows: int, length: int) -> torch.cuda.CUDAGraph:
        # The inputs already hold this step (or, from capture_all, only padded rows): the warm-up run below
        # writes exactly the K,V the replay will write, so it changes nothing a sequence reads.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # first run outside the capture: cuBLAS/SDPA set up their workspaces
            self._forward(rows, length)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(rows, length)
        self._pool = graph.pool()
        self.graphs[(rows, length)] = graph
        return graph

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Every bucket, largest first (smaller graphs then reuse the pool), before any sequence runs."""
        start = time.perf_counter()
        self.inputs.zero_()
        self.tables.fill_(SCRATCH_BLOCK)
        for rows in reversed(self.row_buckets):
            for length in reversed(self.length_buckets):
                self._capture(rows, length)
        torch.cuda.synchronize(self.inputs.device)
        log.info("captured %d decode graphs (%d row x %d length buckets) in %.1f s", len(self.graphs),
                 len(self.row_buckets), len(self.length_buckets), time.perf_counter() - start)
