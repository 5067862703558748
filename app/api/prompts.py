"""Prompt management: list, show, upload (our file or a PEFT adapter), download, delete.

An upload is checked against this server's base and engine before it is stored; the registry then writes
it atomically and tells the engine synchronously, so the prompt serves requests as soon as the upload
returns, with no restart (other replicas sharing the folder pick it up on their next poll).
Status codes: a body that is not a parseable upload is a 400; a parseable upload whose content is refused
(bad prompt file, bad adapter, bad name, wrong base) is a 422; over SOFTSERVE_MAX_UPLOAD_MB a 413; a 409
when another replica stored the same version of the name at the same moment (nothing stored: retry).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from app.api.deps import get_services, require_admin, require_api_key
from app.api.errors import APIError
from app.api.schemas import DeletedPrompt, PromptResponse, PromptList, error_responses
from app.services import Services
from prompt_store.format import PromptFile, PromptFormatError, load_prompt_bytes, validate_name
from prompt_store.peft_import import import_peft_files

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


def _info(services: Services, info, history: bool = False) -> dict:
    data = dataclasses.asdict(info)
    data["serving"] = services.engine.prompts.version_of(info.name) == info.version
    if history:
        data["history"] = [_version_info(services, info.name, v) for v in info.versions]
    return data


def _version_info(services: Services, name: str, version: int) -> dict:
    stored = services.registry.meta(name, version)
    return {"version": version, "created_at": stored.created_at, "size_bytes": _size(services, name, version),
            "digest": stored.digest}


def _size(services: Services, name: str, version: int) -> int:
    try:
        return services.registry.path(name, version).stat().st_size
    except OSError:  # pruned or deleted by another replica meanwhile
        return 0


def _find(services: Services, name: str):
    for info in services.registry.list():
        if info.name == name:
            return info
    raise APIError(404, f"no prompt named {name!r}; GET /v1/prompts lists them", "prompt_not_found")


@router.get("", response_model=PromptList, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 503), summary="List prompts")
async def list_prompts(services: Services = Depends(get_services)):
    """Every stored prompt (current version), and the base model identity that prompt files must match."""
    return {"object": "list", "base": services.registry.base.to_dict(),
            "data": [_info(services, info) for info in services.registry.list()]}


@router.get("/{name}", response_model=PromptResponse, dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 404, 503), summary="Show one prompt and its versions")
async def get_prompt(name: str, services: Services = Depends(get_services)):
    return _info(services, _find(services, name), history=True)


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
    pf = await _read_upload(request, services)
    pf = dataclasses.replace(pf, name=name)
    try:
        await asyncio.to_thread(services.engine.check_prompt, pf)  # a small forward: off the event loop
    except ValueError as e:
        raise APIError(422, str(e), "invalid_prompt") from e
    lock = _upload_lock(request)
    async with lock:  # one writer per store in this process: versions are numbered in order
        existed = name in services.registry
        stored = await asyncio.to_thread(services.registry.add, pf)
    # The version this upload stored, even if another replica's newer one was picked up meanwhile.
    info = dataclasses.replace(_find(services, stored.name), version=stored.version, digest=stored.digest,
                               created_at=stored.created_at)
    return JSONResponse(_info(services, info, history=True), status_code=200 if existed else 201)


@router.delete("/{name}", response_model=DeletedPrompt, dependencies=[Depends(require_admin)],
               responses=error_responses(401, 403, 404, 503), summary="Delete a prompt and all its versions")
async def delete_prompt(name: str, request: Request, services: Services = Depends(get_services)):
    """Requests already running keep their version; new requests naming it get 404."""
    _find(services, name)
    async with _upload_lock(request):
        await asyncio.to_thread(services.registry.delete, name)
    return {"id": name, "object": "prompt", "deleted": True}


def _upload_lock(request: Request) -> asyncio.Lock:
    state = request.app.state
    if getattr(state, "upload_lock", None) is None:
        state.upload_lock = asyncio.Lock()
    return state.upload_lock


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
            config = _json_config(await _raw(form.get("adapter_config")))
            weights = await _binary(form.get("adapter_model"), "adapter_model")
            pf = await asyncio.to_thread(import_peft_files, config, weights, "upload", services.registry.base,
                                         labels, description or "")
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


def _json_config(data: bytes) -> dict:
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(422, f"adapter_config is not valid JSON: {e}", "invalid_adapter") from e
    if not isinstance(config, dict):
        raise APIError(422, "adapter_config must be a JSON object", "invalid_adapter")
    return config


def _labels(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(422, f"labels is not a valid JSON list: {e}", "invalid_upload") from e
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise APIError(422, "labels must be a JSON list of strings", "invalid_upload")
        return labels
    return [label.strip() for label in text.split(",") if label.strip()]
