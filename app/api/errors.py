"""One error shape for every route: {"error": {"message", "type", "code"}} (OpenAI's), with the right status.

Engine and store exceptions map to 4xx here, so no route needs its own try/except for them; anything a
client can send ends as a 4xx, and a 500 means a bug.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.engine import InvalidRequest, Overloaded, PromptNotFound, ShuttingDown, WrongTaskType
from app.engine.tokenizer import ChatTemplateError
from prompt_store.format import PromptFormatError
from prompt_store.registry import PromptExists
from prompt_store.registry import PromptNotFound as StoredPromptNotFound

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "overloaded_error", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is being read, past the size limit. An HTTPException, so that FastAPI's body
    reading passes it through instead of turning it into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes (SOFTSERVE_MAX_UPLOAD_MB)")


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "code": code or str(status)}}


def error_response(status: int, message: str, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> tuple[int, str, str]:
    """(status, message, code): a body that is not JSON at all is a 400, a JSON body that breaks the schema a 422."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            return 400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", "invalid_json"
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return 422, "; ".join(parts) or "invalid request", "validation_error"


# (exception class, status, code); subclasses before their bases
ENGINE_ERRORS = [
    (WrongTaskType, 422, "wrong_task_type"),
    (InvalidRequest, 400, "invalid_request"),
    (ChatTemplateError, 400, "chat_template"),
    (PromptNotFound, 404, "prompt_not_found"),
    (StoredPromptNotFound, 404, "prompt_not_found"),
    (PromptFormatError, 422, "invalid_prompt"),
    (PromptExists, 409, "prompt_exists"),
    (Overloaded, 429, "overloaded"),
    (ShuttingDown, 503, "shutting_down"),
]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(*_describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), HTTP_CODES.get(exc.status_code),
                              getattr(exc, "headers", None))

    for cls, status, code in ENGINE_ERRORS:
        def handler(request: Request, exc: Exception, status=status, code=code):
            headers = {"Retry-After": "1"} if status == 429 else None
            return error_response(status, str(exc), code, headers)
        app.add_exception_handler(cls, handler)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
