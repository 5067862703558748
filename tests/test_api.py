"""Every HTTP endpoint against one live server: success paths, error paths (status and body), and that the
server keeps serving after each bad request."""
from __future__ import annotations

import io
import json
import math
from urllib.parse import quote

import httpx
import pytest
import torch

from app.api.tasks import merge_entities
from prompt_store.format import load_prompt_bytes
from prompt_store.registry import LOCK_FILE
from tests.live_server import make_prompt_bytes, sse_events, upload

MAX_SEQ_LEN = 1024
SERVER_SETTINGS = {"SOFTSERVE_MAX_UPLOAD_MB": "1", "SOFTSERVE_MAX_REQUEST_MB": "0.5", "SOFTSERVE_MAX_INPUTS_PER_REQUEST": "4",
            "SOFTSERVE_MAX_TOKENS_PER_REQUEST": "600", "SOFTSERVE_MAX_SEQ_LEN": str(MAX_SEQ_LEN)}
TAG_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
CLASS_LABELS = ["ham", "spam", "other"]


@pytest.fixture(scope="module")
def prompts(client, base):
    """A generate, a tag and a classify prompt, uploaded once for the module."""
    made = {"gen": make_prompt_bytes(base, "gen", "generate", seed=1),
            "ner": make_prompt_bytes(base, "ner", "tag", labels=TAG_LABELS, seed=2),
            "cls": make_prompt_bytes(base, "cls", "classify", kind="prefix", labels=CLASS_LABELS, seed=3)}
    for name, data in made.items():
        r = upload(client, name, data)
        assert r.status_code == 201, r.text
    return made


def error_of(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code, body
    assert body["error"]["param"] == param, body
    return body["error"]["message"]


def still_serving(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def complete(client, prompt: str, model: str = "base", max_tokens: int = 8, **kw) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


# ---- ops -------------------------------------------------------------------------------------------

def test_health_and_request_ids(client):
    r = client.get("/health", headers={"x-request-id": "abc-123"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == "SmolLM2-135M-Instruct"
    assert (r.json()["running"], r.json()["waiting"]) == (0, 0)
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/health", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert len(generated) == 32 and " " not in generated


def test_docs_and_openapi_describe_every_endpoint(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/generate", "/v1/tag", "/v1/classify",
                 "/v1/prompts", "/v1/prompts/{name}", "/v1/prompts/{name}/file", "/health", "/metrics"]:
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/prompts/{name}"]["put"]["requestBody"]["content"]
    schemas = spec["components"]["schemas"]
    assert schemas["TaggedToken"]["properties"]["start"]["description"]
    assert schemas["GenerateRequest"]["properties"]["inputs"]["description"]
    assert "ErrorResponse" in schemas


def test_openapi_tells_the_truth_and_docs_work_offline(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:  # every error has the one documented shape
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), \
                        (path, method, status)
            admin = method in ("put", "delete") or path.startswith(("/v1/files", "/v1/fine_tuning"))
            expected = (None if path in ("/health", "/metrics") else
                        [{"adminToken": []}] if admin else [{"apiKey": []}])
            assert op.get("security") == expected, (path, method)
    assert set(spec["components"]["securitySchemes"]) == {"apiKey", "adminToken"}
    for path, chunk in (("/v1/chat/completions", "ChatCompletion"), ("/v1/completions", "Completion")):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"]["$ref"].endswith("/" + chunk)
        assert "text/event-stream" in content
    html = client.get("/docs").text
    assert "cdn" not in html and "/docs/assets/swagger-ui-bundle.js" in html
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and b"SwaggerUIBundle" in bundle.content
    html = client.get("/redoc").text
    assert "cdn" not in html and "fonts.googleapis" not in html and "/docs/assets/redoc.standalone.js" in html
    bundle = client.get("/docs/assets/redoc.standalone.js")
    assert bundle.status_code == 200 and b"Redoc" in bundle.content
    assert client.get("/docs/assets/secret.txt").status_code == 404


# ---- OpenAI routes ---------------------------------------------------------------------------------

def test_models_list_base_and_prompts(client, prompts):
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["base"]["task"] == "generate"
    assert (by_id["gen"]["task"], by_id["ner"]["task"], by_id["cls"]["task"]) == ("generate", "tag", "classify")


def test_completion_usage_and_timing_headers(client):
    prompt = "The capital of France is"
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert int(r.headers["x-generated-tokens"]) == usage["completion_tokens"]
    assert int(r.headers["x-prompt-tokens"]) == usage["prompt_tokens"]
    # whole milliseconds, each rounded on its own: total = queue + inference to within the rounding
    total, queue, inference = (int(r.headers[h]) for h in ("x-total-time", "x-queue-time", "x-inference-time"))
    assert abs(total - (queue + inference)) <= 1, (total, queue, inference)
    assert inference > 0  # five decode steps and a prefill take more than half a millisecond
    per_token = int(r.headers["x-time-per-token"])
    assert abs(per_token * 5 - inference) <= 5 / 2 + 1 / 2, (per_token, inference)


def test_chat_completion_with_text_parts(client):
    plain = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hi"}],
                                                      "max_tokens": 6, "temperature": 0}).json()
    parts = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}],
        "max_tokens": 6, "temperature": 0}).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    assert plain["choices"][0]["message"]["content"] == parts["choices"][0]["message"]["content"]


def test_streaming_equals_non_streaming(client, prompts):
    for model in ("base", "gen"):
        whole = complete(client, "Once upon a time", model, max_tokens=12)
        with client.stream("POST", "/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                            "max_tokens": 12, "temperature": 0, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
        assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])  # OpenAI's: null on every chunk but the last


def test_chat_streaming(client):
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Count to three"}], "max_tokens": 8, "temperature": 0,
            "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" not in c for c in chunks)  # usage not asked for (stream_options.include_usage)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    whole = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Count to three"}], "max_tokens": 8, "temperature": 0}).json()
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert whole["choices"][0]["finish_reason"] == ("length" if whole["usage"]["completion_tokens"] == 8 else "stop")


# ---- task routes -----------------------------------------------------------------------------------

def test_generate_batch_matches_single_requests(client, prompts):
    inputs = ["Hello, my name is", "The sky is", "1, 2, 3,"]
    r = client.post("/v1/generate", json={"prompt": "gen", "inputs": inputs, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == [0, 1, 2]
    for text, result in zip(inputs, body["results"]):
        single = complete(client, text, "gen", max_tokens=6)
        assert result["text"] == single["choices"][0]["text"]
        assert result["completion_tokens"] == single["usage"]["completion_tokens"]
        assert result["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == sum(x["completion_tokens"] for x in body["results"])
    assert int(r.headers["x-generated-tokens"]) == body["usage"]["completion_tokens"]
    one = client.post("/v1/generate", json={"inputs": "Hi", "max_tokens": 2, "chat": True}).json()
    assert one["prompt"] == "base" and len(one["results"]) == 1


def test_tag_tokens_offsets_and_entities(client, prompts):
    text = "Ada Lovelace lived in London."
    r = client.post("/v1/tag", json={"prompt": "ner", "inputs": [text, "Hi"], "return_probs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == TAG_LABELS and len(body["results"]) == 2
    tokens = body["results"][0]["tokens"]
    assert "".join(t["text"] for t in tokens) == text  # offsets cover the text (byte-level BPE)
    for t in tokens:
        assert text[t["start"]:t["end"]] == t["text"]
        assert t["label"] in TAG_LABELS
        assert math.isclose(sum(t["probs"].values()), 1, abs_tol=1e-4)
        assert t["score"] == max(t["probs"].values()) and t["probs"][t["label"]] == t["score"]
    assert body["results"][0]["entities"] == merge_entities(text, tokens)
    assert body["usage"]["prompt_tokens"] == len(tokens) + len(body["results"][1]["tokens"])


def test_merge_entities_bio():
    text = "Ada Lovelace met Bob in Paris"
    spans = [(0, 3, "B-PER", 0.9), (3, 12, "I-PER", 0.7), (12, 16, "O", 0.8), (16, 20, "B-PER", 0.6),
             (20, 23, "O", 0.9), (23, 29, "I-LOC", 0.5)]
    tokens = [{"text": text[s:e], "start": s, "end": e, "label": lab, "score": p} for s, e, lab, p in spans]
    assert merge_entities(text, tokens) == [
        {"text": "Ada Lovelace", "label": "PER", "start": 0, "end": 12, "score": pytest.approx(0.8)},
        {"text": "Bob", "label": "PER", "start": 17, "end": 20, "score": 0.6},
        {"text": "Paris", "label": "LOC", "start": 24, "end": 29, "score": 0.5},  # IOB1: I- may start one
    ]
    tokens[1]["label"] = "B-PER"  # B always starts a new entity
    assert [e["text"] for e in merge_entities(text, tokens)][:2] == ["Ada", "Lovelace"]
    tokens[1]["label"] = "I-LOC"  # another type never continues
    assert [e["label"] for e in merge_entities(text, tokens)][:2] == ["PER", "LOC"]


def test_classify(client, prompts):
    r = client.post("/v1/classify", json={"prompt": "cls", "inputs": ["Win a free cruise now!", "See you at noon"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == CLASS_LABELS
    for result in body["results"]:
        probs = result["probs"]
        assert list(probs) == CLASS_LABELS and math.isclose(sum(probs.values()), 1, abs_tol=1e-4)
        assert result["label"] == max(probs, key=probs.get) and result["score"] == probs[result["label"]]
    single = client.post("/v1/classify", json={"prompt": "cls", "inputs": "See you at noon"}).json()
    assert single["results"][0]["probs"] == pytest.approx(body["results"][1]["probs"], abs=1e-5)


@pytest.mark.parametrize("route,prompt,actual", [
    ("/v1/tag", "cls", "classify"), ("/v1/classify", "ner", "tag"), ("/v1/tag", "gen", "generate"),
    ("/v1/classify", "gen", "generate"), ("/v1/generate", "ner", "tag"), ("/v1/completions", "cls", "classify"),
    ("/v1/chat/completions", "ner", "tag"), ("/v1/tag", "base", None)])
def test_wrong_task_type_is_422_naming_the_type(client, prompts, route, prompt, actual):
    body = {"prompt": prompt, "inputs": "hello"}
    if route == "/v1/completions":
        body = {"model": prompt, "prompt": "hello"}
    elif route == "/v1/chat/completions":
        body = {"model": prompt, "messages": [{"role": "user", "content": "hi"}]}
    message = error_of(client.post(route, json=body), 422, "wrong_task_type")
    if actual:
        assert repr(actual) in message


# ---- error paths of the inference routes ----------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = [  # (route, body, status, code, param)
    ("/v1/completions", b'{"prompt": "Hello"', 400, "invalid_json", None),
    ("/v1/chat/completions", b"not json at all", 400, "invalid_json", None),
    ("/v1/completions", [1, 2], 400, "validation_error", None),
    ("/v1/chat/completions", {"messages": []}, 400, "validation_error", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "validation_error",
     "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "validation_error", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -5}, 400, "validation_error", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ_LEN + 1}, 400, "invalid_request", None),
    ("/v1/completions", {"prompt": "x " * 1200, "max_tokens": 1}, 400, "invalid_request", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 700}, 400, "too_many_tokens", None),
    ("/v1/completions", {"prompt": ""}, 400, "validation_error", "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "validation_error", "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "validation_error", "n"),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400, "too_many_inputs", "n"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "validation_error", "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -2**63 - 1}, 400, "validation_error", "seed"),
    ("/v1/generate", {"inputs": "x", "seed": 10**30}, 400, "validation_error", "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**200}, 400, "validation_error", "seed"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "validation_error", "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**40}, 400, "validation_error", "top_k"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "validation_error", "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, 400, "validation_error", "stop"),
    ("/v1/completions", {"model": "no-such-prompt", "prompt": "x"}, 404, "model_not_found", "model"),
    ("/v1/completions", {"model": "gen@7", "prompt": "x"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {**CHAT, "model": "../../etc/passwd"}, 404, "model_not_found", "model"),
    ("/v1/generate", {"prompt": "nope", "inputs": "x"}, 404, "prompt_not_found", None),
    ("/v1/tag", {"prompt": "nope", "inputs": "x"}, 404, "prompt_not_found", None),
    ("/v1/classify", {"prompt": "nope", "inputs": ["x"]}, 404, "prompt_not_found", None),
    ("/v1/classify", {"prompt": "cls", "inputs": ["a", "b", "c", "d", "e"]}, 400, "too_many_inputs", "inputs"),
    ("/v1/generate", {"inputs": ["a", "b", "c", "d"], "max_tokens": 200}, 400, "too_many_tokens", None),
    ("/v1/tag", {"prompt": "ner", "inputs": []}, 400, "validation_error", "inputs"),
    ("/v1/tag", {"prompt": "ner", "inputs": [""]}, 400, "validation_error", "inputs.0"),
    ("/v1/tag", {"prompt": "ner"}, 400, "validation_error", "inputs"),
    ("/v1/classify", {"prompt": "cls", "inputs": [1]}, 400, "validation_error", "inputs.0"),
    # a field the route does not take is refused, never ignored (tag and classify sample nothing)
    ("/v1/tag", {"prompt": "ner", "inputs": "x", "temperature": 0.5}, 400, "unknown_field", "temperature"),
    ("/v1/classify", {"prompt": "cls", "inputs": "x", "max_tokens": 3}, 400, "unknown_field", "max_tokens"),
    ("/v1/generate", {"inputs": "x", "n": 2}, 400, "unknown_field", "n"),
]


@pytest.mark.parametrize("route,body,status,code,param", BAD_REQUESTS)
def test_bad_requests(client, prompts, route, body, status, code, param):
    if isinstance(body, bytes):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(route, json=body)
    assert error_of(r, status, code, param)
    still_serving(client)


def test_unknown_route_and_method(client):
    error_of(client.get("/v1/nothing"), 404, "not_found")
    error_of(client.get("/v1/completions"), 405, "method_not_allowed")


# ---- prompt management -----------------------------------------------------------------------------

def test_upload_versions_download_delete(client, base):
    first = make_prompt_bytes(base, "whatever-name-in-file", seed=10)
    r = upload(client, "versioned", first)
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["name"], info["version"], info["task"], info["serving"]) == ("versioned", 1, "generate", True)
    complete(client, "Hello", "versioned")  # serves as soon as the upload returned
    second = make_prompt_bytes(base, "versioned", seed=11)
    r = upload(client, "versioned", second, data={"description": "second try"})
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["description"] == "second try"
    shown = client.get("/v1/prompts/versioned").json()
    assert shown["versions"] == [1, 2] and [h["version"] for h in shown["history"]] == [1, 2]
    assert any(p["name"] == "versioned" for p in client.get("/v1/prompts").json()["data"])

    v1 = client.get("/v1/prompts/versioned/file", params={"version": 1})
    assert v1.status_code == 200 and v1.headers["content-type"] == "application/octet-stream"
    pf = load_prompt_bytes(v1.content)
    assert (pf.name, pf.version) == ("versioned", 1)
    assert torch.equal(pf.prompt_embeddings, load_prompt_bytes(first).prompt_embeddings)
    assert load_prompt_bytes(client.get("/v1/prompts/versioned/file").content).version == 2
    error_of(client.get("/v1/prompts/versioned/file", params={"version": 7}), 404, "prompt_not_found")
    error_of(client.get("/v1/prompts/versioned/file", params={"version": 0}), 400, "validation_error", "version")

    r = client.delete("/v1/prompts/versioned")
    assert r.status_code == 200 and r.json() == {"id": "versioned", "object": "prompt", "deleted": True}
    error_of(client.get("/v1/prompts/versioned"), 404, "prompt_not_found")
    error_of(client.post("/v1/completions", json={"model": "versioned", "prompt": "x"}), 404, "model_not_found", "model")
    error_of(client.delete("/v1/prompts/versioned"), 404, "prompt_not_found")


def test_octet_stream_upload(client, base):
    r = client.put("/v1/prompts/raw-upload", content=make_prompt_bytes(base, "x", seed=5),
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert client.delete("/v1/prompts/raw-upload").status_code == 200


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(2, 2)}, buf)
    return buf.getvalue()


def test_bad_uploads_refused_and_store_unchanged(client, base, server, prompts):
    good = make_prompt_bytes(base, "x", seed=4)
    other_base = dict(base, fingerprint="0000000000000000")
    cases = [
        ({"files": {"file": ("p.pt", _pickle_bytes())}}, 422, "pickle"),
        ({"files": {"file": ("p.safetensors", good[: len(good) // 2])}}, 422, "safetensors"),
        ({"files": {"file": ("p.safetensors", b"\x00" * 100)}}, 422, None),
        ({"files": {"file": ("p.safetensors", make_prompt_bytes(other_base, "x"))}}, 422, "another base"),
        ({"files": {"file": ("p.safetensors", make_prompt_bytes(base, "x", "classify", labels=["yes", "yes"]))}},
         422, "unique"),
        ({"files": {"file": ("p.safetensors", good), "adapter_config": ("c.json", b"{}")}}, 422, "either"),
        ({"files": {"file": ("p.safetensors", good)}, "data": {"labels": "a,b"}}, 422, "labels"),
        ({"files": {"other": ("p.safetensors", good)}}, 422, "unknown form field"),
        ({"data": {"description": "no file"}}, 422, "needs a 'file'"),
        ({"data": {"file": "not a file part"}}, 422, "file part"),
        ({"files": {"adapter_config": ("c.json", b"{not json"), "adapter_model": ("m.safetensors", good)}}, 422, "JSON"),
        ({"files": {"adapter_config": ("c.json", b'{"peft_type": "LORA", "task_type": "CAUSAL_LM"}'),
                    "adapter_model": ("m.safetensors", good)}}, 422, "LORA"),
        ({"json": {"file": "x"}}, 400, "multipart"),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400, None),
    ]
    before = sorted(p.relative_to(server.store) for p in server.store.rglob("*"))
    for kwargs, status, words in cases:
        message = error_of(client.put("/v1/prompts/refused", **kwargs), status)
        if words:
            assert words.lower() in message.lower(), (kwargs.keys(), message)
    assert sorted(p.relative_to(server.store) for p in server.store.rglob("*")) == before
    error_of(client.get("/v1/prompts/refused"), 404)
    still_serving(client)


@pytest.mark.parametrize("name", [".hidden", "base", "a" * 65, "-dash", "semi;colon", "sp ace", "ü", "evil\n",
                                  "evil\r", "tab\there", "nul\x00", "del\x7f"])
def test_hostile_prompt_names_refused(client, base, server, name):
    """F8: every such name reaches the route and is a 422 naming the problem; nothing is written."""
    message = error_of(upload(client, quote(name, safe=""), make_prompt_bytes(base, "x")), 422, "invalid_name")
    assert f"prompt name {name!r}" in message
    for path in server.store.parent.rglob("*"):
        assert path.is_relative_to(server.store) or path.name.startswith("server-") or path == server.store
    assert not any(p.name.startswith(".") and p.name != LOCK_FILE or p.name in ("base",) or "\n" in p.name
                   for p in server.store.iterdir())


def test_empty_names_are_json_errors_not_redirects(client, base):
    r = upload(client, "", make_prompt_bytes(base, "x"))  # PUT /v1/prompts/
    error_of(r, 404, "not_found")
    error_of(client.get("/v1/prompts//file"), 404, "not_found")
    error_of(client.delete("/v1/prompts/"), 404, "not_found")
    error_of(client.get("/v1/models/"), 404, "not_found")


def test_path_traversal_names_never_touch_the_disk(client, base, server):
    # an encoded slash splits the path (no route has a two-part name): 404; ".." is a name, refused
    for raw in ["/v1/prompts/..%2F..%2Fescape", "/v1/prompts/a%2Fb"]:
        error_of(client.put(raw, files={"file": ("p", make_prompt_bytes(base, "x"))}), 404, "not_found")
        error_of(client.delete(raw), 404, "not_found")
        error_of(client.get(raw + "/file"), 404, "not_found")
    error_of(client.put("/v1/prompts/%2E%2E", files={"file": ("p", make_prompt_bytes(base, "x"))}), 422,
             "invalid_name")
    error_of(client.delete("/v1/prompts/%2E%2E"), 404, "prompt_not_found")
    error_of(client.get("/v1/prompts/%2E%2E/file"), 404, "prompt_not_found")
    assert not (server.store.parent / "escape").exists()
    still_serving(client)


def test_oversize_upload_is_413(client, base):
    limit = 1 << 20
    big = b"\x00" * (limit + 1)
    error_of(client.put("/v1/prompts/big", files={"file": ("p.safetensors", big)}), 413, "payload_too_large")

    def chunks():  # no Content-Length: the server counts while reading
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="p.safetensors"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(11):
            yield b"\x00" * (100 << 10)

    r = client.put("/v1/prompts/big", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    error_of(r, 413, "payload_too_large")
    # inference bodies have their own, smaller limit (0.5 MB here); an upload of that size is fine
    message = error_of(client.post("/v1/completions", content=b"{" + b" " * (limit // 2 + 10) + b"}",
                                   headers={"content-type": "application/json"}), 413, "payload_too_large")
    assert "SOFTSERVE_MAX_REQUEST_MB" in message
    error_of(client.put("/v1/prompts/big", files={"file": ("p.safetensors", b"\x00" * (limit * 3 // 4))}), 422,
             "invalid_prompt")
    error_of(client.get("/v1/prompts/big"), 404)
    still_serving(client)


def test_prompt_changes_only_from_loopback_without_admin_token(client, base):
    remote = {"x-forwarded-for": "203.0.113.7"}  # uvicorn trusts this header from 127.0.0.1
    error_of(upload(client, "remote", make_prompt_bytes(base, "x"), headers=remote), 403, "admin_only")
    error_of(client.delete("/v1/prompts/gen", headers=remote), 403, "admin_only")
    assert client.get("/v1/prompts", headers=remote).status_code == 200
    assert client.get("/v1/prompts/gen").status_code == 200


# ---- metrics ---------------------------------------------------------------------------------------

def metric_samples(client: httpx.Client) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
            if line and not line.startswith("#")}


def test_metrics(client, prompts, server, base):
    before = metric_samples(client)
    r = client.post("/v1/completions", json={"model": "gen", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
                    headers={"x-request-id": "metrics-probe"})
    assert r.status_code == 200
    client.post("/v1/classify", json={"prompt": "cls", "inputs": "x"})
    text = client.get("/metrics").text
    assert 'softserve_requests_total{prompt="gen",route="/v1/completions",status="200"}' in text
    assert 'softserve_requests_total{prompt="cls",route="/v1/classify",status="200"}' in text
    assert 'route="/v1/prompts/{name}"' in text  # templates, not raw paths
    for name in ["softserve_queue_depth", "softserve_running_requests", "softserve_batch_tokens",
                 "softserve_kv_blocks_used", "softserve_kv_blocks_total", "softserve_kv_usage_ratio",
                 "softserve_prefix_cache_queries_total", "softserve_prefix_cache_hits_total",
                 "softserve_preemptions_total",
                 "softserve_time_to_first_token_seconds_bucket", "softserve_request_duration_seconds_bucket",
                 "softserve_queue_time_seconds_bucket", 'softserve_prompt_tokens_total{prompt="gen"',
                 'softserve_generated_tokens_total{prompt="gen"', "softserve_ready 1.0"]:
        assert name in text, name
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    # SOFTSERVE_KV_CACHE_GB=0.5 (LiveServer) in blocks of 16 positions of k and v for every layer, less the scratch block
    itemsize = 4 if client.get("/health").json()["device"] == "cpu" else 2  # dtype auto: float32 on CPU, else bfloat16
    block_bytes = 2 * base["num_layers"] * base["num_kv_heads"] * base["head_dim"] * itemsize * 16
    assert samples["softserve_kv_blocks_total"] == (1 << 29) // block_bytes - 1
    assert samples["softserve_kv_block_size"] == 16
    assert samples["softserve_kv_blocks_used"] == 0  # nothing runs: every block is free or cached
    assert samples["softserve_running_requests"] == 0 and samples["softserve_queue_depth"] == 0
    grew = lambda key: samples[key] - before.get(key, 0)  # noqa: E731  (the module's server served earlier tests)
    assert grew('softserve_requests_total{prompt="gen",route="/v1/completions",status="200"}') == 1
    assert grew('softserve_requests_total{prompt="cls",route="/v1/classify",status="200"}') == 1
    assert grew('softserve_time_to_first_token_seconds_count{prompt="gen"}') == 1
    assert grew('softserve_generated_tokens_total{prompt="gen",route="/v1/completions"}') == 3
    assert grew('softserve_prompt_tokens_total{prompt="gen",route="/v1/completions"}') == r.json()["usage"]["prompt_tokens"]
    assert grew('softserve_time_per_output_token_seconds_count{prompt="gen"}') == 1
    assert grew('softserve_e2e_request_latency_seconds_count{prompt="gen"}') == 1
    usage = r.json()["usage"]  # the access log line carries the request's tokens
    line = next(line for line in server.output().splitlines() if "request_id=metrics-probe" in line)
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens=3" in line


# vLLM's histogram buckets (vllm/v1/metrics/buckets.py), which dashboards written for vLLM read
VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0],
    "vllm:inter_token_latency_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0],
    "vllm:e2e_request_latency_seconds": [0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                         40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0],
}
VLLM_BUCKETS["vllm:request_time_per_output_token_seconds"] = VLLM_BUCKETS["vllm:inter_token_latency_seconds"]
for _name in ("vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds"):
    VLLM_BUCKETS[_name] = VLLM_BUCKETS["vllm:e2e_request_latency_seconds"]


def scrape(client: httpx.Client) -> tuple[dict[str, str], dict[tuple, float]]:
    """/metrics through prometheus_client's parser: ({family: type}, {(sample, labels...): value})."""
    from prometheus_client.parser import text_string_to_metric_families

    types, samples = {}, {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return types, samples


def test_vllm_metric_names(client, prompts):
    """vLLM's names, types, labels and buckets, beside softserve's own, moving with a request by exactly what
    the response says (tokens) or what softserve's own series say (the same quantities)."""
    model = client.get("/v1/models").json()["data"][0]["id"]  # the served base model's id
    labels = (("engine", "0"), ("model_name", model))
    _, before = scrape(client)
    usage = complete(client, "Hello there", "gen", max_tokens=3, ignore_eos=True)["usage"]
    types, after = scrape(client)
    grew = lambda name: after[(name, *labels)] - before.get((name, *labels), 0)  # noqa: E731

    for name, kind in {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                       "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter",
                       "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
                       "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
                       **{name: "histogram" for name in VLLM_BUCKETS}}.items():
        assert types.get(name) == kind, name
    for name, buckets in VLLM_BUCKETS.items():
        bounds = sorted(float(dict(key[1:])["le"]) for key in after if key[0] == name + "_bucket")
        assert bounds == buckets + [math.inf], name
    assert after[("vllm:num_requests_running", *labels)] == after[("vllm:num_requests_waiting", *labels)] == 0
    assert after[("vllm:kv_cache_usage_perc", *labels)] == after[("softserve_kv_usage_ratio",)] == 0
    for vllm, own in [("vllm:num_preemptions_total", "softserve_preemptions_total"),
                      ("vllm:prefix_cache_queries_total", "softserve_prefix_cache_queries_total"),
                      ("vllm:prefix_cache_hits_total", "softserve_prefix_cache_hits_total"),
                      ("vllm:generation_tokens_total", "softserve_engine_generation_tokens_total")]:
        assert after[(vllm, *labels)] == after[(own,)], vllm
    assert grew("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("vllm:generation_tokens_total") == usage["completion_tokens"] == 3
    for name in ("vllm:time_to_first_token_seconds", "vllm:request_time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_inference_time_seconds"):
        assert grew(name + "_count") == 1, name
    assert grew("vllm:inter_token_latency_seconds_count") == 2  # 3 tokens, 2 gaps between them
    tpot = grew("vllm:request_time_per_output_token_seconds_sum")
    assert grew("vllm:inter_token_latency_seconds_sum") == pytest.approx(2 * tpot)
    ttft = grew("vllm:time_to_first_token_seconds_sum")
    assert grew("vllm:e2e_request_latency_seconds_sum") == pytest.approx(ttft + 2 * tpot)

    with client.stream("POST", "/v1/completions", json={"model": "gen", "prompt": "Once upon a time",
                                                        "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())  # generating: the request runs and holds KV blocks
        _, running = scrape(client)
    assert running[("vllm:num_requests_running", *labels)] == 1
    assert running[("vllm:kv_cache_usage_perc", *labels)] == running[("softserve_kv_usage_ratio",)] > 0


def test_grafana_dashboard_charts_served_metrics(client, prompts):
    """Every series deploy/grafana/softserve.json queries is one the server exports."""
    from pathlib import Path
    import re

    complete(client, "Hello", "gen", max_tokens=3, ignore_eos=True)  # labelled series appear once observed
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/softserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {name for expr in exprs for name in re.findall(r"softserve_\w+", expr)}
    exported = {line.split("{")[0].split(" ")[0] for line in client.get("/metrics").text.splitlines()
                if line and not line.startswith("#")}
    assert names and names <= exported, names - exported
