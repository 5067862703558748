"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (`model` names the prompt).

`stream: true` sends Server-Sent Events, one `data: {...}` chunk per update, then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from app.api.deps import get_services, require_api_key
from app.api.errors import error_response
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.engine.sequence import Mode, Output
from app.services import Services

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

BASE = "base"


def _prompt_name(model: str, services: Services) -> str | None:
    return None if model in (BASE, services.model_name) else model


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


@router.get("/models")
async def list_models(services: Services = Depends(get_services)):
    created = int(time.time())
    models = [{"id": BASE, "object": "model", "created": created, "owned_by": "softserve",
               "root": services.model_name, "task": "generate"}]
    for name, prompt in sorted(services.engine.prompts.items()):
        models.append({"id": name, "object": "model", "created": created, "owned_by": "softserve",
                       "root": services.model_name, "parent": BASE, "task": prompt.task, "kind": prompt.kind,
                       "version": prompt.version})
    return {"object": "list", "data": models}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, services: Services = Depends(get_services)):
    ids = services.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _complete(body, ids, logprobs, services, chat=True)


@router.post("/completions")
async def completions(body: CompletionRequest, services: Services = Depends(get_services)):
    ids = services.tokenizer.encode(body.prompt)
    return await _complete(body, ids, body.logprobs, services, chat=False)


async def _complete(body, ids: list[int], logprobs: int | None, services: Services, chat: bool):
    engine = services.engine
    seq = engine.make_sequence(_prompt_name(body.model, services), ids, Mode.GENERATE,
                               body.sampling_params(logprobs), services.settings.request_timeout_s)
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
        out = await engine.run_to_end(seq)
        if out.finish_reason in ("timeout", "error"):
            return _error_for(out)
        return {"id": rid, "object": kind, "created": created, "model": body.model,
                "choices": [choice(out, True)], "usage": _usage(out)}

    updates = engine.stream(seq)
    first = await anext(updates)  # before the 200 goes out, so an overload is still a 429

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
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error_for(out: Output):
    status = 504 if out.finish_reason == "timeout" else 500
    return error_response(status, out.error or out.finish_reason, out.finish_reason)

