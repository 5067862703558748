"""AsyncEngine: submit a request, get an async stream of outputs; one loop serves every task together.

The synchronous engine (LLMEngine, app/engine/llm_engine.py) steps in a thread of its own, so a long forward
never blocks the event loop (health checks, uploads). This wrapper owns that thread, the requests' streams
and the hand-over of outputs to the event loops that await them; everything that changes the engine's state
(new sequences, prompt builds and removals) runs on that thread, between two steps. Other threads only read:
`stats()` and the prompt cache (`prompts`, app/engine/prompt_cache.py says which reads are safe).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import AsyncIterator, Callable, TypeVar

from app.engine.config import EngineConfig
from app.engine.llm_engine import EngineStats, LLMEngine
from app.engine.model import Transformer
from app.engine.request import Overloaded, PromptNotFound, ShuttingDown, Task
from app.engine.sampling import SamplingParams
from app.engine.sequence import Output, Sequence, Status
from app.engine.task_prompt import TaskPrompt
from app.engine.tokenizer import Tokenizer
from prompt_store.format import PromptFile

log = logging.getLogger(__name__)
T = TypeVar("T")

BURST_QUIET_S = 0.005
BURST_WINDOW_S = 0.05

__all__ = ["AsyncEngine", "EngineConfig", "EngineStats"]  # the config and stats re-exported for its users


class _Stream:
    """Delivery of one sequence's outputs to the event loop that awaits them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()


class AsyncEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.core = LLMEngine(model, tokenizer, config)
        self.tokenizer, self.config = tokenizer, self.core.config
        self.prompts = self.core.prompts.cache  # for reads from any thread; changed on the engine thread only
        self._streams: dict[int, _Stream] = {}
        self._seqs: dict[int, Sequence] = {}  # submitted and not finished: for abort and the drain
        self._incoming: list[Sequence] = []
        self._waiting_requests = 0  # requests in the scheduler's waiting queue, as the engine thread last saw
        self._lock = threading.Lock()  # guards _incoming, _calls and the waiting count seen by submitters
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False  # no new requests
        self._thread_stop = False  # the loop thread ends
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []  # for the engine thread (prompt changes)

    # ---- prompts (app/engine/prompts.py), built and changed on the engine thread ------------------------
    def check_prompt(self, prompt_file: PromptFile) -> TaskPrompt:
        """Refuse, before it is stored, a prompt this engine could not serve (ValueError); returns it built, for
        `adopt_prompt` (Prompts.check). Its forward runs on the engine thread between two steps, never beside
        one: call it off the event loop."""
        return self._on_engine_thread(lambda: self.core.prompts.check(prompt_file))

    def follow_stored(self, name: str, current: Callable[[], tuple[int, str] | None],
                      read: Callable[[int], PromptFile]) -> None:
        """Serve what the store holds under `name` now (Prompts.follow). `current()` is called on the engine
        thread, which runs these calls one at a time, so notices of store changes that arrive out of order
        still leave the engine on the store's latest state."""
        self._on_engine_thread(lambda: self.core.prompts.follow(name, current, read))

    def register_prompt(self, name: str, version: int, digest: str, read: Callable[[], PromptFile]) -> None:
        """Serve this version of a stored prompt from the next request on; its file is read and its prefix
        computed on first use. Requests already admitted keep their version."""
        self.follow_stored(name, lambda: (version, digest), lambda _version: read())

    def adopt_prompt(self, prompt: TaskPrompt) -> None:
        """Serve a prompt built by `check_prompt`, now stored (Prompts.adopt): its first request builds nothing."""
        self._on_engine_thread(lambda: self.core.prompts.adopt(prompt))

    def load_prompt(self, prompt_file: PromptFile) -> TaskPrompt:
        return self._on_engine_thread(lambda: self.core.prompts.load(prompt_file))

    def built_prompt(self, name: str, version: int, digest: str) -> TaskPrompt | None:
        """This stored version if it is built (Prompts.built): a pinned or split request's fast path, which
        neither reads the file nor waits for the engine thread."""
        return self.core.prompts.built(name, version, digest)

    def pinned_prompt(self, read: Callable[[], PromptFile]) -> TaskPrompt:
        """A stored version asked for by number, `read()` its file (Prompts.pinned). Waits for the engine
        thread: call it off the event loop."""
        return self._on_engine_thread(lambda: self.core.prompts.pinned(read))

    def remove_prompt(self, name: str) -> None:
        self._on_engine_thread(lambda: self.core.prompts.remove(name))

    def get_prompt(self, name: str | None) -> TaskPrompt | None:
        """The current version of a prompt, for a new request (None: the bare model). A prompt not built is
        built on the engine thread, which waits for the step in progress: call it off the event loop unless
        `prompt_is_loaded` says it is built."""
        if name is None:
            return None
        built = self.prompts.built_current(name)
        if built is not None:
            return built
        if name not in self.prompts:
            raise PromptNotFound(f"no prompt named {name!r}; GET /v1/prompts lists them")
        return self._on_engine_thread(lambda: self.core.prompts.get(name))

    def prompt_is_loaded(self, name: str | None) -> bool:
        return name is None or self.prompts.built_current(name) is not None

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

    # ---- requests ------------------------------------------------------------------------------------
    def make_sequence(self, prompt: str | TaskPrompt | None, token_ids: list[int], task: Task,
                      sampling: SamplingParams | None = None, timeout_s: float | None = None) -> Sequence:
        """LLMEngine.make_sequence, a prompt name resolved through get_prompt (loaded on the engine thread)."""
        if isinstance(prompt, str):
            prompt = self.get_prompt(prompt)
        return self.core.make_sequence(prompt, token_ids, task, sampling, timeout_s)

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

    def stats(self) -> EngineStats:
        """Safe from any thread (LLMEngine.stats), requests not yet taken in counted as waiting."""
        stats = self.core.stats()
        return dataclasses.replace(stats, waiting=stats.waiting + len(self._incoming))

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
                outputs = self.core.fail_running(e)
            self._deliver(outputs)
        self._run_calls()  # queued before the stop: nobody runs them after this thread

    def _iterate(self) -> list[Output]:
        """Take in what was submitted, run one step if there is work, else wait for some."""
        burst = bool(self._incoming) and not self.core.has_work
        if burst:
            self._let_burst_arrive()
        with self._lock:  # the bound was checked at submit
            # A burst that found the engine idle starts shortest prompt first (stable: equal lengths keep their
            # order). Its requests arrived within BURST_WINDOW_S of one another, so none waits behind one that came
            # noticeably later; but when the burst's prompts need more than one step, more of them get their first
            # token in the first step (shortest first minimises the mean wait), and the last still ends the prefill
            # when it would have. Requests that arrive while the engine works queue in arrival order.
            self.core.add(sorted(self._incoming, key=lambda seq: seq.prefill_target) if burst else self._incoming)
            self._incoming = []
            self._waiting_requests = self.core.num_waiting_requests
        if not self.core.has_work:
            self._wake.wait(0.5)
            self._wake.clear()
            return []
        outputs = self.core.step()
        self._waiting_requests = self.core.num_waiting_requests
        return outputs

    def _let_burst_arrive(self) -> None:
        """An idle engine that just got a request waits while more keep arriving (at most BURST_WINDOW_S, until
        BURST_QUIET_S pass without one), so that a burst of clients starts in one step. Otherwise the first
        few would start a step alone, and on a CPU that step's threads slow the parsing and tokenizing of the
        rest, which then wait for it to end: first tokens for most of the burst a step later."""
        deadline = time.monotonic() + BURST_WINDOW_S
        while time.monotonic() < deadline:
            self._wake.clear()
            if not self._wake.wait(BURST_QUIET_S):
                return

    def _deliver(self, outputs: list[Output]) -> None:
        """One hand-over per event loop per step (not one per output: a step of 200 rows would otherwise wake
        the loop 200 times and fight it for the GIL)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Output]]] = {}
        for output in outputs:
            if output.finished:
                self._seqs.pop(output.request_id, None)
                stream = self._streams.pop(output.request_id, None)
            else:
                stream = self._streams.get(output.request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)


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
