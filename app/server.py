"""FastAPI app factory. The lifespan loads the model once, in the background, so /health answers 503
while loading and 200 when ready.

Graceful shutdown: the first SIGTERM/SIGINT starts draining and is held back from uvicorn until the engine
has drained, so the server keeps listening meanwhile: /health and new requests get 503 (a load balancer
sees the replica leave), in-flight ones may finish for `shutdown_grace_s`, then are cancelled, so every
stream still ends with a final chunk and `data: [DONE]`. Kept-alive connections end as the drain starts
(app/http_protocol.py's ConnectionDrain): idle ones are closed, and every response written while draining
says `Connection: close`, so a client's next request opens a new connection (to another replica) rather
than meeting a 503 here. Then uvicorn gets the signal and exits. A second signal goes to uvicorn at once.
The store is only ever written atomically, so stopping at any point leaves it intact.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import files, fine_tuning, openai, ops, prompts, tasks, tokenize
from app.api.docs import install_docs
from app.api.errors import install_error_handlers
from app.api.middleware import HeadAsGet, RequestMiddleware, kv
from app.config import Settings, environment_settings
from app.http_protocol import CLIENT_TIMEOUT_STATE, DRAIN_STATE, ConnectionDrain
from app.logs import use_json_lines
from app.metrics import Metrics
from app.own_thread import in_own_thread
from app.services import Services, load_services

log = logging.getLogger("softserve")

OPENAPI_TAGS = [
    {"name": "openai", "description": "OpenAI-compatible completions; `model` names a generate prompt or `base`."},
    {"name": "tasks", "description": "Batched task endpoints: generate, tag (NER) and classify."},
    {"name": "prompts", "description": "Register, inspect, download and delete task prompts (hot, no restart)."},
    {"name": "fine-tuning", "description": "OpenAI's Files and fine-tuning jobs APIs: train a task prompt on uploaded "
                                           "JSONL beside serving; the result serves as `suffix@N`."},
    {"name": "ops", "description": "Health and Prometheus metrics."},
]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def create_app(settings: Settings | None = None) -> FastAPI:
    """settings: the CLI's; None when uvicorn calls this factory (`uvicorn --factory app.server:create_app`),
    which reads them from the environment here, once."""
    settings = settings or environment_settings()
    if not logging.getLogger().handlers:  # run as `uvicorn --factory app.server:create_app`: still log ours
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    if settings.log_format == "json":
        use_json_lines()

    # redirect_slashes=False: `PUT /v1/prompts/` (an empty name) is a JSON 404/405, not a redirect to another route
    app = FastAPI(title="softserve", version="0.1.0", lifespan=_lifespan, openapi_tags=OPENAPI_TAGS,
                  redirect_slashes=False, docs_url=None, redoc_url=None,
                  description="Many tasks from one frozen LLM through learned soft prompts, continuously batched. "
                              "Errors are `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`; every response carries "
                              "`x-request-id`.")
    app.state.settings = settings
    app.state.services = None
    app.state.load_error = None
    app.state.draining = False
    app.state.drained = None
    app.state.connections = ConnectionDrain()  # the server's, once it runs the app's lifespan
    app.state.metrics = Metrics(lambda: app.state.services)
    install_error_handlers(app)
    app.add_middleware(HeadAsGet)  # (inside RequestMiddleware, which logs the request as HEAD)
    app.add_middleware(RequestMiddleware, settings=settings, metrics=app.state.metrics,
                       get_services=lambda: app.state.services)

    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    app.include_router(tasks.router)
    app.include_router(prompts.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    install_docs(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Load in the background (the server answers 503 meanwhile); on the way out, drain. The state yielded
    goes to the server's connections (uvicorn's lifespan state)."""
    app.state.loading = asyncio.create_task(_load(app))
    _chain_stop_signals(app, asyncio.get_running_loop())
    # the server's state, which its connections read (app/http_protocol.py)
    yield {CLIENT_TIMEOUT_STATE: app.state.settings.client_timeout_s, DRAIN_STATE: app.state.connections}
    drain(app)
    await app.state.drained


async def _load(app: FastAPI) -> None:
    try:
        services = await in_own_thread(load_services, app.state.settings)  # app/own_thread.py says why
        if app.state.draining:  # a stop came while loading: do not start serving
            services.registry.stop_watching()
            return
        services.engine.core.on_step = app.state.metrics.observe_step
        services.engine.start()
        if services.fine_tuning.worker is not None:
            services.fine_tuning.worker.start()
        app.state.services = services
        log.info(kv(event="ready", model=services.model_name, prompts=len(services.engine.prompts)))
    except Exception as e:  # shown on /health and in the log; the process stays up to say why
        log.exception("loading failed")
        app.state.load_error = str(e)


def drain(app: FastAPI) -> None:
    """Start the graceful stop once: refuse new requests, end kept-alive connections, let in-flight
    requests finish, then cancel them."""
    if app.state.drained is not None:
        return
    app.state.draining = True
    app.state.connections.start()
    settings: Settings = app.state.settings

    async def stop():
        loading = getattr(app.state, "loading", None)
        if loading is not None and not loading.done():
            loading.cancel()
        services: Services | None = app.state.services
        if services is None:
            return
        stats = services.engine.stats()
        log.info(kv(event="draining", running=stats.running, waiting=stats.waiting, grace_s=settings.shutdown_grace_s))
        services.registry.stop_watching()
        if services.fine_tuning.worker is not None:  # its jobs resume from their checkpoints on the next start
            await asyncio.to_thread(services.fine_tuning.worker.stop)
        await services.engine.shutdown(settings.shutdown_grace_s)
        services.encoder.close()
        services.grammars.close()
        log.info(kv(event="stopped"))

    app.state.drained = asyncio.ensure_future(stop())


def _chain_stop_signals(app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
    """Drain on SIGTERM/SIGINT, then hand the signal on (to uvicorn's handler, which stops listening)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous = signal.getsignal(sig)
        except ValueError:
            return
        if not callable(previous):
            continue  # nobody to hand on to (default/ignored): the server runner handles stopping

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(_drain_then_stop, app, lambda: previous(signum, frame))

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a test client): the lifespan end still drains
            return


def _drain_then_stop(app: FastAPI, stop) -> None:
    if app.state.drained is not None:  # a second signal: stop now
        stop()
        return
    drain(app)
    app.state.drained.add_done_callback(lambda _: stop())
