"""Prompt management: list, show, upload (our file or a PEFT adapter), download, delete, and traffic splits
between a prompt's versions (canaries: prompt_store/traffic.py).

An upload is parsed, validated against this server's base and the store's limits (cheap: shapes, row count,
labels, metadata), and only then built with the model, once, on the engine thread between two steps (its
prefix and a probe forward, whose cost grows with the square of its rows); the registry then writes it
atomically and tells the engine synchronously, and the engine serves the prompt built here, so it serves
requests as soon as the upload returns, with no restart and without reading the file again (other replicas
sharing the folder pick it up on their next poll).
Status codes: a body that is not a parseable upload is a 400; a parseable upload whose content is refused
(bad prompt file, bad adapter, bad name, wrong base) is a 422; over SOFTSERVE_MAX_UPLOAD_MB a 413; a 409
when another replica stored the same version of the name at the same moment (nothing stored: retry).
"""
from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from app.api.deps import get_services, require_admin, require_api_key
from app.api.errors import APIError
from app.api.schemas import (DeletedPrompt, DeletedTrafficSplit, PromptList, PromptResponse, TrafficSplitRequest,
                             TrafficSplitResponse, error_responses)
from app.engine.task_prompt import as_stored
from app.services import Services
from prompt_store.format import PromptFile, PromptFormatError, load_prompt_bytes, parse_json, validate_name
from prompt_store.peft_import import import_peft_files, parse_adapter_config
from prompt_store.registry import PromptInfo, PromptNotFound
from prompt_store.traffic import TrafficSplit, TrafficSplitError

router = APIRouter(prefix="/v1/prompts", tags=["prompts"])

UPLOAD_FIELDS = {"file", "adapter_config", "adapter_model", "labels", "description"}
MULTIPART_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "a softserve prompt file (.safetensors, docs/PROMPT_FORMAT.md)"},
                "adapter_config": {"type": "string", "format": "binary",
                                   "description": "a PEFT adapter's adapter_config.json (with adapter_model)"},
                "adapter_model": {"type": "string", "format": "binary",
                                  "description": "a PEFT adapter's adapter_model.safetensors (pickles are refused)"},
                "labels": {"type": "string", "description": "adapter labels: comma-separated or a JSON list"},
                "description": {"type": "string", "description": "free text shown in listings"},
            }}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": "a softserve prompt file"}},
        },
    }
}


def _info(services: Services, info: PromptInfo, history: bool = False) -> dict:
    data = dataclasses.asdict(info)
    data["serving"] = services.engine.prompts.serving(info.name) == (info.name, info.version, info.digest)
    split = services.registry.traffic(info.name)
    data["traffic"] = None if split is None else split.as_dict()
    if not history:
        del data["history"]
    return data


def _find(services: Services, name: str) -> PromptInfo:
    try:
        return services.registry.info(name)
    except PromptNotFound:
        raise APIError(404, f"no prompt named {name!r}; GET /v1/prompts lists them", "prompt_not_found") from None


@router.get("", response_model=PromptList, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 503), summary="List prompts")
async def list_prompts(services: Services = Depends(get_services)) -> PromptList:
    """Every stored prompt (current version), and the base model identity that prompt files must match."""
    return PromptList(base=services.registry.base.to_dict(),
                      data=[PromptResponse(**_info(services, info)) for info in services.registry.list()])


@router.get("/{name}", response_model=PromptResponse, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 404, 503), summary="Show one prompt and its versions")
async def get_prompt(name: str, services: Services = Depends(get_services)) -> PromptResponse:
    return PromptResponse(**_info(services, _find(services, name), history=True))


@router.get("/{name}/file", dependencies=[Depends(require_api_key)], response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the prompt file"},
                       **error_responses(401, 404, 422, 503)},
            summary="Download a prompt file")
async def download_prompt(name: str, version: int | None = Query(None, ge=1, description="default: the current one"),
                          services: Services = Depends(get_services)):
    info = _find(services, name)
    version = version or info.version
    data = await asyncio.to_thread(services.registry.read_bytes, name, version)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}-v{version}.safetensors"',
                             "x-prompt-version": str(version)})


@router.put("/{name}", response_model=PromptResponse, status_code=201, dependencies=[Depends(require_admin)],
            openapi_extra=MULTIPART_SCHEMA, responses={200: {"model": PromptResponse, "description": "a new version "
                                                             "of an existing prompt"},
                                                       **error_responses(400, 401, 403, 409, 413, 422, 503)},
            summary="Upload a prompt (new, or a new version)")
async def put_prompt(name: str, request: Request, services: Services = Depends(get_services)):
    """Multipart: either `file` (a softserve prompt file), or `adapter_config` + `adapter_model` (a PEFT
    prompt-learning adapter) with optional `labels`; `description` with either. The name in the URL wins
    over the one in the file. 201 for a new prompt, 200 for a new version; serves at once."""
    request.state.prompt = name
    try:
        validate_name(name)
    except PromptFormatError as e:
        raise APIError(422, str(e), "invalid_name") from e
    pf = dataclasses.replace(await _read_upload(request, services), name=name)
    # Validate before anything is computed with the model: a bad file costs a parse, never a forward.
    await asyncio.to_thread(services.registry.validate, pf)
    try:  # built on the engine thread, between two steps
        built = await asyncio.to_thread(services.engine.check_prompt, pf)
    except ValueError as e:
        raise APIError(422, str(e), "invalid_prompt") from e
    info = await asyncio.to_thread(services.registry.add_and_describe, pf)
    await asyncio.to_thread(services.engine.adopt_prompt, as_stored(built, info.version, info.digest))
    # Version 1 is stored only when the name had no version: a new prompt (a re-created one too).
    return JSONResponse(_info(services, info, history=True), status_code=201 if info.version == 1 else 200)


@router.delete("/{name}", response_model=DeletedPrompt, dependencies=[Depends(require_admin)],
               responses=error_responses(401, 403, 404, 503), summary="Delete a prompt and all its versions")
async def delete_prompt(name: str, services: Services = Depends(get_services)) -> DeletedPrompt:
    """Requests already running keep their version; new requests naming it get 404."""
    _find(services, name)  # a name this replica does not know (an invalid one too) is a 404
    await asyncio.to_thread(services.registry.delete, name)  # deleted by another replica meanwhile: 404 too
    return DeletedPrompt(id=name, deleted=True)


@router.get("/{name}/traffic", response_model=TrafficSplitResponse, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 404, 503), summary="Show a prompt's traffic split")
async def get_traffic(name: str, services: Services = Depends(get_services)) -> TrafficSplitResponse:
    """404 `traffic_split_not_found` when the prompt has none (its current version serves every request)."""
    _find(services, name)
    split = services.registry.traffic(name)
    if split is None:
        raise APIError(404, f"prompt {name!r} has no traffic split: its current version serves every request",
                       "traffic_split_not_found")
    return TrafficSplitResponse(name=name, **split.as_dict())


@router.put("/{name}/traffic", response_model=TrafficSplitResponse, dependencies=[Depends(require_admin)],
            responses=error_responses(400, 401, 403, 404, 503), summary="Split a prompt's traffic between versions")
async def put_traffic(name: str, body: TrafficSplitRequest,
                      services: Services = Depends(get_services)) -> TrafficSplitResponse:
    """`versions`: stored version -> whole percent of the requests naming the bare `name`, summing to 100
    (`{"3": 90, "4": 10}`; one version at 100 serves it instead of the newest). Requests naming `name@N` are
    never split; requests with a `user` get the same version every time while the split stands. Replaces any
    split the name had; every replica follows within SOFTSERVE_WATCH_INTERVAL_S. The versions a split names are
    kept however many newer ones are uploaded."""
    _find(services, name)
    try:
        split = TrafficSplit.parse(body.versions)
    except TrafficSplitError as e:
        raise APIError(400, str(e), "invalid_traffic_split", "versions") from None
    split = await asyncio.to_thread(services.registry.set_traffic, name, split)  # 404 naming a version not stored
    return TrafficSplitResponse(name=name, **split.as_dict())


@router.delete("/{name}/traffic", response_model=DeletedTrafficSplit, dependencies=[Depends(require_admin)],
               responses=error_responses(401, 403, 404, 503), summary="Remove a prompt's traffic split")
async def delete_traffic(name: str, services: Services = Depends(get_services)) -> DeletedTrafficSplit:
    """The current (newest) version serves every request again."""
    _find(services, name)
    if not await asyncio.to_thread(services.registry.clear_traffic, name):
        raise APIError(404, f"prompt {name!r} has no traffic split", "traffic_split_not_found")
    return DeletedTrafficSplit(name=name, deleted=True)


async def _read_upload(request: Request, services: Services) -> PromptFile:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        return await asyncio.to_thread(load_prompt_bytes, await request.body())
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise APIError(400, "send multipart/form-data (field 'file', or 'adapter_config' + 'adapter_model') "
                            "or an application/octet-stream prompt file", "unsupported_content_type")
    async with request.form(max_files=4, max_fields=8) as form:
        unknown = sorted(set(form.keys()) - UPLOAD_FIELDS)
        if unknown:
            raise APIError(422, f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(sorted(UPLOAD_FIELDS))}",
                           "invalid_upload")
        description = await _text(form.get("description"), "description")
        labels = _labels(await _text(form.get("labels"), "labels"))
        if "file" in form:
            if "adapter_config" in form or "adapter_model" in form:
                raise APIError(422, "send either 'file' or 'adapter_config' + 'adapter_model', not both", "invalid_upload")
            if labels is not None:
                raise APIError(422, "'labels' applies to PEFT adapters; a prompt file carries its own", "invalid_upload")
            pf = await asyncio.to_thread(load_prompt_bytes, await _binary(form.get("file"), "file"))
        elif "adapter_config" in form and "adapter_model" in form:
            config = _adapter_config(await _raw(form.get("adapter_config")))
            weights = await _binary(form.get("adapter_model"), "adapter_model")
            pf = await asyncio.to_thread(import_peft_files, config, weights, "upload", services.registry.base,
                                         labels, description or "", services.registry.max_virtual_tokens)
        else:
            raise APIError(422, "the upload needs a 'file' field, or both 'adapter_config' and 'adapter_model'",
                           "invalid_upload")
    if description is not None:
        pf = dataclasses.replace(pf, description=description)
    return pf


async def _raw(value) -> bytes:
    if isinstance(value, UploadFile):
        return await value.read()
    return (value or "").encode()


async def _binary(value, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise APIError(422, f"'{field}' must be sent as a file part (curl -F '{field}=@path')", "invalid_upload")
    return await value.read()


async def _text(value, field: str) -> str | None:
    if value is None:
        return None
    data = await _raw(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(422, f"'{field}' must be UTF-8 text", "invalid_upload") from e


def _adapter_config(data: bytes) -> dict:
    try:
        config = parse_adapter_config(data)
    except PromptFormatError as e:
        raise APIError(422, str(e), "invalid_adapter") from e
    if not isinstance(config, dict):
        raise APIError(422, "adapter_config must be a JSON object", "invalid_adapter")
    return config


def _labels(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.startswith("["):
        try:
            labels = parse_json(text, "labels")
        except PromptFormatError as e:
            raise APIError(422, str(e), "invalid_upload") from e
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise APIError(422, "labels must be a JSON list of strings", "invalid_upload")
        return labels
    return [label.strip() for label in text.split(",") if label.strip()]
