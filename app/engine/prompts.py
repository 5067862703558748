"""The engine's task prompts over their life: following the store (which version each name serves), building
a version on first use, at upload (checked, then served as built) or when asked for by number, and keeping the
built ones in one cache (prompt_cache.py).

Every method but `built` runs on the engine thread (AsyncEngine hands the calls to it), between two steps: a
build is a forward, which never runs beside a step, and only that thread changes the cache. `cache` says which
reads other threads may make.
"""
from __future__ import annotations

from typing import Callable

from app.engine.model import Transformer
from app.engine.prompt_cache import PromptCache
from app.engine.request import PromptNotFound
from app.engine.task_prompt import Key, TaskPrompt, build_task_prompt, check_servable
from prompt_store.format import PromptFile, PromptFormatError


class Prompts:
    def __init__(self, model: Transformer, encode: Callable[[str], list[int]], budget_bytes: int | None):
        self.model, self.encode = model, encode
        self.cache = PromptCache(budget_bytes)

    def check(self, prompt_file: PromptFile) -> TaskPrompt:
        """Refuse, before it is stored, a prompt this engine could not serve (ValueError): label words the LM
        head cannot tell apart, or values that give non-finite outputs. Runs a forward (the prompt's prefix, then
        a probe input), so call it only on a prompt the store has validated. Returns the built prompt, which
        `adopt` serves once it is stored."""
        return check_servable(self.model, prompt_file, self.encode)

    def follow(self, name: str, current: Callable[[], tuple[int, str] | None],
               read: Callable[[int], PromptFile]) -> None:
        """Serve what the store holds under `name` now: `current()` gives its (version, digest), None when it
        is gone; `read(version)` its file, on first use. Requests already admitted keep their version."""
        stored = current()
        if stored is None:
            self.cache.remove(name)
        elif self.cache.serving(name) != (name, *stored):
            version, digest = stored
            self.cache.serve((name, version, digest), lambda: read(version))

    def adopt(self, prompt: TaskPrompt) -> None:
        """Keep a prompt built by `check` (as stored: its version and digest), so that the first request does not
        build it again, if that version is the one its name serves; otherwise (another replica's newer version
        was picked up meanwhile, or the name was deleted) nothing changes."""
        if self.cache.serving(prompt.name) == prompt.key and self.cache.built(prompt.key) is None:
            self.cache.add(prompt)

    def load(self, pf: PromptFile) -> TaskPrompt:
        """Serve this prompt file under its name, built now unless this stored version is built. A file never
        stored (no digest) is built every time: its key says nothing of its content."""
        key = (pf.name, pf.version, pf.digest)
        if not pf.digest or self.cache.serving(pf.name) != key:
            self.cache.serve(key, lambda: pf)
        return self._built(key, lambda: pf) if pf.digest else self.cache.add(self._build(pf))

    def built(self, name: str, version: int, digest: str) -> TaskPrompt | None:
        """This stored version, if it is built. One dict lookup, so any thread may ask."""
        return self.cache.built((name, version, digest))

    def pinned(self, read: Callable[[], PromptFile]) -> TaskPrompt:
        """A stored version asked for by number (`name@3`; `read()` gives its file): built unless it is, and
        kept (cache.OLDER_KEPT), without changing which version the name serves."""
        prompt_file = read()
        return self._built((prompt_file.name, prompt_file.version, prompt_file.digest), lambda: prompt_file)

    def remove(self, name: str) -> None:
        self.cache.remove(name)

    def get(self, name: str) -> TaskPrompt:
        """The version `name` serves now, built (its file read, its prefix computed) if it is not."""
        served = self.cache.served(name)
        if served is None:
            raise PromptNotFound(f"no prompt named {name!r}; GET /v1/prompts lists them")
        return self._built(*served)

    def _built(self, key: Key, read: Callable[[], PromptFile]) -> TaskPrompt:
        return self.cache.built(key) or self.cache.add(self._build(read()))

    def _build(self, pf: PromptFile) -> TaskPrompt:
        try:
            return build_task_prompt(self.model, pf, self.encode)
        except ValueError as e:  # e.g. a file put in the store by hand with labels the LM head cannot score
            raise PromptFormatError(f"prompt {pf.name!r} cannot be served: {e}") from e
