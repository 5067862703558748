"""Torch work off the engine's thread, in a thread of its own that ends with it.

Torch's CPU kernels run on OpenMP (libgomp on Linux). libgomp keeps a pool of worker threads for every thread
that has run a parallel region, for as long as that thread lives, and once the process holds more OpenMP
threads than CPUs it makes every pool's workers sleep between parallel regions instead of spinning for the
next one. An engine step runs thousands of small parallel regions, so waking a worker for each is slow: on a
2-core machine one idle pool left behind by a long-lived thread (the model load in an executor's thread, the
bench's main thread) made every engine step 1.4-1.6x slower. A thread that ends frees its pool, so work that
is not the engine's (loading the model, building the engine) runs in a thread of its own; an upload's
forward runs on the engine thread itself (app/engine/prompts.py).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a new thread that ends with it; blocks until then, and raises what fn raised."""
    outcome: dict = {}

    def body() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=body, name=f"softserve-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """asyncio.to_thread's counterpart: fn(*args) in a new thread that ends with it, awaited without blocking
    the event loop. A cancelled caller stops waiting; the thread still runs fn to its end."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def body() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as e:
            outcome = (None, e)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for the result
            pass

    threading.Thread(target=body, name=f"softserve-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await future
