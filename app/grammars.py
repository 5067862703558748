"""Grammar compilation for structured output, off the event loop and off the engine thread.

Grammars compile in a small thread pool of their own (SOFTSERVE_GRAMMAR_COMPILE_THREADS, one by default)
whose threads run at the lowest CPU priority: the engine's steps and the tokenizer threads always come
first, so a request waiting for its grammar holds up nobody else's tokens (the engine only ever sees
compiled grammars). At most SOFTSERVE_GRAMMAR_MAX_PENDING compiles wait or run at once (429 beyond), and
one grammar asked for by several requests at once is compiled once. Compiled grammars are kept by content
in an LRU cache bounded in bytes (SOFTSERVE_GRAMMAR_CACHE_MB).

xgrammar cannot stop a compile once it started; what bounds a compile's time is the price check before it
(app/api/grammar_price.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from app.engine.grammar import Grammars

LOWEST_PRIORITY = 19  # nice value of the compile threads


class GrammarsBusy(RuntimeError):
    """Too many grammar compiles are waiting already; retry."""


class CompiledCache:
    """Compiled grammars by key, least recently used dropped first beyond `max_bytes` (their own size)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str):
        compiled = self._entries.get(key)
        if compiled is not None:
            self._entries.move_to_end(key)
        return compiled

    def put(self, key: str, compiled) -> None:
        size = compiled.memory_size_bytes
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = compiled
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.memory_size_bytes


def _lower_priority() -> None:
    """Run this (pool) thread at the lowest CPU priority. Linux keeps a nice value per thread; elsewhere
    setpriority would apply to the whole process, so it is left alone."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)


class GrammarCompiler:
    """build: makes the Grammars (xgrammar's tokenizer info, about 0.4 s), called in the pool on first use."""

    def __init__(self, build: Callable[[], Grammars], threads: int, max_pending: int, cache_bytes: int):
        self._build, self._grammars, self._build_lock = build, None, threading.Lock()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="softserve-grammar", initializer=_lower_priority)
        self.max_pending = max_pending
        self.cache = CompiledCache(cache_bytes)
        self._pending: dict[str, asyncio.Future] = {}  # key -> its compile (event loop only)

    async def compile(self, kind: str, source) -> Any:
        """The compiled grammar (see Grammars.compile); GrammarError for one that does not compile,
        GrammarsBusy when max_pending compiles are under way already."""
        key = kind + ":" + json.dumps(source, sort_keys=True, separators=(",", ":"))
        compiled = self.cache.get(key)
        if compiled is not None:
            return compiled
        future = self._pending.get(key)
        if future is None:
            if len(self._pending) >= self.max_pending:
                raise GrammarsBusy(f"{len(self._pending)} grammars are compiling or waiting to, the limit "
                                   f"(SOFTSERVE_GRAMMAR_MAX_PENDING); retry")
            future = asyncio.get_running_loop().run_in_executor(self.pool, self._compile, kind, source)
            self._pending[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(future)  # a waiter that gives up does not cancel the others' compile

    def _finished(self, key: str, future: asyncio.Future) -> None:
        del self._pending[key]
        if not future.cancelled() and future.exception() is None:
            self.cache.put(key, future.result())

    def _compile(self, kind: str, source):
        with self._build_lock:
            if self._grammars is None:
                self._grammars = self._build()
        return self._grammars.compile(kind, source)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
