"""PEFT adapters built here on the default model, uploaded over HTTP, serve at once with PEFT's own outputs.

References are PeftModel's FORWARD: a greedy loop over it for generation (never PeftModel.generate, which is
wrong for prompt learning on transformers 5.x), and the softmax of its logits for the heads (TOKEN_CLS logits
include the P virtual positions first; SEQ_CLS with inputs_embeds pools the last position).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

peft = pytest.importorskip("peft")
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from app.engine.weights import fetch_default_model  # noqa: E402
from tests.live_server import model_cache_dir  # noqa: E402

P = 8
TEXTS = ["Ada Lovelace wrote the first program in London.", "The cat sat."]
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return fetch_default_model(Path(model_cache_dir()))  # the directory load_model('default', ...) serves from


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def make_adapter(tmp: Path, model_cls, model_dir: Path, peft_config, seed: int, **model_kwargs):
    torch.manual_seed(seed)
    base = model_cls.from_pretrained(model_dir, dtype=torch.float32, **model_kwargs)
    model = get_peft_model(base, peft_config).eval()
    with torch.no_grad():  # PEFT's random init is std 1; scale it to the embeddings' size so outputs vary
        for p in model.prompt_encoder.parameters():
            p.mul_(0.05)
    out = tmp / "adapter"
    model.save_pretrained(out)
    return model, out


def upload_adapter(client, name: str, adapter_dir: Path, labels: str | None = None) -> dict:
    files = {"adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())}
    r = client.put(f"/v1/prompts/{name}", files=files, data={"labels": labels} if labels else {})
    assert r.status_code == 201, r.text
    assert r.json()["serving"] is True
    return r.json()


@torch.no_grad()
def peft_greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_causal_lm_adapter_matches_peft_greedy(client, model_dir, tokenizer, tmp_path, kind):
    config = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if kind == "prompt"
              else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    model, adapter = make_adapter(tmp_path, LlamaForCausalLM, model_dir, config, seed=1)
    name = f"peft-gen-{kind}"
    info = upload_adapter(client, name, adapter)
    assert (info["task"], info["kind"], info["num_virtual_tokens"]) == ("generate", kind, P)
    n = 8
    for text in TEXTS[:1]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want = tokenizer.decode(peft_greedy(model, ids, n), skip_special_tokens=True)
        r = client.post("/v1/completions", json={"model": name, "prompt": text, "max_tokens": n, "temperature": 0,
                                                 "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}


def test_seq_cls_adapter_matches_peft_probs(client, model_dir, tokenizer, tmp_path):
    labels = ["negative", "neutral", "positive"]
    model, adapter = make_adapter(tmp_path, LlamaForSequenceClassification, model_dir,
                                  PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P), seed=2,
                                  num_labels=len(labels))
    info = upload_adapter(client, "peft-cls", adapter, labels=",".join(labels))
    assert (info["task"], info["labels"]) == ("classify", labels)
    r = client.post("/v1/classify", json={"prompt": "peft-cls", "inputs": TEXTS})
    assert r.status_code == 200, r.text
    for text, result in zip(TEXTS, r.json()["results"]):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].softmax(-1)
        got = torch.tensor([result["probs"][label] for label in labels])
        assert torch.allclose(got, want, atol=TOL), (got, want)
        assert result["label"] == labels[int(want.argmax())]


def test_token_cls_adapter_matches_peft_probs(client, model_dir, tokenizer, tmp_path):
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model, adapter = make_adapter(tmp_path, LlamaForTokenClassification, model_dir,
                                  PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P), seed=3,
                                  num_labels=len(labels))
    upload_adapter(client, "peft-ner", adapter, labels='["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]')
    r = client.post("/v1/tag", json={"prompt": "peft-ner", "inputs": TEXTS, "return_probs": True})
    assert r.status_code == 200, r.text
    for text, result in zip(TEXTS, r.json()["results"]):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        want = logits[P:].softmax(-1)  # PEFT's logits start with the P virtual positions
        tokens = result["tokens"]
        assert [(t["start"], t["end"]) for t in tokens] == [tuple(o) for o in enc["offset_mapping"]]
        got = torch.tensor([[t["probs"][label] for label in labels] for t in tokens])
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=TOL), (got - want).abs().max()
        assert [t["label"] for t in tokens] == [labels[i] for i in want.argmax(-1).tolist()]


def test_bad_adapter_uploads(client, model_dir, tmp_path):
    _, adapter = make_adapter(tmp_path, LlamaForSequenceClassification, model_dir,
                              PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P), seed=4, num_labels=2)
    config = (adapter / "adapter_config.json").read_bytes()
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    pickled = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(P, 576)}, pickled)
    cases = [(weights[:-100], None, "safetensors"), (pickled.getvalue(), None, "pickle"),
             (weights, "a,b,c", "3 labels"), (weights, "[1, 2]", "strings")]
    for blob, labels, words in cases:
        r = client.put("/v1/prompts/bad-adapter", files={"adapter_config": ("c.json", config),
                                                         "adapter_model": ("m.safetensors", blob)},
                       data={"labels": labels} if labels else {})
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]["message"]
    # F9: odd JSON types in the config, and a 0-d head, are refusals that name the problem, never a 500
    parsed = json.loads(config)
    odd_configs = [({**parsed, "peft_type": ["PROMPT_TUNING"]}, weights, "PEFT type ['PROMPT_TUNING'] is not supported"),
                   ({**parsed, "task_type": {"SEQ_CLS": 1}}, weights, "PEFT task type {'SEQ_CLS': 1} is not supported"),
                   (parsed, safetensors.torch.save({"prompt_embeddings": torch.zeros(P, 576),
                                                    "score.weight": torch.tensor(1.0)}), "2-D weight")]
    for odd, blob, words in odd_configs:
        r = client.put("/v1/prompts/bad-adapter", files={"adapter_config": ("c.json", json.dumps(odd).encode()),
                                                         "adapter_model": ("m.safetensors", blob)})
        assert r.status_code == 422, r.text
        assert words in r.json()["error"]["message"]
    assert client.get("/v1/prompts/bad-adapter").status_code == 404
    assert client.get("/health").status_code == 200
