"""AsyncEngine: submit a request, get an async stream of outputs; one loop serves every task together.

The loop runs in its own thread, so a long forward never blocks the event loop (health checks, uploads).
`step()` is the one place the scheduler, the runner and the outputs meet:
reap cancelled/expired -> schedule -> write new prefixes -> one forward -> tokens, heads -> outputs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

import torch

from app.engine.decode_attention import use_kernel
from app.engine.decode_graphs import StaticDecoder
from app.engine.block_manager import BlockManager
from app.engine.config import EngineConfig
from app.engine.kv_cache import KVCache
from app.engine.linear_kernels import use_linear_kernel
from app.engine.model import Transformer
from app.engine.prompt_table import PromptEntry, PromptTable
from app.engine.runner import ModelRunner
from app.engine.sampling import SamplingParams
from app.engine.scheduler import Overloaded, ScheduledStep, Scheduler, StepResult
from app.engine.sequence import Output, Sequence, Status
from app.engine.task_prompt import TaskPrompt, build_task_prompt, check_servable
from app.engine.tokenizer import IncrementalDecoder, Tokenizer
from prompt_store.format import PromptFile, PromptFormatError, Task
from prompt_store.registry import PromptNotFound  # one class: the store's and the engine's lookups answer 404 alike

log = logging.getLogger(__name__)
T = TypeVar("T")
HEAD_ONLY = SamplingParams(max_tokens=1)  # tag and classify: one forward, the head's answer, no token
PINNED_KEPT = 8  # older prompt versions kept built for requests that pin them

__all__ = ["AsyncEngine", "EngineConfig", "EngineStats", "InvalidRequest", "Overloaded", "PromptNotFound",
           "ShuttingDown", "WrongTaskType"]


class InvalidRequest(ValueError):
    """The request cannot be served as asked (too long for the context, empty input)."""


class WrongTaskType(InvalidRequest):
    """The named prompt serves another kind of task than the route asked for."""


class ShuttingDown(RuntimeError):
    """The engine stopped admitting requests: the server is draining."""


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


class _Stream:
    """Delivery of one sequence's outputs to the event loop that awaits them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()


class AsyncEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        config = (config or EngineConfig()).for_model(model)  # its context, its device's KV budget
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.linear_kernel = use_linear_kernel(model, config.linear_kernel)
        weight = model.embed_tokens.weight
        num_blocks = KVCache.blocks_for_budget(model.args, config.block_size, config.kv_cache_bytes, weight.dtype)
        max_blocks_per_seq = -(-config.max_seq_len // config.block_size)
        if num_blocks - 1 < max_blocks_per_seq:  # one block is scratch
            raise ValueError(f"the KV cache budget ({config.kv_cache_bytes} bytes, {num_blocks} blocks of "
                             f"{config.block_size}) holds no sequence of {config.max_seq_len} positions; raise "
                             f"the budget or lower max_seq_len")
        self.cache = KVCache(model.args, num_blocks, config.block_size, weight.device, weight.dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_batched_tokens, config.max_num_seqs, tokenizer.eos_ids)
        self.runner = ModelRunner(model, self.cache, self._static_decoder(model, config), tokenizer.eos_ids)
        self.prompts = PromptTable(config.prompt_cache_bytes)
        self._pinned: dict[tuple, TaskPrompt] = {}  # (name, version, digest) -> older versions asked for by number
        self._streams: dict[int, _Stream] = {}
        self._seqs: dict[int, Sequence] = {}
        self._incoming: list[Sequence] = []
        self._waiting_requests = 0  # requests in the scheduler's waiting queue, as the engine thread last saw
        self._lock = threading.Lock()  # guards _incoming and the waiting count seen by submitters
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False  # no new requests
        self._thread_stop = False  # the loop thread ends
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []  # for the engine thread (prompt changes)
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

    # ---- prompts -------------------------------------------------------------------------------------
    def check_prompt(self, prompt_file: PromptFile) -> TaskPrompt:
        """Refuse, before it is stored, a prompt this engine could not serve (ValueError): label words the LM
        head cannot tell apart, or values that give non-finite outputs. Runs a forward (the prompt's prefix, then
        a probe input): call it off the event loop, and only on a prompt the store has validated. Returns the
        built prompt, which `adopt_prompt` serves once it is stored."""
        return check_servable(self.model, prompt_file, self.tokenizer.encode)

    def follow_stored(self, name: str, current: Callable[[], tuple[int, str] | None],
                      read: Callable[[int], PromptFile]) -> None:
        """Serve what the store holds under `name` now: `current()` gives its (version, digest), None when it
        is gone; `read(version)` its file, on first use. `current()` is called on the engine thread, which runs
        these calls one at a time, so notices of store changes that arrive out of order still leave the engine
        on the store's latest state. Requests already admitted keep their version."""
        def follow() -> None:
            stored = current()
            entry = self.prompts.entry(name)
            if stored is None:
                self.prompts.remove(name)
            elif entry is None or (entry.version, entry.digest) != stored:
                version, digest = stored
                self.prompts.register(PromptEntry(name, version, digest, lambda: read(version)))

        self._on_engine_thread(follow)

    def register_prompt(self, name: str, version: int, digest: str, read: Callable[[], PromptFile]) -> None:
        """Serve this version of a stored prompt from the next request on; its file is read and its prefix
        computed on first use. Requests already admitted keep their version."""
        self.follow_stored(name, lambda: (version, digest), lambda _version: read())

    def adopt_prompt(self, prompt: TaskPrompt) -> None:
        """Serve a prompt built by `check_prompt` (as stored: its version and digest) instead of building it again
        on first use, if that version is the one its name serves; otherwise (another replica's newer version was
        picked up meanwhile, or the name was deleted) nothing changes."""
        def adopt() -> None:
            entry = self.prompts.entry(prompt.name)
            if entry is not None and entry.loaded is None and (entry.version, entry.digest) == (
                    prompt.version, prompt.digest):
                entry.loaded = prompt
                self.prompts.mark_loaded(entry)

        self._on_engine_thread(adopt)

    def load_prompt(self, prompt_file: PromptFile) -> TaskPrompt:
        """Serve this prompt (its prefix computed now, unless this version is already loaded)."""
        def load() -> TaskPrompt:
            pf = prompt_file
            entry = self.prompts.entry(pf.name)
            if entry is None or (entry.version, entry.digest) != (pf.version, pf.digest) or not pf.version:
                entry = PromptEntry(pf.name, pf.version, pf.digest, lambda: pf)
                self.prompts.register(entry)
            return self._loaded(entry)

        return self._on_engine_thread(load)

    def pinned_prompt(self, prompt_file: PromptFile) -> TaskPrompt:
        """A stored version asked for by number (`name@3`): the served one if it is that version, else built
        (kept for the next request pinning it, up to PINNED_KEPT versions) without changing which version the
        name serves. Runs on the engine thread: call it off the event loop."""
        key = (prompt_file.name, prompt_file.version, prompt_file.digest)

        def build() -> TaskPrompt:
            entry = self.prompts.entry(prompt_file.name)
            if entry is not None and (entry.version, entry.digest) == key[1:]:
                return self._loaded(entry)
            if key not in self._pinned:
                if len(self._pinned) >= PINNED_KEPT:
                    self._pinned.pop(next(iter(self._pinned)))
                self._pinned[key] = build_task_prompt(self.model, prompt_file, self.tokenizer.encode)
            return self._pinned[key]

        return self._on_engine_thread(build)

    def remove_prompt(self, name: str) -> None:
        self._on_engine_thread(lambda: self.prompts.remove(name))

    def _loaded(self, entry: PromptEntry) -> TaskPrompt:
        """On the engine thread: the entry's prompt, read and its prefix computed if it is not loaded."""
        if entry.loaded is None:
            pf = entry.read()
            try:
                entry.loaded = build_task_prompt(self.model, pf, self.tokenizer.encode)
            except ValueError as e:  # e.g. a file put in the store by hand with labels the LM head cannot score
                raise PromptFormatError(f"prompt {entry.name!r} cannot be served: {e}") from e
            self.prompts.mark_loaded(entry)  # others may be unloaded to fit the budget
        return entry.loaded

    def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run fn between two steps of the engine thread and return its result; inline when no engine thread
        runs (before start, after shutdown) or when called from it."""
        with self._lock:
            inline = self._thread is None or self._thread_stop or threading.current_thread() is self._thread
            if not inline:
                done: concurrent.futures.Future = concurrent.futures.Future()
                self._calls.append((fn, done))
        if inline:
            return fn()
        self._wake.set()
        return done.result()

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, done in calls:
            try:
                done.set_result(fn())
            except Exception as e:  # the caller gets it
                done.set_exception(e)

    def get_prompt(self, name: str | None) -> TaskPrompt | None:
        """The current version of a prompt, for a new request (None: the bare model). A prompt not loaded is
        loaded on the engine thread, which waits for the step in progress: call it off the event loop unless
        `prompt_is_loaded` says it is."""
        if name is None:
            return None
        loaded = self.prompts.use(name)
        if loaded is not None:
            return loaded
        if self.prompts.entry(name) is None:
            raise PromptNotFound(f"no prompt named {name!r}; GET /v1/prompts lists them")

        def load() -> TaskPrompt:
            entry = self.prompts.entry(name)
            if entry is None:  # removed meanwhile
                raise PromptNotFound(f"no prompt named {name!r}; GET /v1/prompts lists them")
            return self._loaded(entry)

        return self._on_engine_thread(load)

    def prompt_is_loaded(self, name: str | None) -> bool:
        entry = None if name is None else self.prompts.entry(name)
        return name is None or (entry is not None and entry.loaded is not None)

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
            prompt = self.get_prompt(prompt)
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

    def _submit(self, seqs: list[Sequence]) -> list[_Stream]:
        """Queue the sequences of one request together, or refuse them all. The queue limit counts
        requests, not sequences: a call with 48 inputs takes one place, as a call with one input does."""
        loop = asyncio.get_running_loop()
        streams = [_Stream(loop) for _ in seqs]
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            queued = self._waiting_requests + len({seq.group for seq in self._incoming})
            if queued >= self.config.max_waiting:
                raise Overloaded(f"the server is at capacity ({self.config.max_waiting} requests waiting); "
                                 f"retry later")
            for seq, stream in zip(seqs, streams):
                seq.group = seqs[0].request_id
                self._streams[seq.request_id] = stream
                self._seqs[seq.request_id] = seq
            self._incoming.extend(seqs)
        self._wake.set()
        return streams

    async def stream(self, seq: Sequence) -> AsyncIterator[Output]:
        """Submit and yield outputs until the last; leaving early (client gone) cancels the request."""
        stream, = self._submit([seq])
        finished = False
        try:
            while not finished:
                output = await stream.queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(seq.request_id)

    async def run_group(self, seqs: list[Sequence]) -> list[Output]:
        """Run the sequences of one request (admitted together, batched together) to their ends. Raises
        Overloaded or ShuttingDown before anything runs; if the caller is cancelled, all of them are."""
        streams = self._submit(seqs)
        try:
            return list(await asyncio.gather(*(_collect(seq, stream) for seq, stream in zip(seqs, streams))))
        finally:
            for seq in seqs:
                if seq.status != Status.FINISHED:
                    self.abort(seq.request_id)

    async def run_to_end(self, seq: Sequence) -> Output:
        """Collect one request into one Output (text and tokens concatenated)."""
        return (await self.run_group([seq]))[0]

    def abort(self, request_id: int) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            seq.cancelled = True
            self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting; let running requests finish for up to grace_s, then cancel the rest."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + grace_s
        while self._seqs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._seqs):
            self.abort(request_id)
        while self._seqs and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        with self._lock:
            self._thread_stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    def _loop(self) -> None:
        while not self._thread_stop:
            try:
                self._run_calls()
                outputs = self._iterate()
            except Exception as e:  # a bug or a device error must not kill the engine: fail what ran
                log.exception("engine step failed")
                outputs = [self._finish(seq, "error", error=f"internal error in the engine: {e}")
                           for seq in list(self.scheduler.running)]
            self._deliver(outputs)
        self._run_calls()  # queued before the stop: nobody runs them after this thread

    def _iterate(self) -> list[Output]:
        """Take in what was submitted, run one step if there is work, else wait for some."""
        with self._lock:  # the bound was checked at submit
            self.scheduler.waiting.extend(self._incoming)
            self._incoming = []
            self._count_waiting_requests()
        if not self.scheduler.has_work:
            self._wake.wait(0.5)
            self._wake.clear()
            return []
        outputs = self.step()
        self._count_waiting_requests()
        return outputs

    def _count_waiting_requests(self) -> None:
        """On the engine thread: what submitters compare with the queue limit (they never read the queue)."""
        self._waiting_requests = len({seq.group for seq in self.scheduler.waiting})

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
        outputs += [self._finish(seq, "error", error=f"internal error in the engine: {error}")
                    for seq, error in failed.items()]
        for seq in self.scheduler.postprocess(step, result, set(failed)):
            out = seq.take_output()
            if out.finished:
                self._seqs.pop(seq.request_id, None)
                if seq.head_probs:
                    out.probs = torch.cat(seq.head_probs) if seq.task == Task.TAG else seq.head_probs[0]
            outputs.append(out)
        return outputs

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
                outputs.append(self._finish(seq, "cancelled"))
            elif seq.deadline is not None and now > seq.deadline:
                outputs.append(self._finish(seq, "timeout", error="the request timed out"))
        return outputs

    def _finish(self, seq: Sequence, reason: str, text: str = "", probs=None, error=None) -> Output:
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        return Output(seq.request_id, text, finished=True, finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                      completion_tokens=len(seq.output_ids), probs=probs, error=error)

    def _deliver(self, outputs: list[Output]) -> None:
        """One hand-over per event loop per step (not one per output: a step of 200 rows would otherwise wake
        the loop 200 times and fight it for the GIL)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Output]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream.queue, output))
            if output.finished:
                del self._streams[output.request_id]
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def stats(self) -> EngineStats:
        running = list(self.scheduler.running)
        blocks = self.blocks
        cached = blocks.num_cached_free
        return EngineStats(
            waiting=len(self.scheduler.waiting) + len(self._incoming),
            running=len(running),
            kv_blocks_used=blocks.num_usable - blocks.num_free,
            kv_blocks_cached=cached,
            kv_blocks_free=blocks.num_free,
            kv_blocks_total=blocks.num_usable,
            block_size=blocks.block_size,
            prefix_cache_queries=blocks.query_tokens,
            prefix_cache_hits=blocks.hit_tokens,
            preemptions=self.scheduler.num_preemptions,
            **self._counters,
        )


async def _collect(seq: Sequence, stream: _Stream) -> Output:
    """One sequence's outputs concatenated into one, once it finished."""
    total = Output(seq.request_id)
    while not total.finished:
        out = await stream.queue.get()
        total.text += out.text
        total.tokens += out.tokens
        total.finished, total.finish_reason, total.error = out.finished, out.finish_reason, out.error
        total.prompt_tokens, total.completion_tokens, total.probs = out.prompt_tokens, out.completion_tokens, out.probs
        total.prompt_logprobs = total.prompt_logprobs or out.prompt_logprobs
    return total


def _put_all(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
