"""What the engine tracks per request (CPU bookkeeping only) and what it hands back."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from app.engine.sampling import SamplingParams, TokenChoice
from app.engine.task_prompt import TaskPrompt

_ids = itertools.count()


class Mode(str, enum.Enum):
    GENERATE = "generate"
    TAG = "tag"
    CLASSIFY = "classify"


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Output:
    """One update for the client. Generation streams many; tag and classify send one, finished."""
    request_id: int
    text: str = ""  # new text since the last update
    tokens: list[TokenChoice] = field(default_factory=list)  # new tokens since the last update
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    probs: torch.Tensor | None = None  # tag: (text tokens, labels); classify: (labels,)
    error: str | None = None


@dataclass(eq=False)  # identity, never a field-by-field comparison (prompts hold tensors)
class Sequence:
    prompt: TaskPrompt | None  # None: the bare base model
    prompt_ids: list[int]
    mode: Mode
    sampling: SamplingParams
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # when it left the waiting queue
    status: Status = Status.WAITING
    slot: int | None = None
    num_cached: int = 0  # text tokens whose K,V are in the slot
    output_ids: list[int] = field(default_factory=list)
    head_probs: list[torch.Tensor] = field(default_factory=list)  # tag: one chunk per prefill step
    first_token_time: float | None = None
    cancelled: bool = False
    group: int | None = None  # the request it belongs to: one HTTP request may submit many sequences

    @property
    def prefix_len(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        """Cache positions this sequence can reach: prefix, prompt, and every token it may generate."""
        new = self.sampling.max_tokens if self.mode == Mode.GENERATE else 0
        return self.prefix_len + len(self.prompt_ids) + new
