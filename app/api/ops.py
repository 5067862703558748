"""Operations routes: /health (503 while loading or shutting down, 200 when ready) and /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import unavailable
from app.api.errors import error_response
from app.api.schemas import error_responses

router = APIRouter(tags=["ops"])


@router.get("/health", summary="Readiness", responses=error_responses(503))
async def health(request: Request):
    """200 with the model, device and load once ready; 503 while the model loads, after it failed to
    load (the message says why), and while the server shuts down."""
    refusal = unavailable(request.app.state)
    if refusal is not None:
        return error_response(refusal.status, refusal.message, refusal.code)
    services = request.app.state.services
    stats = services.engine.stats()
    return {"status": "ok", "model": services.model_name, "device": str(services.engine.core.runner.device),
            "prompts": len(services.engine.prompts), "running": stats.running, "waiting": stats.waiting}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(request: Request):
    """Requests by route/status/prompt, tokens in and out, queue depth, batch size, KV cache use, time to
    first token, queue/inference/request latency histograms."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
