"""Shared fixtures: the default model (fetched once into the cache), tiny random Llama/Qwen2 checkpoints, and
a module's live server (`server`, with the module's SERVER_SETTINGS), an HTTP client on it and its base."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from app.engine.tokenizer import Tokenizer
from app.engine.weights import LoadedModel, load_hf_directory, load_model
from tests.live_server import LiveServer, env_settings

CACHE_DIR = env_settings().cache_dir  # SOFTSERVE_CACHE_DIR, else the default

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """A real server process for the test module, with its SERVER_SETTINGS (SOFTSERVE_* variables) if any."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    with LiveServer(tmp_path_factory.mktemp(name) / "store", getattr(request.module, "SERVER_SETTINGS", None)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def base(client) -> dict:
    """The server's base model identity, which prompt files must match."""
    return client.get("/v1/prompts").json()["base"]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


@pytest.fixture(scope="session")
def default_model(cache_dir) -> LoadedModel:
    return load_model("default", torch.float32, "cpu", cache_dir)


@pytest.fixture(scope="session")
def tokenizer(default_model) -> Tokenizer:
    return Tokenizer(default_model.directory)


def make_tiny_hf(arch: str, directory: Path, tokenizer: Tokenizer | None = None, seed: int = 0, **overrides):
    """A tiny random HF checkpoint (GQA: 4 heads, 2 KV heads) saved as an HF directory; returns the HF model."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(seed)
    config = config_cls(**(TINY | overrides), tie_word_embeddings=arch == "qwen2", pad_token_id=2,
                        eos_token_id=2, bos_token_id=1)
    hf = model_cls(config).eval()
    hf.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer):
    """(HF model, our LoadedModel) over the same tiny random Llama weights, with the default tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf = make_tiny_hf("llama", directory, tokenizer)
    return hf, load_hf_directory(directory, torch.float32, "cpu", "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    hf = make_tiny_hf("qwen2", directory, tokenizer, seed=1)
    return hf, load_hf_directory(directory, torch.float32, "cpu", "tiny-qwen2")
