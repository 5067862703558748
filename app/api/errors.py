"""One error shape for every route: {"error": {"message", "type", "param", "code"}} (OpenAI's), with the right
status; `param` names the request field at fault (`temperature`, `messages.0.role`), else null.

Engine and store exceptions map to 4xx here, so no route needs its own try/except for them; anything a
client can send ends as a 4xx, and a 500 means a bug.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.encoder import TextTooLong, UnencodableText
from app.engine.request import InvalidRequest, Overloaded, PromptNotFound, ShuttingDown, WrongTaskType
from app.engine.tokenizer import ChatTemplateError
from app.finetune.files import FileInUse, FileNotFound, StorageFull
from app.finetune.jobs import JobFinished, JobNotFound, TooManyJobs
from app.grammars import GrammarsBusy
from prompt_store.format import PromptFormatError
from prompt_store.registry import PromptExists, VersionConflict

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "overloaded_error", 499: "client_closed_request", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# errors worth retrying as they are: `Retry-After` seconds. A full queue (429) frees up; a replica that is
# shutting down (503) is out of its load balancer, and its connection closed after the answer, so the retry
# goes to another replica on a new connection.
RETRY_AFTER_S = {"overloaded": "1", "shutting_down": "1"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is being read, past the size limit. An HTTPException, so that FastAPI's body
    reading passes it through instead of turning it into a 400."""

    def __init__(self, limit: int, setting: str):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes ({setting})")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param,
                      "code": code or str(status)}}


def error_response(status: int, message: str, code: str | None = None, headers=None,
                   param: str | None = None) -> JSONResponse:
    if code in RETRY_AFTER_S:
        headers = {"Retry-After": RETRY_AFTER_S[code], **(headers or {})}
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


LOCATIONS = {"body", "query", "path", "header", "cookie"}  # where a field sits; not part of its name
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _is_type_tag(part) -> bool:
    """pydantic adds a union member's type to an error location (("inputs", "list[str]", 0)); not a field."""
    return isinstance(part, str) and (not part.isidentifier() or part in TYPE_NAMES)


def field_path(loc) -> str | None:
    """pydantic's error location -> the client's field path: ("body", "messages", 0, "role") -> "messages.0.role"."""
    loc = list(loc)
    if loc and loc[0] in LOCATIONS:
        loc = loc[1:]
    return ".".join(str(p) for p in loc if not _is_type_tag(p)) or None


def describe_validation(exc: RequestValidationError) -> tuple[str, str, str | None]:
    """(message, code, param) of a request that breaks the schema: always a 400 (the client's fault),
    naming the first field at fault; a body that is not JSON at all is `invalid_json`. For a union field
    pydantic reports every member; an error at a field that another error names a part of (`inputs` as a
    string, when `inputs.0` of the list failed) is the member the client did not mean, so it is left out."""
    errors = []
    for err in exc.errors():
        kind, loc, msg = err.get("type"), tuple(err.get("loc", ())), str(err.get("msg"))
        if kind == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", "invalid_json", None
        path = field_path(loc)
        if kind == "extra_forbidden" and loc:  # the client's own key, whatever characters it has
            path = ".".join(p for p in (field_path(loc[:-1]), str(loc[-1])) if p)
            msg = "unknown field: this route does not take it (/docs lists its fields)"
        errors.append((path, msg, FIELD_ERROR_CODES.get(kind, "validation_error")))
    paths = {path for path, _, _ in errors if path}
    parts, first, code = [], None, None
    for path, msg, err_code in errors:
        if path and any(other.startswith(path + ".") for other in paths):
            continue
        first, code = first or path, code or err_code
        message = f"{path}: {msg}" if path else msg
        if message not in parts:
            parts.append(message)
    return "; ".join(parts) or "invalid request", code or "validation_error", first


# pydantic error types with their own code: a field softserve knows but does not do, and one it does not know
FIELD_ERROR_CODES = {"unsupported_field": "unsupported_field", "extra_forbidden": "unknown_field"}


# (exception class, status, code); subclasses before their bases
ENGINE_ERRORS = [
    (WrongTaskType, 422, "wrong_task_type"),
    (TextTooLong, 400, "input_too_long"),
    (UnencodableText, 400, "invalid_text"),
    (InvalidRequest, 400, "invalid_request"),
    (ChatTemplateError, 400, "chat_template"),
    (PromptNotFound, 404, "prompt_not_found"),
    (PromptFormatError, 422, "invalid_prompt"),
    (VersionConflict, 409, "version_conflict"),
    (PromptExists, 409, "prompt_exists"),
    (Overloaded, 429, "overloaded"),
    (GrammarsBusy, 429, "overloaded"),
    (ShuttingDown, 503, "shutting_down"),
    (FileNotFound, 404, "file_not_found"),
    (FileInUse, 409, "file_in_use"),
    (StorageFull, 429, "storage_full"),
    (JobNotFound, 404, "job_not_found"),
    (JobFinished, 409, "job_finished"),
    (TooManyJobs, 429, "too_many_jobs"),
]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.code, headers, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, code, param = describe_validation(exc)
        return error_response(400, message, code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), HTTP_CODES.get(exc.status_code),
                              getattr(exc, "headers", None))

    for cls, status, code in ENGINE_ERRORS:
        def handler(request: Request, exc: Exception, status=status, code=code):
            return error_response(status, str(exc), code, param=getattr(exc, "param", None))
        app.add_exception_handler(cls, handler)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
