"""Operations routes: /health (503 while loading, 200 when ready)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.errors import error_response

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(request: Request):
    services = request.app.state.services
    if services is None:
        error = request.app.state.load_error
        message = f"the model failed to load: {error}" if error else "the model is loading"
        return error_response(503, message, "not_ready")
    stats = services.engine.stats()
    return {"status": "ok", "model": services.model_name, "device": str(services.engine.runner.device),
            "prompts": len(services.engine.prompts), "running": stats.running, "waiting": stats.waiting}
