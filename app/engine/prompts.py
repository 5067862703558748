"""The engine's task prompts over their life: following the store (which version each name serves), building a
prompt's K,V prefix on first use, versions asked for by number, and prompts built at upload adopted.

Every method but `check` and the table's reads runs on the engine thread (AsyncEngine hands the calls to it):
it alone changes the table, the LRU order included. `table` (prompt_table.py) says which reads other
threads may make.
"""
from __future__ import annotations

from typing import Callable

from app.engine.model import Transformer
from app.engine.prompt_table import PromptEntry, PromptTable
from app.engine.request import PromptNotFound
from app.engine.task_prompt import TaskPrompt, build_task_prompt, check_servable
from prompt_store.format import PromptFile, PromptFormatError

PINNED_KEPT = 8  # older prompt versions kept built for requests that pin them


class Prompts:
    def __init__(self, model: Transformer, encode: Callable[[str], list[int]], budget_bytes: int | None):
        self.model, self.encode = model, encode
        self.table = PromptTable(budget_bytes)
        self._pinned: dict[tuple, TaskPrompt] = {}  # (name, version, digest) -> older versions asked for by number

    def check(self, prompt_file: PromptFile) -> TaskPrompt:
        """Refuse, before it is stored, a prompt this engine could not serve (ValueError): label words the LM
        head cannot tell apart, or values that give non-finite outputs. Runs a forward (the prompt's prefix, then
        a probe input): call it off the event loop, and only on a prompt the store has validated. Returns the
        built prompt, which `adopt` serves once it is stored."""
        return check_servable(self.model, prompt_file, self.encode)

    def follow(self, name: str, current: Callable[[], tuple[int, str] | None],
               read: Callable[[int], PromptFile]) -> None:
        """Serve what the store holds under `name` now: `current()` gives its (version, digest), None when it
        is gone; `read(version)` its file, on first use. Requests already admitted keep their version."""
        stored = current()
        entry = self.table.entry(name)
        if stored is None:
            self.table.remove(name)
        elif entry is None or (entry.version, entry.digest) != stored:
            version, digest = stored
            self.table.register(PromptEntry(name, version, digest, lambda: read(version)))

    def adopt(self, prompt: TaskPrompt) -> None:
        """Serve a prompt built by `check` (as stored: its version and digest) instead of building it again on
        first use, if that version is the one its name serves; otherwise (another replica's newer version was
        picked up meanwhile, or the name was deleted) nothing changes."""
        entry = self.table.entry(prompt.name)
        if entry is not None and entry.loaded is None and (entry.version, entry.digest) == (
                prompt.version, prompt.digest):
            entry.loaded = prompt
            self.table.mark_loaded(entry)

    def load(self, pf: PromptFile) -> TaskPrompt:
        """Serve this prompt (its prefix computed now, unless this version is already loaded)."""
        entry = self.table.entry(pf.name)
        if entry is None or (entry.version, entry.digest) != (pf.version, pf.digest) or not pf.version:
            entry = PromptEntry(pf.name, pf.version, pf.digest, lambda: pf)
            self.table.register(entry)
        return self._loaded(entry)

    def built(self, name: str, version: int, digest: str) -> TaskPrompt | None:
        """This stored version, if it is built: the one its name serves, or one kept for pinned requests.
        Reads only (one dict lookup each), so any thread may ask."""
        entry = self.table.entry(name)
        loaded = None if entry is None or (entry.version, entry.digest) != (version, digest) else entry.loaded
        return loaded if loaded is not None else self._pinned.get((name, version, digest))

    def pinned(self, read: Callable[[], PromptFile]) -> TaskPrompt:
        """A stored version asked for by number (`name@3`; `read()` gives its file): the served one if it is
        that version, else built (kept for the next request pinning it, up to PINNED_KEPT versions) without
        changing which version the name serves."""
        prompt_file = read()
        key = (prompt_file.name, prompt_file.version, prompt_file.digest)
        entry = self.table.entry(prompt_file.name)
        if entry is not None and (entry.version, entry.digest) == key[1:]:
            return self._loaded(entry)
        if key not in self._pinned:
            if len(self._pinned) >= PINNED_KEPT:
                self._pinned.pop(next(iter(self._pinned)))
            self._pinned[key] = build_task_prompt(self.model, prompt_file, self.encode)
        return self._pinned[key]

    def remove(self, name: str) -> None:
        self.table.remove(name)

    def get(self, name: str) -> TaskPrompt:
        """The version `name` serves now, loaded (read and its prefix computed) if it is not."""
        entry = self.table.entry(name)
        if entry is None:
            raise PromptNotFound(f"no prompt named {name!r}; GET /v1/prompts lists them")
        return self._loaded(entry)

    def _loaded(self, entry: PromptEntry) -> TaskPrompt:
        """The entry's prompt, read and its prefix computed if it is not loaded."""
        if entry.loaded is None:
            pf = entry.read()
            try:
                entry.loaded = build_task_prompt(self.model, pf, self.encode)
            except ValueError as e:  # e.g. a file put in the store by hand with labels the LM head cannot score
                raise PromptFormatError(f"prompt {entry.name!r} cannot be served: {e}") from e
            self.table.mark_loaded(entry)  # others may be unloaded to fit the budget
        return entry.loaded
