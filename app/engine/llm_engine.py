"""LLMEngine: the synchronous engine. Add sequences, call `step()` until they finish; one thread drives it
(AsyncEngine's, app/engine/engine.py, or a script's).

`step()` is the one place the scheduler, the runner and the outputs meet:
reap cancelled/expired -> schedule -> one forward (new prefixes, prefill chunks, decode tokens; tokens, heads)
-> postprocess -> outputs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from app.engine.block_manager import BlockManager
from app.engine.config import EngineConfig
from app.engine.decode_attention import use_kernel
from app.engine.decode_graphs import StaticDecoder
from app.engine.host_memory import keep_freed_memory
from app.engine.kv_cache import KVCache
from app.engine.linear_kernels import use_linear_kernel
from app.engine.model import Transformer
from app.engine.native_attention import use_native
from app.engine.native_layer_ops import use_layer_ops
from app.engine.prompts import Prompts
from app.engine.request import FinishReason, InvalidRequest, Task, WrongTaskType
from app.engine.runner import ModelRunner
from app.engine.sampling import SamplingParams
from app.engine.scheduler import ScheduledStep, Scheduler, StepResult
from app.engine.sequence import Output, Sequence
from app.engine.task_prompt import TaskPrompt
from app.engine.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)
HEAD_ONLY = SamplingParams(max_tokens=1)  # tag and classify: one forward, the head's answer, no token


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int  # referenced by a running sequence
    kv_blocks_cached: int  # unreferenced, kept for prefix-cache hits until evicted
    kv_blocks_free: int  # allocatable: never used, or cached (evicted on allocation)
    kv_blocks_total: int
    block_size: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache at admission
    prefix_cache_hits: int  # of those, tokens whose K,V came from cached blocks
    preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    last_batch_tokens: int


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        config = (config or EngineConfig()).for_model(model)  # its context, its device's KV budget
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.linear_kernel = use_linear_kernel(model, config.linear_kernel)
        self.layer_ops = use_layer_ops(model, config.layer_ops)
        weight = model.embed_tokens.weight
        num_blocks = KVCache.blocks_for_budget(model.args, config.block_size, config.kv_cache_bytes, weight.dtype)
        max_blocks_per_seq = -(-config.max_seq_len // config.block_size)
        if num_blocks - 1 < max_blocks_per_seq:  # one block is scratch
            raise ValueError(f"the KV cache budget ({config.kv_cache_bytes} bytes, {num_blocks} blocks of "
                             f"{config.block_size}) holds no sequence of {config.max_seq_len} positions; raise "
                             f"the budget or lower max_seq_len")
        self.cache = KVCache(model.args, num_blocks, config.block_size, weight.device, weight.dtype)
        if self.cache.device.type == "cpu":  # the steps' activations live in host memory
            keep_freed_memory()
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batched_tokens, config.max_num_seqs, tokenizer.eos_ids)
        native = use_native(config.decode_attention, self.cache.device, self.cache.k.dtype, model.args)
        self.runner = ModelRunner(model, self.cache, self._static_decoder(model, config), tokenizer.eos_ids, native)
        self.prompts = Prompts(model, tokenizer.encode, config.prompt_cache_bytes)
        self.on_step: Callable[[int, int], None] | None = None  # (sequences, tokens) after each forward
        self._counters = dict(prompt_tokens_total=0, generation_tokens_total=0, steps_total=0, last_batch_tokens=0)

    def _static_decoder(self, model: Transformer, config: EngineConfig) -> StaticDecoder | None:
        on_cuda = self.cache.device.type == "cuda"
        if config.static_decode is False or (config.static_decode is None and not on_cuda):
            return None
        kernel = use_kernel(config.decode_attention, self.cache.device, self.cache.k.dtype, model.args)
        static = StaticDecoder(model, self.cache, config.max_num_seqs, config.max_seq_len, use_graphs=on_cuda,
                               kernel=kernel)
        if on_cuda:
            static.capture_all()
        return static

    # ---- requests ------------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | TaskPrompt | None, token_ids: list[int], task: Task,
                      sampling: SamplingParams | None = None, timeout_s: float | None = None) -> Sequence:
        """prompt: a name (resolved here to its current version) or an already resolved TaskPrompt (every
        input of one request passes the same object, so they all run one version); None: the bare model.
        sampling: for generate (default: SamplingParams()); tag and classify generate nothing, so theirs is
        not used (the API refuses sampling fields on those routes)."""
        if task != Task.GENERATE:
            sampling = HEAD_ONLY
        elif sampling is None:
            sampling = SamplingParams()
        if isinstance(prompt, str):
            prompt = self.prompts.get(prompt)
        served = Task.GENERATE if prompt is None else prompt.task
        if served != task:
            raise WrongTaskType(f"prompt {prompt.name!r} is a '{served}' prompt, not '{task}'"
                                 if prompt else f"the base model only generates; {task} needs a prompt")
        if not token_ids:
            raise InvalidRequest("the input is empty")
        decoder = IncrementalDecoder(self.tokenizer) if task == Task.GENERATE else None
        seq = Sequence(prompt, list(token_ids), task, sampling, decoder,
                       deadline=None if timeout_s is None else time.monotonic() + timeout_s)
        if seq.total_len > self.config.max_seq_len:  # (the cache holds at least one such sequence)
            raise InvalidRequest(
                f"{seq.prefix_len} virtual + {len(token_ids)} input + "
                f"{seq.sampling.max_tokens if task == Task.GENERATE else 0} new tokens exceed the context "
                f"of {self.config.max_seq_len}; shorten the input or lower max_tokens")
        return seq

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences (in order) for the next steps; their prompts count as just used."""
        self.scheduler.waiting.extend(seqs)
        for seq in seqs:
            if seq.prompt is not None:
                self.prompts.cache.touch(seq.prompt)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def kernels(self) -> str:
        """Which kernels the engine chose at start-up, for the log."""
        static = self.runner.static
        attention = ("native" if self.runner.native is not None else
                     "triton" if static is not None and static.kernel else "sdpa")
        return f"linear {self.linear_kernel}, layer ops {self.layer_ops}, decode attention {attention}"

    @property
    def num_waiting_requests(self) -> int:
        """Requests in the waiting queue: the sequences of one request count once."""
        return len({seq.group for seq in self.scheduler.waiting})

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[Output]:
        """reap cancelled/expired -> schedule -> one forward -> postprocess -> outputs."""
        outputs = self._reap()
        step = self.scheduler.schedule()
        if step.empty:
            return outputs
        result, failed = self._run_isolating_faults(step)
        self._counters["steps_total"] += 1
        self._counters["last_batch_tokens"] = result.num_tokens
        self._counters["prompt_tokens_total"] += sum(n for seq, n in step.prefill if seq not in failed)
        self._counters["generation_tokens_total"] += len(result.tokens)
        if self.on_step is not None:
            self.on_step(len(step.decode) + len(step.prefill), result.num_tokens)
        outputs += [self._finish(seq, FinishReason.ERROR, f"internal error in the engine: {error}")
                    for seq, error in failed.items()]
        for seq in self.scheduler.postprocess(step, result, set(failed)):
            out = seq.take_output()
            if out.finished and seq.head_probs:
                out.probs = torch.cat(seq.head_probs) if seq.task == Task.TAG else seq.head_probs[0]
            outputs.append(out)
        return outputs

    def fail_running(self, error: Exception) -> list[Output]:
        """After a step failed outside the runner (a bug, a device error): end what was running with it."""
        return [self._finish(seq, FinishReason.ERROR, f"internal error in the engine: {error}")
                for seq in list(self.scheduler.running)]

    def _run_isolating_faults(self, step: ScheduledStep) -> tuple[StepResult, dict[Sequence, Exception]]:
        """Run the step; if it fails, run it again in halves, down to the sequences that fail alone, so that
        one request's fault (a bad value, a device error on its row) fails that request and no other.
        Running a part again rewrites the same K,V positions with the same values, and seeded draws depend
        only on (seed, token index): the survivors get exactly what they would have got."""
        try:
            return self.runner.run(step), {}
        except Exception as e:
            seqs = step.sequences
            if len(seqs) == 1:
                log.exception("request %d failed in the engine", seqs[0].request_id)
                return StepResult(), {seqs[0]: e}
            log.warning("a step of %d sequences failed (%s: %s); running it again in halves", len(seqs),
                        type(e).__name__, e)
            first, second = step.halves()
            result, failed = self._run_isolating_faults(first)
            more, more_failed = self._run_isolating_faults(second)
            return result.merge(more), failed | more_failed

    def _reap(self) -> list[Output]:
        now = time.monotonic()
        outputs = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.cancelled:
                outputs.append(self._finish(seq, FinishReason.CANCELLED))
            elif seq.deadline is not None and now > seq.deadline:
                outputs.append(self._finish(seq, FinishReason.TIMEOUT, "the request timed out"))
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> Output:
        self.scheduler.finish(seq)
        return Output(seq.request_id, finished=True, finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                      completion_tokens=len(seq.output_ids), error=error)

    def stats(self) -> EngineStats:
        """Safe from any thread: lengths and counters only, each read at once."""
        blocks = self.blocks
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_used=blocks.num_usable - blocks.num_free,
            kv_blocks_cached=blocks.num_cached_free,
            kv_blocks_free=blocks.num_free,
            kv_blocks_total=blocks.num_usable,
            block_size=blocks.block_size,
            prefix_cache_queries=blocks.query_tokens,
            prefix_cache_hits=blocks.hit_tokens,
            preemptions=self.scheduler.num_preemptions,
            **self._counters,
        )
