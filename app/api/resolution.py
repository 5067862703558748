"""Request resolution: which prompt version a request's `model`/`prompt` names (the bare model's names,
`name@N`, a traffic split), and the request's limits (inputs, tokens, the context), checked here only.

The bare model answers to `base` (prompt_store.format.BASE_MODEL), its served id and its file or folder name;
from here on it is BASE_MODEL, and a request for it runs with no TaskPrompt (None) in the engine.
"""
from __future__ import annotations

import asyncio

from fastapi import Request

from app.api.errors import APIError
from app.engine.request import PromptNotFound
from app.engine.sequence import Sequence
from app.engine.task_prompt import TaskPrompt
from app.services import Services
from prompt_store.format import BASE_MODEL

MAX_VERSION = 10**9  # no store holds more versions of one prompt; a larger number names none


def note_prompt(request: Request, services: Services, name: str) -> None:
    """The prompt a request names (BASE_MODEL for any of the bare model's names), for the access log and
    metrics; noted first, so a request refused on the way is logged with it."""
    request.state.prompt = prompt_name(services, name)


def prompt_name(services: Services, name: str) -> str:
    """A route's model/prompt field -> the prompt's name, BASE_MODEL for any of the bare model's names."""
    return BASE_MODEL if name in (BASE_MODEL, services.model_name, services.model_id) else name


async def resolve_prompt(request: Request, services: Services, name: str, param: str = "model",
                         user: str | None = None) -> TaskPrompt | None:
    """A request's prompt (None: the bare model), resolved once: all its inputs run this version, which the
    response's `x-prompt-version` header names. A prompt not used lately is read and its prefix computed on the
    engine thread: that wait happens in a worker thread, not on the event loop. `name@N` pins stored version N
    (404 once the store no longer has it) and is never split; `name` is the newest, or, when the name has a
    traffic split, the version the split gives this request (the same for every request of one `user`).
    param: the request field that named it."""
    name = prompt_name(services, name)
    if name == BASE_MODEL:
        return None
    engine = services.engine
    pinned = pinned_version(name, param)
    if pinned is None:
        prompt = await _current(services, name)
        split = services.registry.traffic(name)
        version = None if split is None else split.choose(name, user)
        if version is None or version == prompt.version:
            return _served(request, prompt)
        pinned = name, version
    base_name, version = pinned
    prompt = engine.built_prompt(base_name, version, services.registry.meta(base_name, version).digest)
    if prompt is None:  # read from the store and built on the engine thread, then kept for the next request
        prompt = await asyncio.to_thread(engine.pinned_prompt, lambda: services.registry.get(base_name, version))
    return _served(request, prompt)


async def _current(services: Services, name: str) -> TaskPrompt:
    engine = services.engine
    if engine.prompt_is_loaded(name):
        return engine.get_prompt(name)
    return await asyncio.to_thread(engine.get_prompt, name)


def _served(request: Request, prompt: TaskPrompt) -> TaskPrompt:
    """Note the prompt version a request runs, for its `x-prompt-version` header and the per-version metrics
    (app/api/middleware.py)."""
    request.state.prompt_version = (prompt.name, prompt.version)
    return prompt


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


# ---- limits: SOFTSERVE_MAX_INPUTS_PER_REQUEST, SOFTSERVE_MAX_TOKENS_PER_REQUEST and the context ------------
# (Texts that can never fit are refused before tokenizing by app/encoder.py; a sequence longer than the
# context by the engine, which makes it.)

def check_inputs(services: Services, count: int, what: str, param: str) -> None:
    """count: the engine sequences the request asks for, `what` in words ("3 inputs")."""
    limit = services.settings.max_inputs_per_request
    if count > limit:
        raise APIError(400, f"{what} exceed the limit of {limit} per request (SOFTSERVE_MAX_INPUTS_PER_REQUEST)",
                       "too_many_inputs", param)


def check_tokens(services: Services, seqs: list[Sequence]) -> None:
    """Tokens per request: every input's tokens plus the tokens each may generate."""
    limit = services.settings.max_tokens_per_request
    total = sum(seq.total_len - seq.prefix_len for seq in seqs)
    if total > limit:
        raise APIError(400, f"the request needs {total} tokens (inputs + max_tokens), over the limit of {limit} "
                            f"per request (SOFTSERVE_MAX_TOKENS_PER_REQUEST)", "too_many_tokens")


def text_room(services: Services, prompt: TaskPrompt | None) -> int:
    """Text tokens (input + output) one sequence with this prompt can have: the context less its virtual tokens."""
    return services.engine.config.max_seq_len - (0 if prompt is None else prompt.num_virtual_tokens)


def default_max_tokens(services: Services, prompt: TaskPrompt | None, ids: list[int], sequences: int) -> int:
    """max_tokens when a request sets none (OpenAI's and vLLM's default): the rest of the context, within
    the request's share of SOFTSERVE_MAX_TOKENS_PER_REQUEST; at least 1 (a prompt that fills the context is
    then refused for its length)."""
    share = services.settings.max_tokens_per_request // sequences - len(ids)
    return max(1, min(text_room(services, prompt) - len(ids), share))
