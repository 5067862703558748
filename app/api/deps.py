"""Route dependencies: the loaded services (503 until ready, and while draining), API keys, the admin check, and
the query parameters a route takes."""
from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from app.api.errors import APIError
from app.services import Services


def unavailable(state) -> APIError | None:
    """Why this replica takes no request now (the same answer on /health and on every route), or None."""
    if state.draining:
        return APIError(503, "the server is shutting down", "shutting_down")
    if state.services is None:
        if state.load_error:
            return APIError(503, f"the model failed to load: {state.load_error}", "load_failed")
        return APIError(503, "the model is still loading", "not_ready")
    return None


def get_services(request: Request) -> Services:
    """The loaded services; 503 while loading, after a failed load and while draining."""
    refusal = unavailable(request.app.state)
    if refusal is not None:
        raise refusal
    return request.app.state.services


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _same_token(sent: str, expected: str) -> bool:
    """Constant-time comparison of bytes (compare_digest refuses non-ASCII str). HTTP headers arrive as
    latin-1 text, so encoding with latin-1 gives back the bytes the client sent; settings are UTF-8."""
    return hmac.compare_digest(sent.encode("latin-1"), expected.encode("utf-8"))


def require_api_key(request: Request) -> None:
    """With SOFTSERVE_API_KEYS set, inference routes need one of them as a bearer token."""
    keys = request.app.state.settings.api_key_set
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key")
    if not any(_same_token(token, key) for key in keys):
        raise APIError(401, "invalid API key", "invalid_api_key")


def require_admin(request: Request) -> None:
    """Prompt changes, files and fine-tuning jobs: the admin token when one is set, else only clients on this machine."""
    admin = request.app.state.settings.admin_token
    if admin is None:
        if not _is_loopback(request):
            raise APIError(403, "prompt changes, files and fine-tuning are accepted only from loopback clients "
                                "unless SOFTSERVE_ADMIN_TOKEN is set", "admin_only")
        return
    token = _bearer(request)
    if token is None:
        raise APIError(401, "prompt changes, files and fine-tuning need 'Authorization: Bearer <admin token>'",
                       "missing_admin_token")
    if not _same_token(token, admin):
        raise APIError(403, "this token may not change prompts or use files and fine-tuning", "forbidden")


def query(*names: str, metadata: bool = False):
    """A dependency that refuses (400, naming it) a query parameter the route does not take, as every body field
    is refused; `metadata[key]=value` (OpenAI's job filter) where metadata=True: returns those pairs."""
    def check(request: Request) -> dict[str, str]:
        pairs = {}
        for key, value in request.query_params.multi_items():
            if metadata and key.startswith("metadata[") and key.endswith("]"):
                pairs[key[len("metadata["):-1]] = value
            elif key not in names:
                raise APIError(400, f"unknown query parameter {key!r}; this route takes "
                                    f"{', '.join(names + (('metadata[KEY]',) if metadata else ()))}", "unknown_field", key)
        return pairs
    return check
