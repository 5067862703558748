"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (`model` names the prompt).

`stream: true` sends Server-Sent Events, one `data: {...}` chunk per update, then `data: [DONE]`. Several
prompts and `n` > 1 give several choices (`index`: prompt i's copy j is i * n + j), run as one group; as
streams, every choice is its own engine stream and their chunks interleave as they come.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.accounting import record, timing_headers, usage
from app.api.deps import get_services, require_api_key
from app.api.errors import APIError
from app.api.grammar_price import GrammarLimits, check_price
from app.api.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIRequest,
    streamed,
)
from app.api.resolution import check_inputs, check_tokens, default_max_tokens, note_prompt, resolve_prompt, text_room
from app.api.running import cancel_on_disconnect, run_all
from app.api.sampling_fields import sampling_params
from app.api.schemas import Usage, error_responses
from app.api.tools import ToolCalling, ToolCallReader, check_history, template_tools, tool_calling
from app.engine.grammar import GrammarError, GrammarMatcher
from app.engine.request import FinishReason, PromptNotFound
from app.engine.sequence import Output, Sequence
from app.services import Services
from prompt_store.format import BASE_MODEL, Task

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504),
                   default_response_class=JSONResponse)  # json.dumps's floats (1e-06), as these routes always wrote


def _logprobs(tokens, services: Services, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's logprobs of TokenChoices: chat's `content` list, or completions' parallel lists, whose
    `text_offset` counts each token's characters from `offset` (where this part of the choice's text starts,
    as vLLM counts them), and whose `top_logprobs` always include the chosen token (OpenAI's "up to
    logprobs+1 elements", vLLM's too), echoed prompt tokens included. An echoed prompt's first token has no
    log-probability (null)."""
    if not tokens or all(c.logprob is None for c in tokens):
        return None
    text = lambda i: services.tokenizer.hf.decode([i])  # noqa: E731
    if chat:
        entry = lambda i, lp: {"token": text(i), "logprob": lp, "bytes": list(text(i).encode())}  # noqa: E731
        return {"content": [entry(c.token_id, c.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in (c.top or [])]}
                            for c in tokens]}
    strings = [text(c.token_id) for c in tokens]
    offsets = list(itertools.accumulate((len(t) for t in strings[:-1]), initial=offset))
    return {"tokens": strings, "token_logprobs": [c.logprob for c in tokens], "text_offset": offsets,
            "top_logprobs": [None if c.logprob is None else {text(i): lp for i, lp in (c.top or [])} | {s: c.logprob}
                             for c, s in zip(tokens, strings)]}


def _model_cards(services: Services) -> list[ModelCard]:
    """The base model under its served id, `base` as its alias, then every prompt with the base as parent."""
    root = services.model_id
    card = dict(created=int(time.time()), owned_by="softserve", root=root, max_model_len=text_room(services, None))
    cards = [ModelCard(id=root, parent=None, task=Task.GENERATE, **card),
             ModelCard(id=BASE_MODEL, parent=None, task=Task.GENERATE, alias_of=root, **card)]
    for info in services.registry.list():  # (sorted by name)
        cards.append(ModelCard(id=info.name, parent=root, task=info.task, kind=info.kind, version=info.version,
                               **card))
    return cards


@router.get("/models", response_model=ModelList, summary="List models: the base and every registered prompt")
async def list_models(services: Services = Depends(get_services)) -> ModelList:
    """The base model (its id, and `base`) and one entry per served prompt, with its task; pass an id as
    `model` (a prompt's `name@N` pins stored version N)."""
    return ModelList(data=_model_cards(services))


@router.get("/models/{model_id}", response_model=ModelCard, summary="One model: the base or a registered prompt")
async def get_model(model_id: str, services: Services = Depends(get_services)) -> ModelCard:
    for card in _model_cards(services):
        if card.id == model_id:
            return card
    raise APIError(404, f"no model named {model_id!r}; GET /v1/models lists them", "model_not_found")


@router.post("/chat/completions", response_model=ChatCompletion, responses=streamed("chat.completion.chunk"),
             summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response,
                           services: Services = Depends(get_services)):
    """The messages are rendered with the model's chat template; `model` is `base` or a generate prompt. With
    `tools`, a named function or `required` makes the answer a tool call (app/api/tools.py)."""
    note_prompt(request, services, body.model)
    prompt = await _resolve_model(request, services, body)  # 404 before tokenizing
    _check_choices(services, 1, body.n)
    has_tools = services.tokenizer.has_tools
    calling = tool_calling(body, has_tools)
    if calling is not None:
        calling.check_prices(GrammarLimits.from_settings(services.settings))
    check_history(body.messages, has_tools)
    ids = await services.encoder.chat([m.as_template_input() for m in body.messages],
                                      tools=template_tools(body, has_tools))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _complete(body, prompt, [ids], [None], logprobs, request, response, services, chat=True,
                           calling=calling)


@router.post("/completions", response_model=Completion, responses=streamed("text_completion"),
             summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request, response: Response,
                      services: Services = Depends(get_services)):
    """Each prompt is continued as raw text (or as the token ids given); `model` is `base` or a generate
    prompt."""
    note_prompt(request, services, body.model)
    prompt = await _resolve_model(request, services, body)
    prompts = body.prompts
    _check_choices(services, len(prompts), body.n)
    vocab = services.loaded.args.vocab_size
    ids, texts = [], []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            ids.append(await services.encoder.encode(p, param))
            texts.append(p)
        else:
            if max(p) >= vocab:
                raise APIError(400, f"{param}: token id {max(p)} is not in the vocabulary (size {vocab})",
                               "invalid_token", param)
            ids.append(list(p))
            texts.append(None)
    return await _complete(body, prompt, ids, texts, body.logprobs, request, response, services, chat=False)


async def _resolve_model(request: Request, services: Services, body: OpenAIRequest):
    """The prompt `model` names (with a traffic split, the version it gives this request: sticky per `user`);
    one that is not served is OpenAI's 404 `model_not_found` (OpenAI clients look for that code), where the
    native routes say `prompt_not_found`."""
    try:
        return await resolve_prompt(request, services, body.model, user=body.user)
    except PromptNotFound as e:
        raise APIError(404, str(e), "model_not_found", "model") from None


def _check_choices(services: Services, prompts: int, n: int) -> None:
    check_inputs(services, prompts * n, f"prompts x n = {prompts * n} choices", "n")


def _check_token_fields(body: OpenAIRequest, vocab: int) -> None:
    for token in body.stop_token_ids or []:
        if token >= vocab:
            raise APIError(400, f"stop_token_ids: {token} is not in the vocabulary (size {vocab})", "invalid_token",
                           "stop_token_ids")
    for key in body.logit_bias or {}:
        if int(key) >= vocab:
            raise APIError(400, f"logit_bias: token id {key} is not in the vocabulary (size {vocab})",
                           "invalid_token", "logit_bias")


async def _compile_grammar(body: OpenAIRequest, services: Services, calling: ToolCalling | None):
    """The compiled grammar of the structured output (or tool call) asked for (None: free text): priced
    first, then compiled in the grammar pool (app/grammars.py), waited for at most SOFTSERVE_REQUEST_TIMEOUT_S."""
    asked = ([calling.grammar_request] if calling is not None else []) + body.grammar_requests
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"{asked[1][0]}: ask for one structured output at a time (also {asked[0][0]})",
                       "unsupported_field", asked[1][0])
    field, kind, source = asked[0]
    check_price(field, kind, source, GrammarLimits.from_settings(services.settings))
    timeout = services.settings.request_timeout_s
    try:
        return await asyncio.wait_for(services.grammars.compile(kind, source), timeout)
    except GrammarError as e:
        raise APIError(400, f"{field}: {e}", "invalid_grammar", field) from None
    except asyncio.TimeoutError:
        raise APIError(504, f"{field}: the grammar was not compiled within {timeout:g} s "
                            f"(SOFTSERVE_REQUEST_TIMEOUT_S)", "timeout", field) from None


async def _complete(body: OpenAIRequest, prompt, ids: list[list[int]], texts: list[str | None],
                    logprobs: int | None, request: Request, response: Response, services: Services, chat: bool,
                    calling: ToolCalling | None = None) -> ChatCompletion | Completion | StreamingResponse:
    """Run a completion request (n copies of each prompt) and answer it whole (its timing headers set on
    `response`) or as a stream; calling: the answer is a tool call."""
    _check_token_fields(body, services.loaded.args.vocab_size)
    grammar = await _compile_grammar(body, services, calling)
    seqs = _sequences(body, prompt, ids, logprobs, grammar, services)
    check_tokens(services, seqs)
    echo = getattr(body, "echo", False)
    echoed = [(text if text is not None else services.tokenizer.decode(prompt_ids)) if echo else ""
              for prompt_ids, text in zip(ids, texts)]
    shape = _ResponseShape(body, services, chat, [echoed[k // body.n] for k in range(len(seqs))], calling)
    if body.stream:
        return await _stream(shape, seqs, request, services)
    outs, end = await run_all(request, services, seqs)
    for seq, out in zip(seqs, outs):
        record(request, shape.route, seq, out, end)
    response.headers.update(timing_headers(seqs, outs, end))
    return shape.whole([shape.choices(k, out, True)[0] for k, out in enumerate(outs)],
                       usage(outs, shape.first_of_prompt(len(seqs))))


def _sequences(body: OpenAIRequest, prompt, ids: list[list[int]], logprobs: int | None, grammar,
               services: Services) -> list[Sequence]:
    """n sequences per prompt; copy j of a seeded request draws with its own seed."""
    seqs = []
    for prompt_ids in ids:
        max_tokens = body.new_tokens or default_max_tokens(services, prompt, prompt_ids, len(ids) * body.n)
        for j in range(body.n):
            params = sampling_params(body, max_tokens, logprobs, copy=j)
            seq = services.engine.make_sequence(prompt, prompt_ids, Task.GENERATE, params,
                                                services.settings.request_timeout_s)
            if grammar is not None:
                seq.grammar = GrammarMatcher(grammar, services.loaded.args.vocab_size)
            if getattr(body, "echo", False) and logprobs is not None:
                seq.prompt_logprobs = logprobs
            seqs.append(seq)
    return seqs


class _ResponseShape:
    """The JSON of one completion response: its id and object kind, and each choice as chat, tool call or
    text, whole or as stream deltas. echoed[k]: the prompt text that choice k starts with (echo), else ""."""

    def __init__(self, body: OpenAIRequest, services: Services, chat: bool, echoed: list[str],
                 calling: ToolCalling | None):
        self.body, self.services, self.chat, self.echoed = body, services, chat, echoed
        self.calls = None if calling is None else [calling.reader() for _ in echoed]  # each choice's call
        self.announced = [False] * len(echoed)  # (streams) whether choice k's call was announced
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chat and body.stream else "")
        self.created = int(time.time())
        self.text_sent = [0] * len(echoed)  # characters of each choice's text already sent (streams)

    def first_of_prompt(self, count: int) -> list[bool]:
        """Which choices count their prompt's tokens in `usage` (the first copy of each prompt)."""
        return [k % self.body.n == 0 for k in range(count)]

    def choices(self, k: int, out: Output, first: bool) -> list[dict]:
        """Choice k's part for this output: one, or for a tool call's stream two when its name is read here
        (the header, then the arguments so far). first: the choice's first (or only) part, which carries
        the echo and the assistant role."""
        tokens = (out.prompt_logprobs or []) + out.tokens if first else out.tokens
        c = {"index": k, "finish_reason": out.finish_reason if out.finished else None,
             "logprobs": _logprobs(tokens, self.services, self.chat, self.text_sent[k])}
        if self.calls is not None:
            return self._tool_call(c, self.calls[k], out, first)
        if not self.chat:
            c["text"] = (self.echoed[k] if first else "") + out.text
            self.text_sent[k] += len(c["text"])
        elif self.body.stream:
            c["delta"] = ({"role": "assistant"} if first else {}) | {"content": out.text}
        else:
            c["message"] = {"role": "assistant", "content": out.text}
        return [c]

    def _tool_call(self, c: dict, call: ToolCallReader, out: Output, first: bool) -> list[dict]:
        """As OpenAI sends a call: `content` null, the call's id, type and name with arguments "" first, then
        the arguments as they come; finish_reason `tool_calls` once the arguments are complete."""
        fragment = call.feed(out.text)
        if out.finished and out.finish_reason == FinishReason.STOP and call.complete:
            c["finish_reason"] = "tool_calls"
        header = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        if not self.body.stream:
            c["message"] = {"role": "assistant", "content": None}
            if call.name is not None:
                c["message"]["tool_calls"] = [header | {"function": {"name": call.name, "arguments": call.arguments}}]
            return [c]
        c["delta"] = {"role": "assistant", "content": None} if first else {}
        if call.name is None or self.announced[c["index"]]:
            if fragment:
                c["delta"]["tool_calls"] = [{"index": 0, "function": {"arguments": fragment}}]
            return [c]
        self.announced[c["index"]] = True
        opening = {"index": c["index"], "finish_reason": None, "logprobs": None,
                   "delta": c["delta"] | {"tool_calls": [{"index": 0} | header]}}
        c["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]} if fragment else {}
        return [opening, c]

    def payload(self, choices: list[dict], **fields) -> dict:
        """A stream's chunk with these choices; fields: more top-level keys (`usage`)."""
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.body.model,
                "choices": choices} | fields

    def whole(self, choices: list[dict], usage: Usage) -> ChatCompletion | Completion:
        """The response of a request that does not stream."""
        response = ChatCompletion if self.chat else Completion
        return response(id=self.id, created=self.created, model=self.body.model, choices=choices, usage=usage)


async def _stream(shape: _ResponseShape, seqs: list[Sequence], request: Request, services: Services):
    streams = [services.engine.stream(seq) for seq in seqs]
    # before the 200 goes out, so an overload is still a 429; a client gone while it queues cancels it
    firsts = await _first_outputs(request, streams)
    options = shape.body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats
    # with include_usage, OpenAI's chunks all carry `usage`: null until the last one, which has the counts
    chunk_usage = include_usage or continuous

    async def events() -> AsyncIterator[str]:
        last: list[Output] = list(firsts)
        started = [False] * len(seqs)
        async for k, out in _merged(streams, firsts):
            last[k] = out
            fields = {"usage": usage([out], [True]).model_dump() if continuous else None} if chunk_usage else {}
            for choice in shape.choices(k, out, not started[k]):
                yield f"data: {json.dumps(shape.payload([choice], **fields))}\n\n"
            started[k] = True
            if out.finished:
                record(request, shape.route, seqs[k], out, time.monotonic())
        if include_usage:
            total = usage(last, shape.first_of_prompt(len(seqs))).model_dump()
            yield f"data: {json.dumps(shape.payload([], usage=total))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _first_outputs(request: Request, streams: list) -> list[Output]:
    """Every stream's first output (each submits its sequence); if one is refused (overloaded, shutting
    down), the others are closed, which cancels them, and the refusal is raised."""
    firsts = await cancel_on_disconnect(request, asyncio.gather(*(anext(s) for s in streams), return_exceptions=True))
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for stream in streams:
            await stream.aclose()
        raise errors[0]
    return firsts


async def _merged(streams: list, firsts: list[Output]) -> AsyncIterator[tuple[int, Output]]:
    """(stream index, output) from every stream as they come, each stream's first output first; leaving
    early (client gone) cancels the streams still running, which cancels their requests."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream, out: Output) -> None:
        try:
            await queue.put((k, out))
            while not out.finished:
                out = await anext(stream)
                await queue.put((k, out))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((k, e))

    tasks = [asyncio.ensure_future(pump(k, s, first)) for k, (s, first) in enumerate(zip(streams, firsts))]
    try:
        remaining = len(streams)
        while remaining:
            k, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            remaining -= out.finished
            yield k, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
