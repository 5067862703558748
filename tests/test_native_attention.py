"""The CPU's C kernels (app/engine/native/paged_attention.c, prefill_attention.c): decode and prefill attention
against SDPA, the KV write against KVCache.write, the engine's outputs against its SDPA path, and how the library
is built and loaded.
This machine (and CI's) has a C compiler, so the kernels are required here, never skipped."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.engine import native_library
from app.engine.attention import PagedAttention, PrefillChunk
from app.engine.decode_attention import sdpa_reference
from app.engine.kv_cache import KVCache
from app.engine.model import ModelArgs
from app.engine.native_attention import use_native
from tests.test_engine import assert_same, ids, new_engine, run
from tests.test_paged_kv import logprob_request, assert_same_logprobs, prompts_for

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def kernels_for(args: ModelArgs, dtype=torch.float32):
    return use_native("native", CPU, dtype, args)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
def test_decode_attention_reads_each_row_through_its_block_table_as_sdpa_does(dtype, tolerance, heads, kv_heads,
                                                                              head_dim):
    args = ModelArgs("llama", 100, heads * head_dim, 64, 1, heads, kv_heads, head_dim)
    kernels = kernels_for(args, dtype)
    g = torch.Generator().manual_seed(heads)
    blocks, page = 90, 8
    k = torch.randn(kv_heads, blocks, page, head_dim, generator=g).to(dtype)
    v = torch.randn(kv_heads, blocks, page, head_dim, generator=g).to(dtype)
    lengths = torch.tensor([1, 7, 8, 9, 100, 33], dtype=torch.int32)  # around block edges
    order = torch.randperm(blocks, generator=g)
    tables = torch.zeros(6, 13, dtype=torch.long)
    used = 0
    for row, n in enumerate(lengths.tolist()):  # each row its own scattered blocks; the rest of a table is 0
        need = -(-n // page)
        tables[row, :need] = order[used:used + need]
        used += need
    q = torch.randn(6, heads, head_dim, generator=g).to(dtype)
    got = kernels.decode_attention(q, k, v, tables, lengths).float()
    want = sdpa_reference(q.float(), k.float().permute(1, 2, 0, 3), v.float().permute(1, 2, 0, 3), tables, lengths)
    assert got.shape == (6, heads, head_dim)
    assert (got - want).abs().max().item() < tolerance * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("tokens", [7, 50])  # 50: split over the threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kv_write_puts_every_token_and_head_where_kv_cache_write_does(dtype, tokens):
    args = ModelArgs("llama", 100, 96, 64, 2, 6, 3, 16)
    kernels = kernels_for(args, dtype)
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(tokens, 6 * 16 + 2 * 3 * 16, generator=g).to(dtype)  # a q,k,v projection's output
    k = torch.randn(tokens, 3, 16, generator=g).to(dtype)
    v = fused[:, -3 * 16:].view(tokens, 3, 16)  # a strided view, as the model's v is
    slots = torch.randperm(64, generator=g)[:tokens]
    ours, theirs = (KVCache(args, num_blocks=8, block_size=8, device="cpu", dtype=dtype) for _ in range(2))
    kernels.write(ours, 1, slots, k, v)
    theirs.write(1, slots, k, v)
    assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)
    assert ours.k[1].flatten(1, 2)[:, slots].abs().sum() > 0 and ours.k[0].abs().sum() == 0  # layer 1 only


@pytest.mark.parametrize("decode_positions, chunks", [
    # chunks (length, first position) across the kernel's 16-token query tiles and 32-key tiles, from
    # position 0 and after a cached prefix that ends inside a block
    ([30, 5, 70], [(60, 0), (10, 0), (8, 20), (50, 16), (1, 0), (33, 31)]),
    ([], [(17, 0), (3, 12), (48, 0), (100, 77)]),  # a step of prefill chunks only
])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_dim", [16, 24])  # 24: a vector of 16 and 8 values one by one
def test_a_steps_rows_attend_in_the_c_kernels_as_through_sdpa(decode_positions, chunks, dtype, tolerance, head_dim):
    """A step's decode rows and prefill chunks: the C path (decode kernel, then one prefill call for every
    chunk) gives SDPA's outputs in the flat list's order, and writes the same cache."""
    args = ModelArgs("llama", 100, 6 * head_dim, 64, 1, 6, 2, head_dim)
    kernels = kernels_for(args, dtype)
    g = torch.Generator().manual_seed(len(chunks))
    block = 8
    caches = [KVCache(args, num_blocks=96, block_size=block, device="cpu", dtype=dtype) for _ in range(2)]
    for name in ("k", "v"):  # the same earlier positions in both: a prefix or a decode row's past
        values = torch.randn(getattr(caches[0], name).shape, generator=g).to(dtype)
        for cache in caches:
            getattr(cache, name).copy_(values)
    free = iter(torch.randperm(95, generator=g).add(1).tolist())
    def table(positions: int) -> list[int]:
        return [next(free) for _ in range(-(-positions // block))]
    decode_tables = [table(p + 1) for p in decode_positions]
    slots = [t[p // block] * block + p % block for t, p in zip(decode_tables, decode_positions)]
    positions, steps = list(decode_positions), []
    for length, start in chunks:
        t = table(start + length)
        steps.append(PrefillChunk(t, len(positions), length, start))
        positions += range(start, start + length)
        slots += [t[p // block] * block + p % block for p in range(start, start + length)]
    tokens = len(positions)
    fused = torch.randn(1, tokens, 10 * head_dim, generator=g).to(dtype)  # q, k, v: views of one projection
    q, k, v = (x.view(1, tokens, -1, head_dim) for x in fused.split([6 * head_dim, 2 * head_dim, 2 * head_dim], -1))
    got = PagedAttention(caches[0], slots, positions, decode_tables, steps, native=kernels).attend(0, q, k, v)
    want = PagedAttention(caches[1], slots, positions, decode_tables, steps, native=None).attend(0, q, k, v)
    assert got.shape == want.shape == (1, tokens, 6, head_dim)
    assert (got.float() - want.float()).abs().max().item() < tolerance * max(1.0, want.float().abs().max().item())
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


def test_the_engine_gives_the_same_tokens_and_logprobs_with_the_c_kernels_as_with_sdpa(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    prompts = prompts_for(loaded)
    requests = [logprob_request("shallow", ids(9, 1), 10), logprob_request("deep", ids(30, 2), 12),
                logprob_request(None, ids(50, 3), 8), logprob_request("shallow", ids(3, 4), 16)]
    outputs = {}
    for choice in ("native", "sdpa"):
        engine = new_engine(loaded, tokenizer, prompts, decode_attention=choice)
        try:
            assert (engine.core.runner.native is not None) == (choice == "native")
            outputs[choice] = run(engine, requests)
        finally:
            asyncio.run(engine.shutdown(1))
    for a, b in zip(outputs["native"], outputs["sdpa"]):
        assert_same(a, b)
        assert_same_logprobs(a, b)


def test_without_a_compiler_the_engine_keeps_sdpa_and_native_is_refused(monkeypatch, tmp_path):
    args = ModelArgs("llama", 100, 64, 64, 1, 4, 2, 16)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native_library.load.cache_clear()
    try:
        assert native_library.load() is None
        assert use_native("auto", CPU, torch.float32, args) is None
        with pytest.raises(ValueError, match="could not be built"):
            use_native("native", CPU, torch.float32, args)
    finally:
        native_library.load.cache_clear()
    assert use_native("sdpa", CPU, torch.float32, args) is None
    with pytest.raises(ValueError, match="runs on the CPU"):
        use_native("native", torch.device("meta"), torch.float32, args)
    with pytest.raises(ValueError, match="float16"):
        use_native("native", CPU, torch.float16, args)


def test_a_source_that_does_not_compile_leaves_no_library_behind(monkeypatch, tmp_path):
    broken = tmp_path / "paged_attention.c"
    broken.write_text("int paged_decode_attention( {\n")
    monkeypatch.setattr(native_library, "SOURCES", [broken, *native_library.SOURCES[1:]])
    monkeypatch.setenv("SOFTSERVE_NATIVE_CACHE_DIR", str(tmp_path / "built"))
    native_library.load.cache_clear()
    try:
        assert native_library.load() is None
    finally:
        native_library.load.cache_clear()
    assert list((tmp_path / "built").iterdir()) == []  # no library, no half-written file


def test_a_new_build_removes_the_libraries_unused_for_a_week_and_loading_marks_one_used(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTSERVE_NATIVE_CACHE_DIR", str(tmp_path))
    day = 24 * 3600
    stale, recent = tmp_path / "softserve-kernels-0000000000000000.so", tmp_path / "softserve-kernels-1111.so"
    other = tmp_path / "not-ours.so"
    for path, age_days in ((stale, 8), (recent, 6), (other, 30)):
        path.write_bytes(b"")
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age_days * day))
    native_library.load.cache_clear()
    try:
        assert native_library.load() is not None  # built: this folder had no library for these sources
        built = [p for p in tmp_path.glob("softserve-kernels-*.so") if p not in (stale, recent)]
        assert len(built) == 1 and not stale.exists() and recent.exists() and other.exists()
        os.utime(built[0], (built[0].stat().st_atime, built[0].stat().st_mtime - 8 * day))
        native_library.load.cache_clear()
        assert native_library.load() is not None  # loaded, not built again: now marked used
        assert time.time() - built[0].stat().st_mtime < day and recent.exists()
    finally:
        native_library.load.cache_clear()


def test_the_library_is_built_once_and_leaves_the_processs_floating_point_mode_alone(tmp_path):
    """-ffast-math compiles the kernels; if it reached the link, loading them would flush subnormal floats to
    zero in the whole process."""
    script = ("import torch; from app.engine import native_library; assert native_library.load() is not None; "
              "print(torch.tensor([1e-40]).mul(1.0).item() != 0.0)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SOFTSERVE_NATIVE_CACHE_DIR=str(tmp_path))
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "True"
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".so"]) == 1  # the second process reused it
