"""Running one HTTP request's engine sequences: submitted together, cancelled if the client leaves, and an
output that is not a result (timeout, cancelled, engine error) turned into the error response it calls for."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, TypeVar

from fastapi import Request

from app.api.errors import APIError
from app.engine.request import FinishReason
from app.engine.sequence import Output, Sequence
from app.services import Services

T = TypeVar("T")


async def run_all(request: Request, services: Services, seqs: list[Sequence]) -> tuple[list[Output], float]:
    """Run one HTTP request's sequences as one engine request (admitted together, counted once against
    the queue limit); (outputs, end time). A client that disconnects meanwhile cancels all of them."""
    outs = await cancel_on_disconnect(request, services.engine.run_group(seqs))
    end = time.monotonic()
    for out in outs:
        check_output(out)
    return outs, end


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which frees its engine sequences at the next
    step) and end the request with 499. Streams get this from the streaming response itself; a
    non-streaming request would otherwise keep its KV slot until it finished for nobody."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work_task.done():
            raise APIError(499, "the client disconnected", "client_disconnected")
        return work_task.result()
    finally:
        watcher.cancel()
        work_task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is already read, so the next ASGI message is the
    disconnect (uvicorn sends it as soon as the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_output(out: Output) -> None:
    """A request that ended without a result is an error response, never a half answer."""
    if out.finish_reason == FinishReason.TIMEOUT:
        raise APIError(504, out.error or "the request timed out (SOFTSERVE_REQUEST_TIMEOUT_S)", "timeout")
    if out.finish_reason == FinishReason.CANCELLED:
        raise APIError(503, "the request was cancelled: the server is shutting down", "cancelled")
    if out.finish_reason == FinishReason.ERROR:
        raise APIError(500, out.error or "internal error in the engine", "engine_error")
