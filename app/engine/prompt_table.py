"""The engine's loaded task prompts, by name, with a device-memory budget for their K,V prefixes.

Prompts are served from the model's device. Past the budget, the least recently used prompts' K,V move to
CPU memory and come back on their next use; a prefix is only ever copied, never recomputed. Heads stay on
the device (they are small: labels x hidden).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from app.engine.task_prompt import TaskPrompt

OFFLOAD_DEVICE = torch.device("cpu")


class PromptTable:
    def __init__(self, device: torch.device | str, budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes  # None: no limit
        self._prompts: OrderedDict[str, TaskPrompt] = OrderedDict()  # least recently used first
        self._resident: set[str] = set()  # names whose K,V are on the device

    def put(self, prompt: TaskPrompt) -> None:
        self._prompts[prompt.name] = prompt
        self._prompts.move_to_end(prompt.name)
        self._resident.add(prompt.name)
        self._fit(keep=prompt.name)

    def use(self, name: str) -> TaskPrompt:
        """The prompt for a new request: most recently used now, its K,V on the device. KeyError if absent."""
        prompt = self._prompts[name]
        self._prompts.move_to_end(name)
        if name not in self._resident:
            prompt.move_kv(self.device)
            self._resident.add(name)
            self._fit(keep=name)
        return prompt

    def remove(self, name: str) -> None:
        self._prompts.pop(name, None)
        self._resident.discard(name)

    def _fit(self, keep: str) -> None:
        if self.budget_bytes is None:
            return
        for name in list(self._prompts):  # least recently used first
            if self.resident_bytes <= self.budget_bytes:
                return
            if name != keep and name in self._resident:
                self._prompts[name].move_kv(OFFLOAD_DEVICE)
                self._resident.discard(name)

    @property
    def resident_bytes(self) -> int:
        return sum(self._prompts[name].kv_bytes for name in self._resident)

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def get(self, name: str) -> TaskPrompt | None:
        return self._prompts.get(name)

    def items(self):
        return self._prompts.items()

    def __contains__(self, name: str) -> bool:
        return name in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)
