"""The engine's one cache of built task prompts, keyed by (name, version, digest), and the version each name
serves.

Every stored prompt's name is registered with the version it serves and how to read that version's file; a
version is built (its file read, its K,V prefix computed) on first use, or at upload. Built versions are kept
within a CPU memory budget, least recently used out, and of those their name does not serve now (asked for by
number, given by a traffic split, or replaced since they were built) at most OLDER_KEPT. A request holds its
TaskPrompt object, so replacing, removing or evicting a version never touches requests that run. On the
device, prefixes live in KV blocks shared by every request of the task (block_manager.py).

Only the engine thread changes the cache. Other threads may call `built`, `built_current`, `serving`,
`num_built`, `in` and `len`: each is one or two reads of a dict (atomic under the GIL) and sees the cache before
or after a change, never half of one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from app.engine.task_prompt import Key, TaskPrompt
from prompt_store.format import PromptFile

OLDER_KEPT = 8  # built versions kept that their name does not serve now


class PromptCache:
    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes  # None: no limit
        self._serving: dict[str, tuple[Key, Callable[[], PromptFile]]] = {}  # name -> its version, its file
        self._built: OrderedDict[Key, TaskPrompt] = OrderedDict()  # least recently used first
        self.built_bytes = 0

    # ---- the engine thread ---------------------------------------------------------------------------
    def serve(self, key: Key, read: Callable[[], PromptFile]) -> None:
        """Serve this version under its name from now on; `read()` gives its file. The version the name
        served before stays built, as an older one."""
        self._serving[key[0]] = (key, read)
        self._evict()

    def remove(self, name: str) -> None:
        """The name is gone: it serves nothing, and none of its versions stays built."""
        self._serving.pop(name, None)
        for key in [key for key in self._built if key[0] == name]:
            self.built_bytes -= self._built.pop(key).nbytes

    def add(self, prompt: TaskPrompt) -> TaskPrompt:
        """Keep this built version (the most recently used), evicting others beyond the bounds; returns it."""
        replaced = self._built.pop(prompt.key, None)
        if replaced is not None:  # a prompt never stored, loaded again
            self.built_bytes -= replaced.nbytes
        self._built[prompt.key] = prompt
        self.built_bytes += prompt.nbytes
        self._evict()
        return prompt

    def touch(self, prompt: TaskPrompt) -> None:
        """A request of this prompt arrived: if it is the version kept, it is now the most recently used."""
        if self._built.get(prompt.key) is prompt:
            self._built.move_to_end(prompt.key)

    def served(self, name: str) -> tuple[Key, Callable[[], PromptFile]] | None:
        """The version the name serves and how to read its file; None when it serves nothing."""
        return self._serving.get(name)

    def _evict(self) -> None:
        """The least recently used out, beyond the budget (the newest stays, whatever its size) or beyond
        OLDER_KEPT versions not served."""
        while self.budget_bytes is not None and self.built_bytes > self.budget_bytes and len(self._built) > 1:
            self.built_bytes -= self._built.popitem(last=False)[1].nbytes
        older = [key for key in self._built if self.serving(key[0]) != key]
        for key in older[:max(0, len(older) - OLDER_KEPT)]:
            self.built_bytes -= self._built.pop(key).nbytes

    # ---- any thread ----------------------------------------------------------------------------------
    def built(self, key: Key) -> TaskPrompt | None:
        return self._built.get(key)

    def serving(self, name: str) -> Key | None:
        """The (name, version, digest) the name serves, None when it serves nothing."""
        served = self._serving.get(name)
        return None if served is None else served[0]

    def built_current(self, name: str) -> TaskPrompt | None:
        """The version the name serves, if it is built."""
        key = self.serving(name)
        return None if key is None else self._built.get(key)

    @property
    def num_built(self) -> int:
        return len(self._built)

    def __contains__(self, name: str) -> bool:
        return name in self._serving

    def __len__(self) -> int:
        return len(self._serving)
