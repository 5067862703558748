"""`from app import LLM`: the engine without the server, on the default model and the shipped prompts."""
from pathlib import Path

import pytest

from app import LLM
from app.engine.engine import EngineConfig
from app.engine.request import PromptNotFound
from prompt_store.format import load_prompt_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts"


@pytest.fixture(scope="module")
def llm(cache_dir):
    with LLM("default", cache_dir=cache_dir, config=EngineConfig(max_seq_len=256, kv_cache_bytes=1 << 26)) as llm:
        yield llm


def test_generate_takes_texts_and_token_ids(llm):
    ids = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    text, tokens = llm.generate(["The capital of France is", ids], max_tokens=8, temperature=0)
    assert text.completion_tokens == 8 and text.finish_reason == "length"
    assert tokens.text.startswith("The capital of France is Paris.")


def test_prompts_load_from_a_path_or_a_prompt_file(llm):
    llm.load_prompt(EXAMPLES / "spam.safetensors")
    llm.load_prompt(load_prompt_file(EXAMPLES / "ner.safetensors"))
    spam, ham = llm.classify(["Congratulations! You have won a $500 gift card. Claim your prize now by replying "
                              "with your bank details.", "Hi Sam, the team meeting moved to Thursday at 10am. See "
                              "you there. Anna"], prompt="spam")  # the README's example
    assert spam.probs.shape == ham.probs.shape == (2,)  # ham, spam
    assert spam.probs.argmax() == 1 and ham.probs.argmax() == 0
    tags, = llm.tag(["Ada Lovelace joined Acme Corp in London."], prompt="ner")
    assert tags.probs.shape == (len(llm.engine.tokenizer.encode("Ada Lovelace joined Acme Corp in London.")),
                                len(load_prompt_file(EXAMPLES / "ner.safetensors").labels))


def test_an_unknown_prompt_is_refused(llm):
    with pytest.raises(PromptNotFound, match="no prompt named 'nope'"):
        llm.generate(["hi"], prompt="nope")


def test_close_is_idempotent(cache_dir, default_model, tokenizer):
    llm = LLM.from_model(default_model.model, tokenizer, EngineConfig(max_seq_len=64, kv_cache_bytes=1 << 24))
    llm.close()
    llm.close()
    assert not llm.engine._thread.is_alive()
