"""Auth: with SOFTSERVE_ADMIN_TOKEN set, prompt changes need it (401 without, 403 with a wrong one); with
SOFTSERVE_API_KEYS set, inference and read routes need a key; /health and /metrics stay open."""
from __future__ import annotations

import httpx
import pytest

from tests.live_server import make_prompt_bytes, upload

ADMIN, KEYS = "admin-secret", ["key-one", "key-two", "clé-trois"]  # a non-ASCII key works too
SERVER_SETTINGS = {"SOFTSERVE_ADMIN_TOKEN": ADMIN, "SOFTSERVE_API_KEYS": ",".join(KEYS)}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}".encode()}  # UTF-8 on the wire


def status_code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"] if r.status_code >= 400 else ""


def test_open_routes(client):
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("POST", "/v1/generate", {"inputs": "Hi", "max_tokens": 1}),
    ("GET", "/v1/models", None), ("GET", "/v1/prompts", None)])
def test_api_keys(client, method, path, body):
    call = lambda headers: client.request(method, path, json=body, headers=headers)  # noqa: E731
    r = call({})
    assert status_code(r) == (401, "missing_api_key") and r.headers["www-authenticate"] == "Bearer"
    assert status_code(call(bearer("nope"))) == (401, "invalid_api_key")
    assert status_code(call(bearer("ключ"))) == (401, "invalid_api_key")  # F5: a non-ASCII token is no 500
    assert status_code(call({"Authorization": b"Bearer \xff\xfe"})) == (401, "invalid_api_key")
    assert status_code(call({"Authorization": "Basic a2V5LW9uZQ=="})) == (401, "missing_api_key")
    for key in KEYS:
        assert call(bearer(key)).status_code == 200


def test_admin_token_guards_prompt_changes(client):
    base = client.get("/v1/prompts", headers=bearer(KEYS[0])).json()["base"]
    data = make_prompt_bytes(base, "guarded")
    assert status_code(upload(client, "guarded", data)) == (401, "missing_admin_token")
    assert status_code(upload(client, "guarded", data, headers=bearer("wrong"))) == (403, "forbidden")
    assert status_code(upload(client, "guarded", data, headers=bearer("jeton-ç"))) == (403, "forbidden")
    assert status_code(upload(client, "guarded", data, headers=bearer(KEYS[0]))) == (403, "forbidden")
    assert client.get("/v1/prompts/guarded", headers=bearer(KEYS[0])).status_code == 404  # nothing stored
    # the token works from any client address, loopback or not
    r = upload(client, "guarded", data, headers={**bearer(ADMIN), "x-forwarded-for": "203.0.113.9"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/completions", json={"model": "guarded", "prompt": "Hi", "max_tokens": 2},
                    headers=bearer(KEYS[1]))
    assert r.status_code == 200
    assert status_code(client.delete("/v1/prompts/guarded")) == (401, "missing_admin_token")
    assert status_code(client.delete("/v1/prompts/guarded", headers=bearer(KEYS[1]))) == (403, "forbidden")
    assert client.delete("/v1/prompts/guarded", headers=bearer(ADMIN)).status_code == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"), ("GET", "/v1/files/file-x/content"),
    ("DELETE", "/v1/files/file-x"), ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x"), ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"), ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel")])
def test_admin_token_guards_files_and_fine_tuning(client, method, path):
    """Files are training data and jobs name prompts: reading needs the admin token as writing does."""
    assert status_code(client.request(method, path)) == (401, "missing_admin_token")
    assert status_code(client.request(method, path, headers=bearer(KEYS[0]))) == (403, "forbidden")
    allowed = client.request(method, path, headers=bearer(ADMIN))
    assert allowed.status_code in (200, 400, 404) and allowed.json().get("error", {}).get("code") != "forbidden"
