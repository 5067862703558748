"""What the engine tracks per request (CPU bookkeeping only) and what it hands back."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from app.engine.request import FinishReason, Task
from app.engine.sampling import SamplingParams, TokenChoice
from app.engine.task_prompt import TaskPrompt
from app.engine.tokenizer import IncrementalDecoder

_ids = itertools.count()
BASE_CACHE_ROOT = b"base"  # the prefix-cache identity of the bare model (no task prompt)


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
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenChoice] | None = None  # echo: one per prompt token (the first has no logprob)
    probs: torch.Tensor | None = None  # tag: (text tokens, labels); classify: (labels,)
    error: str | None = None


@dataclass(eq=False)  # identity, never a field-by-field comparison (prompts hold tensors)
class Sequence:
    prompt: TaskPrompt | None  # None: the bare base model
    prompt_ids: list[int]
    task: Task
    sampling: SamplingParams
    decoder: IncrementalDecoder | None = None  # generation: the text of output_ids
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # when it first left the waiting queue
    status: Status = Status.WAITING
    num_cached: int = 0  # text tokens (prompt, then output) whose K,V are in its blocks
    output_ids: list[int] = field(default_factory=list)
    head_probs: list[torch.Tensor] = field(default_factory=list)  # tag: one chunk per prefill step
    first_token_time: float | None = None
    cancelled: bool = False
    group: int | None = None  # the request it belongs to: one HTTP request may submit many sequences
    grammar: object | None = None  # structured output: a GrammarMatcher (app/engine/grammar.py)
    prompt_logprobs: int | None = None  # echo: log-probabilities of the prompt's tokens, with this many alternatives
    prompt_choices: list[TokenChoice] = field(default_factory=list)  # of prompt tokens 1, 2, ... so far
    # KV blocks (app/engine/block_manager.py): block j holds positions [j*B, (j+1)*B)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, as far as known
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    prefix_copies: list[tuple[int, int, int]] = field(default_factory=list)  # (block, start, end) to fill
    # delivery
    finish_reason: FinishReason | None = None
    new_tokens: list[TokenChoice] = field(default_factory=list)  # sampled since the last Output
    sent: int = 0  # characters of text already released
    sent_prompt_logprobs: bool = False

    @property
    def prefix_len(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    @property
    def cache_root(self) -> bytes:
        """Where its block hashes start: the identity of its task prompt (version and content included)."""
        return BASE_CACHE_ROOT if self.prompt is None else self.prompt.cache_key

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_target(self) -> int:
        """Text tokens to compute before decoding: the prompt, and after a preemption the tokens generated
        before it, except the last one, which the next decode step feeds."""
        return len(self.prompt_ids) + max(0, len(self.output_ids) - 1)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prefill_target

    @property
    def reuses_cached_text(self) -> bool:
        """Tagging and prompt log-probabilities need every text token's hidden state, so their text K,V are
        always computed."""
        return self.task != Task.TAG and self.prompt_logprobs is None

    @property
    def total_len(self) -> int:
        """Cache positions this sequence can reach: prefix, prompt, and every token it may generate."""
        new = self.sampling.max_tokens if self.task == Task.GENERATE else 0
        return self.prefix_len + len(self.prompt_ids) + new

    def append_token(self, choice: TokenChoice, eos_ids: frozenset[int]) -> None:
        """A sampled token: its text, and whether it ends the sequence (end of sequence, a stop token or
        string, a completed grammar, max_tokens). Nothing but max_tokens and a complete grammar (whose end
        was the only token it allowed) ends it before min_tokens; a grammar's end is never text."""
        params = self.sampling
        self.output_ids.append(choice.token_id)
        self.new_tokens.append(choice)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if self.grammar is not None:
            self.grammar.accept(choice.token_id)
        may_stop = len(self.output_ids) >= params.min_tokens
        grammar_ended = self.grammar is not None and self.grammar.is_terminated()
        is_eos = grammar_ended or (may_stop and ((choice.token_id in eos_ids and not params.ignore_eos)
                                                 or choice.token_id in params.stop_token_ids))
        if not is_eos:
            self.decoder.add(choice.token_id)
        text = self.decoder.text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in params.stop) if i >= 0] if may_stop else []
        if hits:
            self.decoder.text, self.finish_reason = text[:min(hits)], FinishReason.STOP
        elif is_eos:
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= params.max_tokens:
            self.finish_reason = FinishReason.LENGTH

    def take_output(self) -> Output:
        """What is new for the client since the last Output. Text that could still become a stop string is
        held back until it cannot."""
        text = ""
        if self.decoder is not None:
            full = self.decoder.text
            hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.sampling.stop), default=0)
            text = full[self.sent:max(self.sent, len(full) - hold)]
            self.sent += len(text)
        out = Output(self.request_id, text, self.new_tokens, finished=self.finish_reason is not None,
                     finish_reason=self.finish_reason, prompt_tokens=len(self.prompt_ids),
                     completion_tokens=len(self.output_ids))
        if self.prompt_logprobs is not None and self.sent_prompt_logprobs is False and not self.in_prefill:
            out.prompt_logprobs = [TokenChoice(self.prompt_ids[0]), *self.prompt_choices]
            self.sent_prompt_logprobs = True
        self.new_tokens = []
        return out
