"""OpenAI's fine-tuning jobs API: create, list, show, events, checkpoints, cancel; the jobs train soft prompts
(app/finetune). Every route needs the admin token. Lists are newest first; `after` is the last id of the
previous page, as OpenAI's cursor pages have it.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query

from app.api.deps import get_services, query, require_admin
from app.api.errors import APIError
from app.api.schemas import error_responses
from app.finetune.jobs import InvalidJob, JobRequest
from app.services import Services
from prompt_store.format import BASE_MODEL

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], dependencies=[Depends(require_admin)])


def page(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": more}


def refused(e: InvalidJob) -> APIError:
    return APIError(400, str(e), e.code, e.param)


@router.post("", responses=error_responses(400, 401, 403, 429, 503), summary="Create a fine-tuning job")
async def create_job(request: JobRequest, services: Services = Depends(get_services)):
    """`model` is the base (its id or `base`); `suffix` names the trained prompt; `fine_tuned_model` is `suffix@N`."""
    try:
        return await asyncio.to_thread(services.fine_tuning.jobs.create, request, {services.model_id, BASE_MODEL})
    except InvalidJob as e:
        raise refused(e) from e


@router.get("", responses=error_responses(400, 401, 403, 404, 503), summary="List fine-tuning jobs")
async def list_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                    metadata: dict[str, str] = Depends(query("after", "limit", metadata=True)),
                    services: Services = Depends(get_services)):
    """`metadata[KEY]=VALUE` (any number): only the jobs whose metadata has those pairs."""
    return page(*await asyncio.to_thread(services.fine_tuning.jobs.list, after, limit, metadata))


@router.get("/{job_id}", responses=error_responses(401, 403, 404, 503), summary="Show a fine-tuning job")
async def get_job(job_id: str, services: Services = Depends(get_services)):
    return await asyncio.to_thread(services.fine_tuning.jobs.get, job_id)


@router.get("/{job_id}/events", responses=error_responses(400, 401, 403, 404, 503), summary="A job's events",
            dependencies=[Depends(query("after", "limit"))])
async def job_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                     services: Services = Depends(get_services)):
    """Newest first: steps with their training loss, epochs with the held-out metrics, status changes."""
    try:
        return page(*await asyncio.to_thread(services.fine_tuning.jobs.events, job_id, after, limit))
    except InvalidJob as e:
        raise refused(e) from e


@router.get("/{job_id}/checkpoints", responses=error_responses(400, 401, 403, 404, 503), summary="A job's checkpoints",
            dependencies=[Depends(query("after", "limit"))])
async def job_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100),
                          services: Services = Depends(get_services)):
    """One per epoch, newest first, with its metrics. A checkpoint is what a resumed job goes on from; it is not
    served (the job's result is)."""
    try:
        return page(*await asyncio.to_thread(services.fine_tuning.jobs.checkpoints, job_id, after, limit))
    except InvalidJob as e:
        raise refused(e) from e


@router.post("/{job_id}/cancel", responses=error_responses(401, 403, 404, 409, 503), summary="Cancel a job")
async def cancel_job(job_id: str, services: Services = Depends(get_services)):
    """A queued job ends at once; a running one's training process is stopped within a poll
    (SOFTSERVE_FINETUNE_POLL_S). 409 for a job that has already ended."""
    return await asyncio.to_thread(services.fine_tuning.jobs.cancel, job_id)
