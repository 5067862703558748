"""The engine's task prompts, by name: which version a new request resolves to, and the loaded ones.

Every stored prompt is registered (name, version, digest, and how to read its file), but only prompts in
use are loaded: a prompt's file is read and its K,V prefix computed on first use, and loaded prompts are
kept within a CPU memory budget, least recently used out (a store of thousands of prompts costs an index,
not thousands of prefixes). On the device, prefixes live in KV blocks shared by every request of the task,
cached and evicted like any block (block_manager.py). A request holds its TaskPrompt object, so replacing,
removing or unloading a name never touches requests that run.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from app.engine.task_prompt import TaskPrompt
from prompt_store.format import PromptFile


@dataclass(eq=False)
class PromptEntry:
    name: str
    version: int
    digest: str
    read: Callable[[], PromptFile]  # the prompt's file (from the store)
    loaded: TaskPrompt | None = None


class PromptTable:
    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes  # None: no limit
        self._entries: OrderedDict[str, PromptEntry] = OrderedDict()  # least recently used first

    def register(self, entry: PromptEntry) -> None:
        self._entries[entry.name] = entry
        self._entries.move_to_end(entry.name)
        self._fit()

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def entry(self, name: str) -> PromptEntry | None:
        return self._entries.get(name)

    def use(self, name: str) -> TaskPrompt | None:
        """The loaded prompt of this name (now the most recently used), or None if it is not loaded."""
        entry = self._entries.get(name)
        if entry is None or entry.loaded is None:
            return None
        self._entries.move_to_end(name)
        return entry.loaded

    def _fit(self) -> None:
        if self.budget_bytes is None:
            return
        loaded = [e for e in self._entries.values() if e.loaded is not None]  # least recently used first
        total = sum(e.loaded.nbytes for e in loaded)
        for entry in loaded[:-1]:  # the newest stays, whatever its size
            if total <= self.budget_bytes:
                return
            total -= entry.loaded.nbytes
            entry.loaded = None

    @property
    def loaded_bytes(self) -> int:
        return sum(e.loaded.nbytes for e in self._entries.values() if e.loaded is not None)

    @property
    def num_loaded(self) -> int:
        return sum(1 for e in self._entries.values() if e.loaded is not None)

    def version_of(self, name: str) -> int | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.version

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
