"""One pure-ASGI middleware for every request: request id, body size limit, access log, request metrics.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses pass straight through and a cancelled
stream is not wrapped in extra tasks. The access log is one key=value line per request, written when the
last byte has gone out, so a stream's line carries its whole duration.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid

from app.api.errors import BodyTooLarge, error_body
from app.metrics import Metrics
from prompt_store.format import BASE_MODEL

log = logging.getLogger("softserve.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: no trailing newline
UPLOAD_PATH = re.compile(r"/v1/prompts/[^/]+")  # PUT: a prompt upload (not its /traffic)


def kv(**fields) -> str:
    """key=value pairs; values with spaces, quotes or '=' are JSON-quoted, so each line splits unambiguously."""
    parts = []
    for key, value in fields.items():
        text = "-" if value is None else str(value)
        if not text or re.search(r'[\s"=\\]', text):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's x-request-id when it is safe to log and echo, else a new one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def length_refusal(length: bytes | None, limit: int, setting: str) -> tuple[int, str, str] | None:
    """(status, message, code) for a Content-Length that is not a number or is over the limit; else None.
    (A body sent without one is counted as it arrives.)"""
    if length is None:
        return None
    if not length.isdigit():
        return 400, "invalid Content-Length header", "invalid_content_length"
    if int(length) > limit:
        message = f"the request body ({int(length)} bytes) exceeds the limit of {limit} bytes ({setting})"
        return 413, message, "payload_too_large"
    return None


DISCARD_BYTES = 64 << 20  # the most of a refused body read (and dropped) before answering
DISCARD_S = 5.0


async def discard_body(receive) -> None:
    """Read what the client is still sending of a refused body, and drop it, so that it reads the answer:
    closing on a client that is still writing resets the connection, and it would see an error instead of
    the 413 (nginx's lingering close). Bounded in bytes and time; past either, the connection is closed."""
    received, deadline = 0, time.monotonic() + DISCARD_S
    while received <= DISCARD_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class RequestMiddleware:
    def __init__(self, app, settings, metrics: Metrics, get_services):
        self.app, self.settings, self.metrics, self.get_services = app, settings, metrics, get_services

    def body_limit(self, scope) -> tuple[int, str]:
        """(bytes, setting): prompt and file uploads may be large; every other body (inference) is kept small,
        so one client cannot make the server parse and tokenize tens of megabytes."""
        if scope["method"] == "PUT" and UPLOAD_PATH.fullmatch(scope["path"]):
            return int(self.settings.max_upload_mb * (1 << 20)), "SOFTSERVE_MAX_UPLOAD_MB"
        if scope["method"] == "POST" and scope["path"] == "/v1/files":
            return int(self.settings.finetune_max_file_mb * (1 << 20)), "SOFTSERVE_FINETUNE_MAX_FILE_MB"
        return int(self.settings.max_request_mb * (1 << 20)), "SOFTSERVE_MAX_REQUEST_MB"

    async def __call__(self, scope, receive, send):
        """Give the request an id (echoed in `x-request-id`), hold its body to the size limit, and log and
        count it once it is answered."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        limit, setting = self.body_limit(scope)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
                served = (scope.get("state") or {}).get("prompt_version")
                if served is not None:
                    message["headers"].append((b"x-prompt-version", str(served[1]).encode()))
            await send(message)

        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await discard_body(receive)
                    raise BodyTooLarge(limit, setting)
            return message

        try:
            refusal = length_refusal(headers.get(b"content-length"), limit, setting)
            if refusal is not None:
                await discard_body(receive)
                await self._refuse(send_with_id, *refusal)
            else:
                await self.app(scope, counting_receive, send_with_id)
        finally:
            self._record(scope, rid, status, time.perf_counter() - start)
            request_id_var.reset(token)

    def _record(self, scope, rid: str, status: int, duration: float) -> None:
        """The request's metrics and its access-log line."""
        route_path = getattr(scope.get("route"), "path", None) or "unmatched"
        prompt = self._prompt_label(scope)
        self.metrics.requests.labels(route_path, str(status), prompt).inc()
        self.metrics.request_duration.labels(route_path).observe(duration)
        state = scope.get("state") or {}
        served = state.get("prompt_version")  # (name, version), once the request's prompt was resolved
        if served is not None:
            name, version = served[0], str(served[1])
            self.metrics.version_requests.labels(route_path, str(status), name, version).inc()
            self.metrics.version_request_duration.labels(route_path, name, version).observe(duration)
        client = scope.get("client")
        fields = dict(request_id=rid, method=scope["method"], path=scope["path"], route=route_path,
                      status=status, duration_ms=round(duration * 1000, 1), prompt=prompt or None,
                      prompt_version=served[1] if served else None,
                      prompt_tokens=state.get("prompt_tokens"), completion_tokens=state.get("completion_tokens"),
                      client=client[0] if client else None)
        log.info(kv(**fields), extra={"fields": fields})  # (the JSON log format keeps the fields as keys)

    def _prompt_label(self, scope) -> str:
        """The prompt a request named, if it is served (bounded label values: no client-chosen strings)."""
        name = (scope.get("state") or {}).get("prompt")
        if name is None:
            return ""
        if name == BASE_MODEL:
            return name
        services = self.get_services()
        return name if services is not None and name in services.engine.prompts else "unknown"

    @staticmethod
    async def _refuse(send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(status, message, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class HeadAsGet:
    """HEAD on any route answers as GET would, without the body (the server sends the headers only, as it
    does for every HEAD response): load balancers and link checkers probe with HEAD. Routes are declared
    for GET alone, so that the OpenAPI schema lists each operation once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        as_get = dict(scope, method="GET")  # the server's own scope keeps HEAD, so it leaves the body out
        try:
            await self.app(as_get, receive, send)
        finally:  # what routing added (the route, for the access log)
            scope.update({key: value for key, value in as_get.items() if key not in scope})
