"""`LLM`: the engine without the server, for scripts, notebooks, tests and the bench.

    from app import LLM

    with LLM("default") as llm:
        print(llm.generate(["The capital of France is"], max_tokens=8)[0].text)
        llm.load_prompt("examples/prompts/spam.safetensors")
        print(llm.classify(["WIN A FREE CRUISE"], prompt="spam")[0].probs)

It starts the engine's thread, runs each call's requests to their ends on a private event loop and shuts
the engine down on close(). Calls block; one LLM is used from one thread.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from app.engine.config import DEFAULT_CACHE_DIR, EngineConfig
from app.engine.engine import AsyncEngine
from app.engine.model import Transformer
from app.engine.sampling import SamplingParams
from app.engine.sequence import Output
from app.engine.task_prompt import TaskPrompt
from app.engine.tokenizer import Tokenizer
from app.engine.weights import LoadedModel, load_model, resolve_device, resolve_dtype
from app.own_thread import run_in_own_thread
from prompt_store.format import PromptFile, Task, load_prompt_file

class LLM:
    def __init__(self, model: str = "default", *, device: str = "auto", dtype: str = "auto",
                 cache_dir: Path = DEFAULT_CACHE_DIR, config: EngineConfig | None = None):
        """model: 'default', an HF model directory or a .gguf file, loaded as the server loads it.
        config: the engine's (default: EngineConfig()), its max_seq_len within the model's context and, unless
        set, the KV budget measured on the device as the server measures it."""
        device = resolve_device(device)

        def load() -> AsyncEngine:  # in a thread that ends with it, so that only the engine's thread keeps
            # an OpenMP pool (app/own_thread.py says why)
            self.loaded = load_model(model, resolve_dtype(dtype, device), device, cache_dir)
            return AsyncEngine(self.loaded.model, Tokenizer(self.loaded.directory), config)

        self.loaded: LoadedModel | None = None
        self._start(run_in_own_thread(load))

    @classmethod
    def from_model(cls, model: Transformer, tokenizer, config: EngineConfig | None = None) -> LLM:
        """Over a model already in memory (a test's fixture, the bench's random-weight shapes)."""
        llm = cls.__new__(cls)
        llm.loaded = None
        llm._start(AsyncEngine(model, tokenizer, config))
        return llm

    def _start(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        engine.start()

    # ---- prompts -------------------------------------------------------------------------------------
    def load_prompt(self, prompt: PromptFile | str | Path) -> TaskPrompt:
        """Serve a prompt file (or a PromptFile) under its name."""
        return self.engine.load_prompt(prompt if isinstance(prompt, PromptFile) else load_prompt_file(prompt))

    # ---- requests ------------------------------------------------------------------------------------
    def generate(self, inputs: list[str | list[int]], prompt: str | None = None, **sampling) -> list[Output]:
        """One request with these inputs (texts are tokenized as they are, without a chat template);
        sampling: SamplingParams' fields (max_tokens, temperature, top_p, seed, stop, ...)."""
        return self._one_request(prompt, inputs, Task.GENERATE, SamplingParams(**sampling))

    def tag(self, inputs: list[str | list[int]], prompt: str) -> list[Output]:
        """Per input token, the probability of each of the prompt's labels (Output.probs)."""
        return self._one_request(prompt, inputs, Task.TAG)

    def classify(self, inputs: list[str | list[int]], prompt: str) -> list[Output]:
        """Per input, the probability of each of the prompt's labels (Output.probs)."""
        return self._one_request(prompt, inputs, Task.CLASSIFY)

    def run(self, requests: list[tuple[str | None, list[int], Task, SamplingParams | None]]) -> list[Output]:
        """Separate requests, (prompt name or None, token ids, task, sampling) each, submitted at once."""
        async def all_of_them():
            seqs = [self.engine.make_sequence(*request) for request in requests]
            return await asyncio.gather(*(self.engine.run_to_end(seq) for seq in seqs))

        return list(self._loop.run_until_complete(all_of_them()))

    def _one_request(self, prompt: str | None, inputs: list[str | list[int]], task: Task,
                     params: SamplingParams | None = None) -> list[Output]:
        ids = [self.engine.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        prompt_now = self.engine.get_prompt(prompt)  # every input runs the same version
        seqs = [self.engine.make_sequence(prompt_now, i, task, params) for i in ids]
        return self._loop.run_until_complete(self.engine.run_group(seqs))

    # ---- shutting down -------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.engine.shutdown(grace_s=0))
            self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
