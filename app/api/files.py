"""OpenAI's Files API for fine-tuning data: upload (multipart, purpose "fine-tune"), list, show, download, delete.

An upload is checked as `softserve train` reads it (app/finetune/files.py): a bad line is a 400 that names the
line and the problem, and nothing is stored. Every route needs the admin token (the files are training data).
"""
from __future__ import annotations

import asyncio
from pathlib import PurePosixPath
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from app.api.deps import get_services, query, require_admin
from app.api.errors import APIError
from app.api.schemas import error_responses
from app.finetune.files import PURPOSE, check_training_data
from app.services import Services
from app.train.data import DataError

router = APIRouter(prefix="/v1/files", tags=["fine-tuning"], dependencies=[Depends(require_admin)])

UPLOAD_FIELDS = {"file", "purpose"}
MULTIPART_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "JSON Lines as `softserve train` reads them"},
        "purpose": {"type": "string", "enum": [PURPOSE]}}}}}}}


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


@router.post("", openapi_extra=MULTIPART_SCHEMA, responses=error_responses(400, 401, 403, 413, 429, 503),
             summary="Upload a fine-tuning file")
async def upload_file(request: Request, services: Services = Depends(get_services)):
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        raise APIError(400, "send multipart/form-data with the fields 'file' and 'purpose'", "unsupported_content_type")
    async with request.form(max_files=1, max_fields=4) as form:
        unknown = sorted({key.split("[")[0] for key in form.keys()} - UPLOAD_FIELDS)
        if unknown:
            raise APIError(400, f"{unknown[0]}: not supported (files are kept until deleted)" if unknown[0] == "expires_after"
                           else f"unknown form field {unknown[0]!r}; expected 'file' and 'purpose'", "unknown_field", unknown[0])
        purpose = form.get("purpose")
        if purpose != PURPOSE:
            raise APIError(400, f"purpose must be {PURPOSE!r} (got {purpose!r}): files here are fine-tuning data",
                           "invalid_purpose", "purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "'file' must be sent as a file part", "invalid_file", "file")
        data = await upload.read()
    filename = PurePosixPath((upload.filename or "upload.jsonl").replace("\\", "/")).name[:255] or "upload.jsonl"
    try:
        summary = await asyncio.to_thread(check_training_data, data, filename, services.tokenizer)
    except DataError as e:
        raise APIError(400, str(e), "invalid_file", "file") from e
    row = await asyncio.to_thread(services.fine_tuning.files.add, data, filename, PURPOSE, summary)
    return file_object(row)


@router.get("", responses=error_responses(400, 401, 403, 404, 503), summary="List files",
            dependencies=[Depends(query("purpose", "after", "limit", "order"))])
async def list_files(purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc",
                     services: Services = Depends(get_services)):
    rows, more = await asyncio.to_thread(services.fine_tuning.files.list, purpose, after, limit, order == "desc")
    data = [file_object(row) for row in rows]
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/{file_id}", responses=error_responses(401, 403, 404, 503), summary="Show a file")
async def get_file(file_id: str, services: Services = Depends(get_services)):
    return file_object(await asyncio.to_thread(services.fine_tuning.files.get, file_id))


@router.get("/{file_id}/content", response_class=Response, responses=error_responses(401, 403, 404, 503),
            summary="Download a file's content")
async def file_content(file_id: str, services: Services = Depends(get_services)):
    data = await asyncio.to_thread(services.fine_tuning.files.content, file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/{file_id}", responses=error_responses(401, 403, 404, 409, 503), summary="Delete a file")
async def delete_file(file_id: str, services: Services = Depends(get_services)):
    """409 while a job that has not ended reads it."""
    await asyncio.to_thread(services.fine_tuning.files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
