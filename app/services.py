"""What the server loads once at start-up: the model, its tokenizer, the engine and the prompt registry."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from app.config import Settings
from app.engine.engine import AsyncEngine, EngineConfig
from app.engine.tokenizer import Tokenizer
from app.engine.weights import LoadedModel, load_model, resolve_dtype

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 2 << 30


@dataclass
class Services:
    settings: Settings
    loaded: LoadedModel
    tokenizer: Tokenizer
    engine: AsyncEngine

    @property
    def model_name(self) -> str:
        return self.loaded.name


def kv_cache_bytes(settings: Settings, device: str) -> int:
    """The configured budget, else 90% of the GPU memory still free after the weights, else 2 GiB."""
    if settings.kv_cache_gb is not None:
        return int(settings.kv_cache_gb * (1 << 30))
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.9)
    return CPU_KV_CACHE_BYTES


def load_services(settings: Settings) -> Services:
    device = settings.resolved_device()
    loaded = load_model(settings.model, resolve_dtype(settings.resolved_dtype()), device, settings.cache_dir)
    tokenizer = Tokenizer(loaded.directory)
    max_seq_len = min(settings.max_seq_len, loaded.args.max_position_embeddings)
    config = EngineConfig(max_seq_len=max_seq_len, kv_cache_bytes=kv_cache_bytes(settings, device),
                          max_batched_tokens=settings.max_batched_tokens, max_waiting=settings.max_waiting)
    engine = AsyncEngine(loaded.model, tokenizer, config)
    log.info("loaded %s on %s (%s); KV cache: %d slots of %d positions", loaded.name, device,
             settings.resolved_dtype(), engine.cache.num_slots, max_seq_len)
    return Services(settings, loaded, tokenizer, engine)
