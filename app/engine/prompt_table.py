"""The engine's loaded task prompts, by name: the version a new request resolves to.

A prompt's K,V prefix lives in CPU memory (TaskPrompt.k/v); on the device it lives in KV blocks that every
request of the task shares, cached like any block and evicted least recently used (block_manager.py).
A request holds its TaskPrompt object, so replacing or removing a name never touches requests that run.
"""
from __future__ import annotations

from app.engine.task_prompt import TaskPrompt


class PromptTable:
    def __init__(self):
        self._prompts: dict[str, TaskPrompt] = {}

    def put(self, prompt: TaskPrompt) -> None:
        self._prompts[prompt.name] = prompt

    def use(self, name: str) -> TaskPrompt:
        """The prompt for a new request. KeyError if absent."""
        return self._prompts[name]

    def remove(self, name: str) -> None:
        self._prompts.pop(name, None)

    def get(self, name: str) -> TaskPrompt | None:
        return self._prompts.get(name)

    def items(self):
        return self._prompts.items()

    def __contains__(self, name: str) -> bool:
        return name in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)
