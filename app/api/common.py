"""What the inference routes share: admission checks, running many sequences at once, output checks,
TGI-style timing headers and the per-request metrics."""
from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from pathlib import Path
from typing import Awaitable, TypeVar

from fastapi import Request

from app.api.errors import APIError
from app.engine.request import PromptNotFound
from app.engine.sequence import Output, Sequence
from app.engine.task_prompt import TaskPrompt
from app.engine.weights import DEFAULT_HUB_ID, DEFAULT_MODEL, is_hub_id
from app.metrics import Metrics
from app.services import Services
from prompt_store.format import Task

T = TypeVar("T")


def note_prompt(request: Request, prompt: str | None) -> None:
    """The prompt a request uses, for the access log and metrics."""
    request.state.prompt = prompt or "base"


def check_inputs(services: Services, inputs: list[str]) -> None:
    limit = services.settings.max_inputs_per_request
    if len(inputs) > limit:
        raise APIError(400, f"{len(inputs)} inputs exceed the limit of {limit} per request "
                            f"(SOFTSERVE_MAX_INPUTS_PER_REQUEST)", "too_many_inputs", "inputs")


def check_tokens(services: Services, seqs: list[Sequence]) -> None:
    """Tokens per request: every input's tokens plus the tokens each may generate."""
    limit = services.settings.max_tokens_per_request
    total = sum(seq.total_len - seq.prefix_len for seq in seqs)
    if total > limit:
        raise APIError(400, f"the request needs {total} tokens (inputs + max_tokens), over the limit of {limit} "
                            f"per request (SOFTSERVE_MAX_TOKENS_PER_REQUEST)", "too_many_tokens")


def default_max_tokens(services: Services, prompt, ids: list[int], sequences: int) -> int:
    """max_tokens when a request sets none (OpenAI's and vLLM's default): the rest of the context, within
    the request's share of SOFTSERVE_MAX_TOKENS_PER_REQUEST; at least 1 (a prompt that fills the context is
    then refused for its length)."""
    prefix = 0 if prompt is None else prompt.num_virtual_tokens
    context = services.engine.config.max_seq_len - prefix - len(ids)
    share = services.settings.max_tokens_per_request // sequences - len(ids)
    return max(1, min(context, share))


async def run_all(request: Request, services: Services, seqs: list[Sequence]) -> tuple[list[Output], float]:
    """Run one HTTP request's sequences as one engine request (admitted together, counted once against
    the queue limit); (outputs, end time). A client that disconnects meanwhile cancels all of them."""
    outs = await cancel_on_disconnect(request, services.engine.run_group(seqs))
    end = time.monotonic()
    for out in outs:
        check_output(out)
    return outs, end


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which frees its engine sequences at the next
    step) and end the request with 499. Streams get this from the streaming response itself; a
    non-streaming request would otherwise keep its KV slot until it finished for nobody."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work_task.done():
            raise APIError(499, "the client disconnected", "client_disconnected")
        return work_task.result()
    finally:
        watcher.cancel()
        work_task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is already read, so the next ASGI message is the
    disconnect (uvicorn sends it as soon as the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_output(out: Output) -> None:
    """A request that ended without a result is an error response, never a half answer."""
    if out.finish_reason == "timeout":
        raise APIError(504, out.error or "the request timed out (SOFTSERVE_REQUEST_TIMEOUT_S)", "timeout")
    if out.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down", "cancelled")
    if out.finish_reason == "error":
        raise APIError(500, out.error or "internal error in the engine", "engine_error")


def usage(outs: list[Output], first_of_prompt: list[bool] | None = None) -> dict:
    """Token counts of a response. With copies of one prompt (n > 1), the prompt's tokens count once,
    as OpenAI counts them: first_of_prompt marks the outputs whose prompt is counted."""
    counted = outs if first_of_prompt is None else [o for o, first in zip(outs, first_of_prompt) if first]
    prompt = sum(o.prompt_tokens for o in counted)
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timing_headers(seqs: list[Sequence], outs: list[Output], end: float) -> dict[str, str]:
    """TGI's headers, in milliseconds; for a batch, queue time is the longest wait and inference time runs
    from the first admission to the result."""
    arrival = min(s.arrival for s in seqs)
    generated = sum(o.completion_tokens for o in outs)
    headers = {"x-total-time": _ms(end - arrival), "x-generated-tokens": str(generated),
               "x-prompt-tokens": str(sum(o.prompt_tokens for o in outs))}
    admitted = [s.scheduled_time for s in seqs]
    if all(a is not None for a in admitted):
        headers["x-queue-time"] = _ms(max(a - s.arrival for a, s in zip(admitted, seqs)))
        inference = end - min(admitted)
    else:
        inference = end - arrival
    headers["x-inference-time"] = _ms(inference)
    if generated:
        headers["x-time-per-token"] = _ms(inference / generated)
    return headers


def _ms(seconds: float) -> str:
    return str(max(0, round(seconds * 1000)))


def record(request: Request, route: str, seq: Sequence, out: Output, end: float) -> None:
    """A finished sequence's metrics, and its tokens added to the request's access-log line."""
    metrics: Metrics = request.app.state.metrics
    state = request.state
    state.prompt_tokens = getattr(state, "prompt_tokens", 0) + out.prompt_tokens
    state.completion_tokens = getattr(state, "completion_tokens", 0) + out.completion_tokens
    prompt = seq.prompt.name if seq.prompt is not None else "base"
    if seq.prompt is not None and seq.task == Task.GENERATE:
        metrics.version_finish_reasons.labels(prompt, str(seq.prompt.version), out.finish_reason).inc()
    metrics.prompt_tokens.labels(route, prompt).inc(out.prompt_tokens)
    metrics.e2e_latency.labels(prompt).observe(end - seq.arrival)
    if out.completion_tokens:
        metrics.generated_tokens.labels(route, prompt).inc(out.completion_tokens)
        metrics.tokens_per_request.labels(route).observe(out.completion_tokens)
    if seq.first_token_time is not None:
        metrics.time_to_first_token.labels(prompt).observe(seq.first_token_time - seq.arrival)
        if out.completion_tokens > 1:
            metrics.time_per_output_token.labels(prompt).observe(
                (end - seq.first_token_time) / (out.completion_tokens - 1))
    admitted = seq.scheduled_time
    if admitted is not None:
        metrics.queue_time.labels(route).observe(admitted - seq.arrival)
        metrics.inference_time.labels(route).observe(end - admitted)
    metrics.vllm.finished(served_model_id(request.app.state.services), seq, out, end, admitted)


BASE = "base"  # the `model`/`prompt` name of the bare base model (an alias of its served id)


async def resolve_prompt(request: Request, services: Services, name: str, param: str = "model",
                         user: str | None = None) -> TaskPrompt | None:
    """A request's prompt, resolved once (all its inputs run this version, which the response's
    `x-prompt-version` header names). A prompt not used lately is read and its prefix computed on the engine
    thread: that wait happens in a worker thread, not on the event loop. `name@N` pins stored version N (404
    once the store no longer has it) and is never split; `name` is the newest, or, when the name has a traffic
    split, the version the split gives this request (the same for every request of one `user`).
    param: the request field that named it."""
    engine, name = services.engine, prompt_name(name, services)
    pinned = pinned_version(name or "", param)
    if pinned is None:
        prompt = await _current(engine, name)
        split = None if name is None else services.registry.traffic(name)
        version = None if split is None else split.choose(name, user)
        if version is None or version == prompt.version:
            return _served(request, prompt)
        pinned = name, version
    base_name, version = pinned
    prompt = engine.built_prompt(base_name, version, services.registry.meta(base_name, version).digest)
    if prompt is None:  # read from the store and built on the engine thread, then kept for the next request
        prompt = await asyncio.to_thread(engine.pinned_prompt, lambda: services.registry.get(base_name, version))
    return _served(request, prompt)


async def _current(engine, name: str | None) -> TaskPrompt | None:
    if engine.prompt_is_loaded(name):
        return engine.get_prompt(name)
    return await asyncio.to_thread(engine.get_prompt, name)


def _served(request: Request, prompt: TaskPrompt | None) -> TaskPrompt | None:
    """Note the prompt version a request runs, for its `x-prompt-version` header and the per-version metrics
    (app/api/middleware.py)."""
    if prompt is not None:
        request.state.prompt_version = (prompt.name, prompt.version)
    return prompt


def record_label(request: Request, prompt: TaskPrompt, label: str) -> None:
    """A classify answer, counted per prompt version (a canary's answers compared with the version it may
    replace)."""
    metrics: Metrics = request.app.state.metrics
    metrics.version_labels.labels(prompt.name, str(prompt.version), label).inc()


MAX_VERSION = 10**9  # no store holds more versions of one prompt; a larger number names none


def pinned_version(name: str, param: str) -> tuple[str, int] | None:
    """`name@N` -> (name, N); None for a name without `@` (prompt names never have one). N is ASCII digits:
    anything else is a 400, and a number beyond any version a store can hold is a 404."""
    base_name, at, version = name.rpartition("@")
    if not at:
        return None
    if not base_name or not version.isascii() or not version.isdigit():
        raise APIError(400, f"{param}: a pinned version is written name@N with N in ASCII digits, e.g. 'chat@3'",
                       "invalid_version", param)
    if len(version) > len(str(MAX_VERSION)) or int(version) > MAX_VERSION:
        raise PromptNotFound(f"{param}: prompt {base_name!r} has no version {version[:12]}"
                             f"{'...' if len(version) > 12 else ''} (versions go up to {MAX_VERSION})")
    return base_name, int(version)


def prompt_name(name: str, services) -> str | None:
    """A route's model/prompt field -> the engine's prompt name (None: the bare base model)."""
    return None if name in (BASE, services.model_name, served_model_id(services)) else name


@functools.lru_cache(maxsize=8)
def _model_id(setting: str | None, model: str, directory: Path, fallback: str) -> str:
    if setting:
        return setting
    if model == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    if is_hub_id(model):
        return model
    try:
        name = json.loads((directory / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        name = ""
    # a hub id ("org/name"), not a path on the machine that saved the config
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else fallback


def served_model_id(services) -> str:
    """The base model's id: SOFTSERVE_SERVED_MODEL_NAME, else its hub id, else its folder or file name."""
    return _model_id(services.settings.served_model_name, services.settings.model, services.loaded.directory,
                     services.model_name)
