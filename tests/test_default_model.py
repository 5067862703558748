"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our engine's greedy tokens equal
transformers' greedy tokens for the same prompt, with transformers reading the GGUF itself."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from app import LLM
from app.engine.engine import EngineConfig
from app.engine.weights import DEFAULT_GGUF


def test_default_model_shape(default_model):
    a = default_model.args
    assert (a.architecture, a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == \
        ("llama", 576, 30, 9, 3, 64, 49152)
    assert a.tie_word_embeddings and a.rope_theta == 100000.0


def test_greedy_matches_transformers_reading_the_gguf(default_model, tokenizer, cache_dir):
    gguf = cache_dir / "default" / DEFAULT_GGUF.split("/")[-1]
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Give me two tips for sleeping well.", "Spell 'cat' backwards."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]

    with LLM.from_model(default_model.model, tokenizer, EngineConfig(max_seq_len=256, kv_cache_bytes=1 << 28)) as llm:
        outputs = llm.generate(prompts, max_tokens=24, temperature=0)  # all three in one batch
    for ids, out in zip(prompts, outputs):
        want = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        got = [t.token_id for t in out.tokens]
        assert got == want[:len(got)]
        assert len(got) == len(want) or out.finish_reason == "stop"
    assert outputs[0].text == "The capital of France is Paris."
