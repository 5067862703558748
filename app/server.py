"""FastAPI app factory. The lifespan loads the model once, in the background, so /health answers 503
while loading and 200 when ready; on shutdown it stops admitting and lets in-flight requests finish."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from app.api import openai, ops
from app.api.errors import install_error_handlers
from app.config import Settings
from app.services import Services, load_services

log = logging.getLogger("softserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                services = await asyncio.to_thread(load_services, settings)
                services.engine.start()
                app.state.services = services
                log.info("ready: %s", services.model_name)
            except Exception as e:  # shown on /health and in the log; the process stays up to say why
                log.exception("loading failed")
                app.state.load_error = str(e)

        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        services: Services | None = getattr(app.state, "services", None)
        if services is not None:
            services.registry.stop_watching()
            await services.engine.shutdown(settings.shutdown_grace_s)

    app = FastAPI(title="softserve", version="0.1.0", lifespan=lifespan,
                  description="Many tasks from one frozen LLM through learned soft prompts, continuously batched.")
    app.state.settings = settings
    app.state.services = None
    app.state.load_error = None
    install_error_handlers(app)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        log.info("request_id=%s method=%s path=%s status=%d duration_ms=%.1f", rid, request.method,
                 request.url.path, response.status_code, (time.perf_counter() - start) * 1000)
        return response

    app.include_router(ops.router)
    app.include_router(openai.router)
    return app
