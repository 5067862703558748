"""Served prompts give PEFT's own outputs: PEFT adapters of every kind, imported and run through our engine,
against PeftModel's forward (never PeftModel.generate(), which is wrong for prompt learning on transformers 5.x).

Bases: tiny random Llama and Qwen2 with GQA, and the default model. Compared: greedy tokens (against a
greedy loop over PeftModel's forward), the log-probability of each chosen token (the engine's own logits),
and head probabilities for SEQ_CLS / TOKEN_CLS.
"""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from app import LLM
from app.engine.engine import EngineConfig
from app.engine.model import DenseAttention
from app.engine.sampling import SamplingParams
from app.engine.task_prompt import build_task_prompt
from app.engine.weights import base_identity, load_hf_directory
from prompt_store.peft_import import import_peft_dir
from prompt_store.format import Task
from tests.conftest import make_tiny_hf

P = 6
NEW = 6
LABELS = ["neg", "neu", "pos"]
CAUSAL_CONFIGS = {
    "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p-tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix-projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                    prefix_projection=True, encoder_hidden_size=32),
}


def run_engine(loaded, tokenizer, prompt_files, requests, max_seq_len=256):
    """requests: (prompt name | None, token ids, Task, SamplingParams) -> Outputs, all submitted together."""
    with LLM.from_model(loaded.model, tokenizer, EngineConfig(max_seq_len=max_seq_len, kv_cache_bytes=1 << 26)) as llm:
        for pf in prompt_files:
            llm.load_prompt(pf)
        return llm.run(requests)


@torch.no_grad()
def peft_greedy(peft_model, ids: list[int], new: int) -> tuple[list[int], list[float]]:
    """Greedy loop over PeftModel's forward (the whole sequence each step): tokens and their logprobs."""
    ids_t, tokens, logprobs = torch.tensor([ids]), [], []
    for _ in range(new):
        logits = peft_model(input_ids=ids_t).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids_t = torch.cat([ids_t, torch.tensor([[token]])], 1)
    return tokens, logprobs


def greedy(new=NEW):
    return SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=0)


def random_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()  # 0..2 are special (pad/eos)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp(f"peft-{request.param}")
    hf = make_tiny_hf(request.param, directory, tokenizer, seed=5)
    return directory, hf, load_hf_directory(directory, torch.float32, "cpu", request.param)


@pytest.mark.parametrize("kind", list(CAUSAL_CONFIGS))
def test_causal_lm_adapters_give_peft_tokens_and_logprobs(kind, base, tokenizer, tmp_path):
    directory, _, loaded = base
    torch.manual_seed(11)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()  # a fresh copy to wrap
    peft_model = get_peft_model(hf, CAUSAL_CONFIGS[kind]()).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt = import_peft_dir(tmp_path / "adapter", "task", base_identity(loaded))
    inputs = [random_ids(n, seed) for seed, n in enumerate([9, 4, 13])]
    outs = run_engine(loaded, tokenizer, [prompt], [("task", ids, Task.GENERATE, greedy()) for ids in inputs])
    for ids, out in zip(inputs, outs):
        want_tokens, want_logprobs = peft_greedy(peft_model, ids, NEW)
        assert [t.token_id for t in out.tokens] == want_tokens
        assert max(abs(t.logprob - w) for t, w in zip(out.tokens, want_logprobs)) < 1e-4
    # every logit of every text position, read through the K,V prefix the engine serves from
    served = build_task_prompt(loaded.model, prompt, tokenizer.encode)
    prefix = [(served.k[layer][None], served.v[layer][None]) for layer in range(loaded.args.num_layers)]
    ids = torch.tensor([inputs[2]])
    positions = P + torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        got = loaded.model.logits(loaded.model(positions, DenseAttention(prefix=prefix), tokens=ids))
        want = peft_model(input_ids=ids).logits[:, -ids.shape[1]:]
    assert (got - want).abs().max() < 1e-4


def _head_model(cls, directory, peft_config):
    torch.manual_seed(12)
    model = cls.from_pretrained(directory, num_labels=len(LABELS), dtype=torch.float32).eval()
    return get_peft_model(model, peft_config).eval()


@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix"])
def test_seq_cls_adapter_gives_peft_probabilities(kind, base, tokenizer, tmp_path):
    directory, _, loaded = base
    config = (PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P) if kind == "prompt-tuning"
              else PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    peft_model = _head_model(AutoModelForSequenceClassification, directory, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt = import_peft_dir(tmp_path / "adapter", "cls", base_identity(loaded), labels=LABELS)
    inputs = [random_ids(n, 40 + n) for n in (5, 12, 8)]
    outs = run_engine(loaded, tokenizer, [prompt], [("cls", ids, Task.CLASSIFY, greedy(1)) for ids in inputs])
    for ids, out in zip(inputs, outs):
        want = peft_seq_cls_probs(peft_model, kind, ids)
        assert (out.probs - want).abs().max() < 1e-4


@torch.no_grad()
def peft_seq_cls_probs(peft_model, kind: str, ids: list[int]) -> torch.Tensor:
    ids_t = torch.tensor([ids])
    if kind == "prompt-tuning":
        return peft_model(input_ids=ids_t).logits[0].softmax(-1)
    # PEFT's SEQ_CLS prefix forward refuses transformers 5.x backbones ("does not support past key values"),
    # so run the body of its _prefix_tuning_forward by hand: PEFT's own prefix cache, P mask ones prepended.
    mask = torch.ones(1, P + len(ids), dtype=torch.long)
    out = peft_model.base_model(input_ids=ids_t, attention_mask=mask, past_key_values=peft_model.get_prompt(1))
    return out.logits[0].softmax(-1)


def test_token_cls_adapter_gives_peft_probabilities(base, tokenizer, tmp_path):
    directory, _, loaded = base
    peft_model = _head_model(AutoModelForTokenClassification, directory,
                             PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P))
    peft_model.save_pretrained(tmp_path / "adapter")
    prompt = import_peft_dir(tmp_path / "adapter", "ner", base_identity(loaded), labels=LABELS)
    inputs = [random_ids(n, 70 + n) for n in (7, 3)]
    outs = run_engine(loaded, tokenizer, [prompt], [("ner", ids, Task.TAG, greedy(1)) for ids in inputs])
    for ids, out in zip(inputs, outs):
        with torch.no_grad():
            want = peft_model(input_ids=torch.tensor([ids])).logits[0, P:].softmax(-1)  # drop virtual positions
        assert out.probs.shape == (len(ids), len(LABELS))
        assert (out.probs - want).abs().max() < 1e-4


def test_default_model_prompt_tuning_gives_peft_greedy_tokens(default_model, tokenizer, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(default_model.directory, dtype=torch.float32).eval()
    torch.manual_seed(13)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="Answer like a pirate.",
                                tokenizer_name_or_path=str(default_model.directory))
    peft_model = get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    prompt = import_peft_dir(tmp_path / "adapter", "pirate", base_identity(default_model))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Where is the treasure?"}])
    out, = run_engine(default_model, tokenizer, [prompt], [("pirate", ids, Task.GENERATE, greedy(8))])
    want_tokens, want_logprobs = peft_greedy(reloaded, ids, 8)
    assert [t.token_id for t in out.tokens] == want_tokens
    assert max(abs(t.logprob - w) for t, w in zip(out.tokens, want_logprobs)) < 1e-3
