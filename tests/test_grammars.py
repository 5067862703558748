"""The grammar compile pool (app/grammars.py) with real xgrammar grammars of the default tokenizer: one grammar
asked for by many requests at once is compiled once, compiles beyond the pending limit are refused (and the
others still finish), and the cache of compiled grammars stays within its bytes."""
from __future__ import annotations

import asyncio
import threading

import pytest

from app.engine.grammar import GrammarError, Grammars
from app.grammars import GrammarCompiler, GrammarsBusy


class CountingGrammars(Grammars):
    """Grammars that count their compiles and, while `gate` is clear, hold each one (to keep it pending)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.compiles, self.gate = 0, threading.Event()

    def compile(self, kind, source):
        self.compiles += 1
        self.gate.wait(30)
        return super().compile(kind, source)


@pytest.fixture(scope="module")
def grammars(tokenizer, default_model) -> CountingGrammars:
    return CountingGrammars(tokenizer.hf, default_model.args.vocab_size)


def compiler(grammars, max_pending=4, cache_bytes=64 << 20) -> GrammarCompiler:
    grammars.compiles = 0
    grammars.gate.set()
    return GrammarCompiler(lambda: grammars, threads=1, max_pending=max_pending, cache_bytes=cache_bytes)


async def test_one_grammar_asked_for_at_once_compiles_once_then_comes_from_the_cache(grammars):
    pool = compiler(grammars)
    grammars.gate.clear()
    waiting = [asyncio.ensure_future(pool.compile("choice", ["yes", "no"])) for _ in range(5)]
    await asyncio.sleep(0.1)
    grammars.gate.set()
    compiled = await asyncio.gather(*waiting)
    assert all(c is compiled[0] for c in compiled) and grammars.compiles == 1
    assert await pool.compile("choice", ["yes", "no"]) is compiled[0] and grammars.compiles == 1
    pool.close()


async def test_compiles_beyond_the_pending_limit_are_refused(grammars):
    pool = compiler(grammars, max_pending=2)
    grammars.gate.clear()
    first = [asyncio.ensure_future(pool.compile("regex", f"a{i}")) for i in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(GrammarsBusy, match="SOFTSERVE_GRAMMAR_MAX_PENDING"):
        await pool.compile("regex", "b")
    grammars.gate.set()
    assert len(await asyncio.gather(*first)) == 2
    assert await pool.compile("regex", "b") is not None  # room again
    pool.close()


async def test_a_bad_grammar_is_an_error_for_its_request_only(grammars):
    pool = compiler(grammars)
    with pytest.raises(GrammarError):
        await pool.compile("regex", "(unclosed")
    assert await pool.compile("regex", "[0-9]+") is not None
    pool.close()


async def test_the_cache_keeps_within_its_bytes_dropping_the_least_recently_used(grammars):
    one = (await compiler(grammars).compile("choice", ["w0", "x0"])).memory_size_bytes
    pool = compiler(grammars, cache_bytes=3 * one)
    for i in range(6):
        await pool.compile("choice", [f"w{i}", f"x{i}"])
        await pool.compile("choice", ["w0", "x0"])  # kept in use: never dropped
        assert pool.cache.bytes <= 3 * one
    compiles = grammars.compiles
    await pool.compile("choice", ["w0", "x0"])
    await pool.compile("choice", ["w1", "x1"])  # dropped long ago: compiled again
    assert grammars.compiles == compiles + 1
    pool.close()
