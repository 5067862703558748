"""Batched task routes: /v1/generate, /v1/tag (NER), /v1/classify.

Every input of a request becomes one engine sequence, all submitted at once, so they share forward passes
(with whatever other requests are running). A prompt of another task type is a 422 that names its type.
"""
from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.api.accounting import record, record_label, timing_headers, usage
from app.api.deps import get_services, require_api_key
from app.api.resolution import check_inputs, check_tokens, note_prompt, resolve_prompt
from app.api.running import run_all
from app.api.sampling_fields import sampling_params
from app.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    TagRequest,
    TagResponse,
    TagResult,
    error_responses,
)
from app.services import Services
from prompt_store.format import Task

router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(400, 401, 404, 413, 422, 429, 503, 504),
                   default_response_class=JSONResponse)  # json.dumps's floats (1e-06), as these routes always wrote


async def _run(request: Request, response: Response, services: Services, route: str, seqs):
    """The outputs of the request's sequences, each recorded, and its timing headers set on `response`."""
    check_tokens(services, seqs)
    outs, end = await run_all(request, services, seqs)
    for seq, out in zip(seqs, outs):
        record(request, route, seq, out, end)
    response.headers.update(timing_headers(seqs, outs, end))
    return outs


async def _resolve(request: Request, services: Services, body):
    """(inputs, prompt): the prompt is resolved once, so every input of the request (and the labels in
    the answer) uses the same version even if an upload lands meanwhile, or a traffic split is changed;
    404 before any tokenizing."""
    note_prompt(request, services, body.prompt)
    inputs = body.input_list
    check_inputs(services, len(inputs), f"{len(inputs)} inputs", "inputs")
    return inputs, await resolve_prompt(request, services, body.prompt, "prompt", body.user)


@router.post("/generate", response_model=GenerateResponse, summary="Generate text for one or many inputs")
async def generate(body: GenerateRequest, request: Request, response: Response,
                   services: Services = Depends(get_services)) -> GenerateResponse:
    """Continue each input with the named generate prompt (or `base`). Inputs are raw text, or, with
    `chat: true`, one user message each rendered with the chat template."""
    inputs, prompt = await _resolve(request, services, body)
    encoder = services.encoder
    ids = [await encoder.chat([{"role": "user", "content": text}], f"inputs.{i}") if body.chat
           else await encoder.encode(text, f"inputs.{i}") for i, text in enumerate(inputs)]
    params = sampling_params(body, body.max_tokens)
    seqs = [services.engine.make_sequence(prompt, i, Task.GENERATE, params, services.settings.request_timeout_s)
            for i in ids]
    outs = await _run(request, response, services, "/v1/generate", seqs)
    results = [GenerateResult(index=i, text=o.text, finish_reason=o.finish_reason, prompt_tokens=o.prompt_tokens,
                              completion_tokens=o.completion_tokens) for i, o in enumerate(outs)]
    return GenerateResponse(prompt=body.prompt, results=results, usage=usage(outs))


@router.post("/tag", response_model=TagResponse, summary="Tag tokens (NER) and merge them into entities")
async def tag(body: TagRequest, request: Request, response: Response,
              services: Services = Depends(get_services)) -> TagResponse:
    """Per input: every token with its character offsets, label and score, and the entities merged from
    BIO/IOB tags (`B-X` starts an entity, `I-X` continues one of type X, `O` is outside; a tag without a
    prefix counts as `I-`). An entity's score is the mean of its tokens' scores."""
    inputs, prompt = await _resolve(request, services, body)
    encoded = [await services.encoder.encode_with_offsets(text, f"inputs.{i}") for i, text in enumerate(inputs)]
    seqs = [services.engine.make_sequence(prompt, ids, Task.TAG, timeout_s=services.settings.request_timeout_s)
            for ids, _ in encoded]
    labels = prompt.labels
    outs = await _run(request, response, services, "/v1/tag", seqs)
    results = []
    for i, (text, (_, offsets), out) in enumerate(zip(inputs, encoded, outs)):
        tokens = tagged_tokens(text, offsets, out.probs.float().cpu(), labels, body.return_probs)
        results.append(TagResult(index=i, tokens=tokens, entities=merge_entities(text, tokens)))
    return TagResponse(prompt=body.prompt, labels=labels, results=results, usage=usage(outs))


@router.post("/classify", response_model=ClassifyResponse, summary="Classify texts")
async def classify(body: ClassifyRequest, request: Request, response: Response,
                   services: Services = Depends(get_services)) -> ClassifyResponse:
    """Per input: the most probable label, its probability, and every label's probability."""
    inputs, prompt = await _resolve(request, services, body)
    ids = [await services.encoder.encode(text, f"inputs.{i}") for i, text in enumerate(inputs)]
    seqs = [services.engine.make_sequence(prompt, i, Task.CLASSIFY,
                                          timeout_s=services.settings.request_timeout_s)
            for i in ids]
    labels = prompt.labels
    outs = await _run(request, response, services, "/v1/classify", seqs)
    results = []
    for i, out in enumerate(outs):
        probs = out.probs.float().cpu().tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        results.append(ClassifyResult(index=i, label=labels[best], score=probs[best], probs=dict(zip(labels, probs))))
        record_label(request, prompt, labels[best])
    return ClassifyResponse(prompt=body.prompt, labels=labels, results=results, usage=usage(outs))


def tagged_tokens(text: str, offsets, probs, labels: list[str], with_probs: bool) -> list[dict]:
    """probs (text tokens, labels): row i belongs to the token at offsets[i]. (As dicts, which merge_entities
    reads; TagResult takes them as its TaggedTokens.)"""
    scores, best = probs.max(-1)
    tokens = []
    for i, (start, end) in enumerate(offsets):
        token = {"text": text[start:end], "start": start, "end": end, "label": labels[best[i]],
                 "score": float(scores[i])}
        if with_probs:
            token["probs"] = dict(zip(labels, probs[i].tolist()))
        tokens.append(token)
    return tokens


BIO = re.compile(r"(?P<tag>[BIESLU])[-_](?P<type>.+)")


def split_tag(label: str) -> tuple[str, str | None]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', None); a bare 'PER' continues like 'I-PER' (IO scheme)."""
    if label.upper() == "O":
        return "O", None
    match = BIO.fullmatch(label)
    return (match["tag"], match["type"]) if match else ("I", label)


def merge_entities(text: str, tokens: list[dict]) -> list[dict]:
    """Merge consecutive tagged tokens into entities (BIO, IOB1, and the E-/S- tags of BIOES)."""
    entities: list[dict] = []
    current: dict | None = None

    def close():
        nonlocal current
        if current is not None:
            entities.append(_entity(text, current))
            current = None

    for token in tokens:
        if token["end"] <= token["start"]:
            continue
        tag, kind = split_tag(token["label"])
        if tag == "O":
            close()
            continue
        continues = current is not None and current["label"] == kind and tag in ("I", "E", "L")
        if not continues:
            close()
            current = {"label": kind, "start": token["start"], "end": token["end"], "scores": []}
        current["end"] = token["end"]
        current["scores"].append(token["score"])
        if tag in ("E", "L", "S", "U"):
            close()
    close()
    return entities


def _entity(text: str, span: dict) -> dict:
    start, end = span["start"], span["end"]
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return {"text": text[start:end], "label": span["label"], "start": start, "end": end,
            "score": sum(span["scores"]) / len(span["scores"])}
