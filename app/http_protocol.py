"""The HTTP protocol the server speaks: uvicorn's (httptools), plus time limits for clients that stall.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive` seconds, but nothing else: a client
that connects and sends nothing, half a request line, headers without their end, or part of a body, and
then waits, holds its connection (and a file descriptor) for as long as it likes, and enough of them use
up the process's file limit. Here a request's line and headers must all arrive within
SOFTSERVE_CLIENT_TIMEOUT_S of the connection (or of its first byte, on a kept-alive connection), however
slowly they trickle in, and its body may pause no longer than that; past either the connection is closed,
with a 408 when part of a request had arrived. A body the server itself has stopped reading (it is busy
with what came before) never counts as the client's pause.

It also ends kept-alive connections when the app starts draining (app/server.py), so that clients reconnect
(to another replica: by then this one is out of the load balancer, or stops listening soon) instead of
sending every next request here, to be refused: an idle connection is closed at once, a busy one after the
response it is writing, and every response written from then on, on any connection, is that connection's
last (`Connection: close`). uvicorn does the same on its own shutdown, but that comes only after the drain.

`softserve serve` uses it; under uvicorn, pass `--http app.http_protocol:HTTPProtocol`. The seconds and the
drain come from the app's lifespan state (app/server.py), so they are the app's whichever way it started.
"""
from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import error_body

CLIENT_TIMEOUT_STATE = "client_timeout_s"  # the lifespan state's key for SOFTSERVE_CLIENT_TIMEOUT_S
DRAIN_STATE = "connection_drain"  # the lifespan state's key for the app's ConnectionDrain


class ConnectionDrain:
    """The server's open HTTP connections, as the app sees them: `start()` (when the app starts draining)
    ends every kept-alive connection as soon as it has nothing left to answer, and makes each response
    written from then on its connection's last."""

    def __init__(self):
        self.draining = False
        self.connections: set[HTTPProtocol] = set()

    def start(self) -> None:
        self.draining = True
        for connection in list(self.connections):
            # uvicorn's: closed now if idle, else after the response in progress, which then says
            # `Connection: close` (unless its head has gone out already, as a running stream's has)
            connection.shutdown()


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(error_body(408, f"the request did not arrive within {seconds:g} s (SOFTSERVE_CLIENT_TIMEOUT_S)",
                                 "request_timeout")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class HTTPProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_timeout_s: float | None = self.app_state.get(CLIENT_TIMEOUT_STATE)  # None: lifespan off
        self.drain: ConnectionDrain | None = self.app_state.get(DRAIN_STATE)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_body = False  # the head is in, the body is still coming
        self._request_started = False  # a byte of the current request has arrived

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.drain is not None:
            self.drain.connections.add(self)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self.drain is not None:
            self.drain.connections.discard(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        if self._deadline is None:  # the next request on a kept-alive connection: its head's deadline
            self._arm()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.drain is not None and self.drain.draining:  # a request that came in the drain: answered, then closed
            self.shutdown()
        self._in_body = True
        self._arm()  # now the body's pause limit (cancelled at once when there is no body)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = self._request_started = False
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        if self.client_timeout_s is not None:
            self._deadline = self.loop.call_later(self.client_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_body and self.flow.read_paused:  # the server is not reading: not the client's pause
            self._arm()
            return
        if not self._in_body and self._request_started:
            self.transport.write(_timeout_response(self.client_timeout_s))
        self.transport.close()
