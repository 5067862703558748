"""What the server loads once at start-up: the model, its tokenizer, the engine and the prompt registry."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.encoder import TextEncoder
from app.engine.engine import AsyncEngine
from app.engine.tokenizer import Tokenizer
from app.engine.grammar import Grammars
from app.engine.weights import LoadedModel, base_identity, load_model, served_model_id
from app.finetune import FineTuning, open_fine_tuning
from app.grammars import GrammarCompiler
from prompt_store.format import PromptFile, load_prompt_file
from prompt_store.registry import PromptExists, PromptRegistry

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    loaded: LoadedModel
    tokenizer: Tokenizer
    engine: AsyncEngine
    registry: PromptRegistry
    encoder: TextEncoder  # tokenizes off the event loop
    grammars: GrammarCompiler  # compiles structured output's grammars off the event loop and the engine thread
    fine_tuning: FineTuning  # /v1/files and /v1/fine_tuning/jobs; its worker starts with the engine
    model_id: str  # the base model's id in the API (/v1/models, metrics), `base` its alias

    @property
    def model_name(self) -> str:
        return self.loaded.name


def connect_registry(registry: PromptRegistry, engine: AsyncEngine, interval_s: float) -> None:
    """Serve every stored prompt (each loaded on first use), follow the store's changes (ours and other
    replicas'), keep watching."""
    def follow(event: str, name: str, version: int) -> None:
        # Not the notice's version: notices of one name may arrive out of order (an upload's and the watcher's),
        # so the engine takes the store's state when it applies each one, and the last leaves it on the latest.
        engine.follow_stored(name, lambda: registry.current(name), lambda stored: registry.get(name, stored))

    registry.subscribe(follow)
    for info in registry.list():
        follow("added", info.name, info.version)
    registry.start_watching(interval_s)


def add_example_prompts(registry: PromptRegistry, directory: Path) -> None:
    """The shipped example prompts, each added once when its name is free and it fits this base model.
    Replicas sharing a store start together: one of them adds each example, the others find it there."""
    for path in sorted(directory.glob("*.safetensors")):
        example: PromptFile = load_prompt_file(path)
        if example.name in registry:
            continue
        if mismatch := example.base.mismatch(registry.base):
            log.info("example prompt %s is not for this model (%s)", example.name, mismatch)
            continue
        try:
            registry.add(example, replace=False)
        except PromptExists:  # another replica added it since this one scanned the store (or at the same moment)
            log.info("example prompt %s was added by another replica", example.name)


def load_services(settings: Settings) -> Services:
    device = settings.resolved_device()
    loaded = load_model(settings.model, settings.resolved_dtype(), device, settings.cache_dir,
                        settings.weights_read_timeout_s)
    tokenizer = Tokenizer(loaded.directory)
    engine = AsyncEngine(loaded.model, tokenizer, settings.engine)
    max_seq_len = engine.config.max_seq_len  # within the model's context
    registry = PromptRegistry(settings.prompt_store, base_identity(loaded), settings.max_virtual_tokens)
    if settings.example_prompts:
        add_example_prompts(registry, settings.example_prompts_dir)
    connect_registry(registry, engine, settings.watch_interval_s)
    log.info("loaded %s on %s (%s); KV cache: %d blocks of %d positions; context %d; kernels: %s", loaded.name,
             device, str(settings.resolved_dtype()).removeprefix("torch."), engine.core.blocks.num_usable,
             settings.block_size, max_seq_len, engine.core.kernels)
    grammars = GrammarCompiler(lambda: Grammars(tokenizer.hf, loaded.args.vocab_size), settings.grammar_compile_threads,
                               settings.grammar_max_pending, int(settings.grammar_cache_mb * (1 << 20)))
    model_id = served_model_id(settings.served_model_name, settings.model, loaded.directory, loaded.name)
    return Services(settings, loaded, tokenizer, engine, registry,
                    TextEncoder(tokenizer, max_seq_len, settings.tokenizer_threads), grammars,
                    open_fine_tuning(settings, registry), model_id)
