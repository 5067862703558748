"""The engine's task prompts, by name: which version a new request resolves to, and the loaded ones.

Every stored prompt is registered (name, version, digest, and how to read its file), but only prompts in
use are loaded: a prompt's file is read and its K,V prefix computed on first use, and loaded prompts are
kept within a CPU memory budget, least recently used out (a store of thousands of prompts costs an index,
not thousands of prefixes). On the device, prefixes live in KV blocks shared by every request of the task,
cached and evicted like any block (block_manager.py). A request holds its TaskPrompt object, so replacing,
removing or unloading a name never touches requests that run.

Only the engine thread changes the table. Other threads may call `loaded`, `entry`, `version_of`,
`num_loaded`, `in` and `len`: each is one read of a dict (atomic under the GIL) and sees the table before or
after a change, never half of one.
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
        self._entries: dict[str, PromptEntry] = {}
        self._loaded: OrderedDict[str, PromptEntry] = OrderedDict()  # loaded entries, least recently used first
        self.loaded_bytes = 0

    def register(self, entry: PromptEntry) -> None:
        """Serve this entry under its name from now on (replacing the name's previous entry)."""
        self.remove(entry.name)
        self._entries[entry.name] = entry
        if entry.loaded is not None:
            self.mark_loaded(entry)

    def mark_loaded(self, entry: PromptEntry) -> None:
        """entry.loaded was just set: count it, most recently used, and unload others beyond the budget."""
        self._loaded[entry.name] = entry
        self.loaded_bytes += entry.loaded.nbytes
        while self.budget_bytes is not None and self.loaded_bytes > self.budget_bytes and len(self._loaded) > 1:
            _, oldest = self._loaded.popitem(last=False)  # the newest stays, whatever its size
            self.loaded_bytes -= oldest.loaded.nbytes
            oldest.loaded = None

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)
        entry = self._loaded.pop(name, None)
        if entry is not None:
            self.loaded_bytes -= entry.loaded.nbytes

    def entry(self, name: str) -> PromptEntry | None:
        return self._entries.get(name)

    def loaded(self, name: str) -> TaskPrompt | None:
        """The loaded prompt of this name, or None if it is not loaded. Changes nothing."""
        entry = self._loaded.get(name)
        return None if entry is None else entry.loaded

    def touch(self, prompt: TaskPrompt) -> None:
        """A request of this prompt arrived: if its name serves it loaded, it is now the most recently used."""
        entry = self._loaded.get(prompt.name)
        if entry is not None and entry.loaded is prompt:
            self._loaded.move_to_end(prompt.name)

    @property
    def num_loaded(self) -> int:
        return len(self._loaded)

    def version_of(self, name: str) -> int | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.version

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
