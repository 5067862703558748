"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (`model` names the prompt).

`stream: true` sends Server-Sent Events, one `data: {...}` chunk per update, then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.common import (
    BASE,
    admit,
    cancel_on_disconnect,
    check_tokens,
    record,
    resolve_prompt,
    run_all,
    timing_headers,
)
from app.api.deps import get_services, require_api_key
from app.api.errors import APIError
from app.api.schemas import ChatCompletionRequest, CompletionRequest, error_responses
from app.engine.sequence import Mode, Output
from app.services import Services

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504))


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _logprobs(out: Output, services: Services, chat: bool) -> dict | None:
    if not out.tokens or out.tokens[0].logprob is None:
        return None
    text = lambda i: services.tokenizer.hf.decode([i])  # noqa: E731
    if chat:
        return {"content": [{"token": text(c.token_id), "logprob": c.logprob,
                             "top_logprobs": [{"token": text(i), "logprob": lp} for i, lp in (c.top or [])]}
                            for c in out.tokens]}
    return {"tokens": [text(c.token_id) for c in out.tokens], "token_logprobs": [c.logprob for c in out.tokens],
            "top_logprobs": [{text(i): lp for i, lp in (c.top or [])} for c in out.tokens]}


def _model_cards(services: Services) -> list[dict]:
    created = int(time.time())
    cards = [{"id": BASE, "object": "model", "created": created, "owned_by": "softserve",
              "root": services.model_name, "task": "generate"}]
    for info in services.registry.list():  # (sorted by name)
        cards.append({"id": info.name, "object": "model", "created": created, "owned_by": "softserve",
                      "root": services.model_name, "parent": BASE, "task": info.task, "kind": info.kind,
                      "version": info.version})
    return cards


@router.get("/models", summary="List models: the base and every registered prompt")
async def list_models(services: Services = Depends(get_services)):
    """`base` (the bare model) and one entry per served prompt, with its task; pass an id as `model`."""
    return {"object": "list", "data": _model_cards(services)}


@router.get("/models/{model_id}", summary="One model: the base or a registered prompt")
async def get_model(model_id: str, services: Services = Depends(get_services)):
    for card in _model_cards(services):
        if card["id"] == model_id:
            return card
    raise APIError(404, f"no model named {model_id!r}; GET /v1/models lists them", "model_not_found")


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)):
    """The messages are rendered with the model's chat template; `model` is `base` or a generate prompt."""
    admit(request, body.model)
    prompt = await resolve_prompt(services, body.model)  # 404 before tokenizing
    ids = await services.encoder.chat([m.as_template_input() for m in body.messages])
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _complete(body, prompt, ids, logprobs, request, services, chat=True)


@router.post("/completions", summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request, services: Services = Depends(get_services)):
    """`prompt` is continued as raw text; `model` is `base` or a generate prompt."""
    admit(request, body.model)
    prompt = await resolve_prompt(services, body.model)
    ids = await services.encoder.encode(body.prompt, "prompt")
    return await _complete(body, prompt, ids, body.logprobs, request, services, chat=False)


async def _complete(body, prompt, ids: list[int], logprobs: int | None, request: Request, services: Services,
                    chat: bool):
    engine = services.engine
    route = "/v1/chat/completions" if chat else "/v1/completions"
    metrics = request.app.state.metrics
    seq = engine.make_sequence(prompt, ids, Mode.GENERATE, body.sampling_params(logprobs),
                               services.settings.request_timeout_s)
    check_tokens(services, [seq])
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    created = int(time.time())

    def choice(out: Output, first: bool) -> dict:
        c = {"index": 0, "finish_reason": out.finish_reason if out.finished else None,
             "logprobs": _logprobs(out, services, chat)}
        if not chat:
            c["text"] = out.text
        elif body.stream:
            c["delta"] = ({"role": "assistant"} if first else {}) | {"content": out.text}
        else:
            c["message"] = {"role": "assistant", "content": out.text}
        return c

    if not body.stream:
        [out], end = await run_all(request, services, [seq])
        record(metrics, route, seq, out, end)
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": body.model,
                             "choices": [choice(out, True)], "usage": _usage(out)},
                            headers=timing_headers([seq], [out], end))

    updates = engine.stream(seq)
    # before the 200 goes out, so an overload is still a 429; a client gone while it queues cancels it
    first = await cancel_on_disconnect(request, anext(updates))

    async def events() -> AsyncIterator[str]:
        chunk_kind = kind + (".chunk" if chat else "")
        out, is_first = first, True
        while True:
            payload = {"id": rid, "object": chunk_kind, "created": created, "model": body.model,
                       "choices": [choice(out, is_first)]}
            if out.finished:
                payload["usage"] = _usage(out)
            yield f"data: {json.dumps(payload)}\n\n"
            is_first = False
            if out.finished:
                break
            out = await anext(updates)
        record(metrics, route, seq, out, time.monotonic())
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

