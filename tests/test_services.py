"""What the server loads at start-up: replicas that start together on one store; the engine's config from the
settings."""
from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.engine.config import CPU_KV_CACHE_BYTES, EngineConfig
from app.engine.weights import base_identity
from app.services import add_example_prompts
from prompt_store.registry import PromptRegistry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"


def test_replicas_starting_together_add_each_example_prompt_once(tmp_path, default_model):
    """Both replicas scanned the empty store; one adds the examples first. The other must find them on disk:
    neither fail its start (a version conflict) nor store them again as v2."""
    base = base_identity(default_model)
    first, second = PromptRegistry(tmp_path, base), PromptRegistry(tmp_path, base)
    add_example_prompts(first, EXAMPLES)
    add_example_prompts(second, EXAMPLES)
    second.refresh()
    assert {info.name: info.versions for info in second.list()} == {"chat": [1], "ner": [1], "spam": [1]}


def test_the_engine_config_comes_from_the_settings_names_and_units(monkeypatch):
    """SOFTSERVE_* variables keep their names and units; Settings.engine is the engine's config in its own."""
    for name, value in {"SOFTSERVE_MAX_SEQ_LEN": "512", "SOFTSERVE_KV_CACHE_GB": "0.5", "SOFTSERVE_PROMPT_CACHE_MB": "2",
                        "SOFTSERVE_CUDA_GRAPHS": "false", "SOFTSERVE_BLOCK_SIZE": "32", "SOFTSERVE_MAX_WAITING": "7",
                        "SOFTSERVE_DECODE_ATTENTION": "sdpa"}.items():
        monkeypatch.setenv(name, value)
    assert Settings().engine == EngineConfig(max_seq_len=512, kv_cache_bytes=1 << 29, prompt_cache_bytes=2 << 20,
                                             static_decode=False, block_size=32, max_waiting=7, decode_attention="sdpa")
    monkeypatch.delenv("SOFTSERVE_KV_CACHE_GB")
    monkeypatch.delenv("SOFTSERVE_CUDA_GRAPHS")
    engine = Settings().engine
    assert (engine.kv_cache_bytes, engine.static_decode) == (None, None)  # measured; CUDA graphs where there is CUDA


def test_an_engine_for_a_model_keeps_to_its_context_and_measures_an_unset_budget(tiny_llama):
    """The server and LLM alike: max_seq_len bounded by the model's context, no budget: 2 GiB on CPU."""
    _, loaded = tiny_llama
    config = EngineConfig(max_seq_len=100_000).for_model(loaded.model)
    assert (config.max_seq_len, config.kv_cache_bytes) == (loaded.args.max_context, CPU_KV_CACHE_BYTES)
    assert EngineConfig(max_seq_len=64, kv_cache_bytes=1 << 20).for_model(loaded.model).kv_cache_bytes == 1 << 20
